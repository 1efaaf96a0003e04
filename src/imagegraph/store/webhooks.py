"""Webhook endpoints, and the outbox of deliveries with the log of their attempts.

Deliveries are written by the transaction that ends an execution or a batch (`enqueue`);
this module registers endpoints and moves deliveries along: claimed under a lease by a
dispatcher, then delivered, rescheduled, or failed for good.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, or_, select, update

from imagegraph.errors import Conflict, NotFound
from imagegraph.ids import new_id
from imagegraph.store.db import Database
from imagegraph.store.prepared import Prepared
from imagegraph.store.tables import (
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
    workspaces,
)

D = webhook_deliveries.c
EP = webhook_endpoints.c

SUBSCRIBED_ENDPOINTS = Prepared(
    select(EP.id, EP.url, EP.events).where(
        EP.workspace_id == bindparam("b_ws"), EP.enabled.is_(True)
    )
)


def enqueue(
    conn: Connection,
    workspace_id: str,
    kind: str,
    data: Mapping[str, Any],
    now: datetime,
    url: str | None = None,
) -> None:
    """Write the deliveries announcing an event (in the transaction that made it happen):
    to `url` if given, and to every enabled endpoint of the workspace subscribed to `kind`."""
    payload = {"type": kind, "timestamp": now.isoformat(), "data": dict(data)}
    targets: list[tuple[str | None, str]] = []
    if url:
        targets.append((None, url))
    for endpoint in SUBSCRIBED_ENDPOINTS.execute(conn, {"b_ws": workspace_id}).all():
        if kind in endpoint.events:
            targets.append((endpoint.id, endpoint.url))
    if targets:
        conn.execute(
            insert(webhook_deliveries),
            [
                {
                    "id": new_id("evt"),
                    "workspace_id": workspace_id,
                    "endpoint_id": endpoint_id,
                    "url": target,
                    "event_type": kind,
                    "payload": payload,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for endpoint_id, target in targets
            ],
        )


@dataclass(frozen=True)
class Endpoint:
    id: str
    workspace_id: str
    url: str
    events: tuple[str, ...]
    secret: str
    description: str
    enabled: bool
    disabled_reason: str | None
    created_at: datetime


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(
        row.id,
        row.workspace_id,
        row.url,
        tuple(row.events),
        row.secret,
        row.description,
        row.enabled,
        row.disabled_reason,
        row.created_at,
    )


def create_endpoint(
    db: Database,
    workspace_id: str,
    url: str,
    events: Sequence[str],
    description: str,
    secret: str,
    now: datetime,
) -> Endpoint:
    with db.write() as conn:
        endpoint_id = new_id("whep")
        conn.execute(
            insert(webhook_endpoints).values(
                id=endpoint_id,
                workspace_id=workspace_id,
                url=url,
                events=list(events),
                secret=secret,
                description=description,
                enabled=True,
                created_at=now,
            )
        )
        return _get_endpoint(conn, workspace_id, endpoint_id)


def _get_endpoint(conn: Connection, workspace_id: str, endpoint_id: str) -> Endpoint:
    row = conn.execute(
        select(webhook_endpoints).where(EP.id == endpoint_id, EP.workspace_id == workspace_id)
    ).first()
    if row is None:
        raise NotFound(f"webhook endpoint {endpoint_id} does not exist")
    return _endpoint(row)


def get_endpoint(db: Database, workspace_id: str, endpoint_id: str) -> Endpoint:
    with db.read() as conn:
        return _get_endpoint(conn, workspace_id, endpoint_id)


def list_endpoints(db: Database, workspace_id: str) -> list[Endpoint]:
    with db.read() as conn:
        rows = conn.execute(
            select(webhook_endpoints)
            .where(EP.workspace_id == workspace_id)
            .order_by(EP.created_at, EP.id)
        ).all()
    return [_endpoint(r) for r in rows]


def update_endpoint(
    db: Database, workspace_id: str, endpoint_id: str, changes: dict[str, Any]
) -> Endpoint:
    """Change url, events, description or enabled (enabling clears the disabled reason)."""
    with db.write() as conn:
        _get_endpoint(conn, workspace_id, endpoint_id)
        values = dict(changes)
        if values.get("enabled") is True:
            values["disabled_reason"] = None
        elif values.get("enabled") is False:
            values["disabled_reason"] = "disabled through the API"
        if values:
            conn.execute(update(webhook_endpoints).where(EP.id == endpoint_id).values(**values))
        return _get_endpoint(conn, workspace_id, endpoint_id)


def delete_endpoint(db: Database, workspace_id: str, endpoint_id: str) -> None:
    """Disable an endpoint for good and stop its pending deliveries; its log stays."""
    with db.write() as conn:
        _get_endpoint(conn, workspace_id, endpoint_id)
        conn.execute(
            update(webhook_endpoints)
            .where(EP.id == endpoint_id)
            .values(enabled=False, disabled_reason="deleted", url="")
        )
        conn.execute(
            update(webhook_deliveries)
            .where(D.endpoint_id == endpoint_id, D.state == "pending")
            .values(state="failed", next_attempt_at=None, last_error="endpoint deleted")
        )


def workspace_secret(db: Database, workspace_id: str) -> str:
    with db.read() as conn:
        secret: str | None = conn.execute(
            select(workspaces.c.webhook_secret).where(workspaces.c.id == workspace_id)
        ).scalar()
    if secret is None:
        raise NotFound(f"workspace {workspace_id} does not exist")
    return secret


# -- deliveries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery, with the secret to sign it with."""

    id: str
    workspace_id: str
    endpoint_id: str | None
    url: str
    event_type: str
    payload: dict[str, Any]
    attempts: int  # including the one being made
    secret: str
    endpoint_enabled: bool


def anything_due(db: Database, now: datetime) -> bool:
    """Whether a delivery is due (or held by a sender whose lease ran out): two lookups on
    partial indexes, so asking costs next to nothing however long the log grows."""
    with db.read() as conn:
        return (
            conn.execute(_PENDING_DUE, {"b_now": now}).first() is not None
            or conn.execute(_LEASE_LAPSED, {"b_now": now}).first() is not None
        )


_PENDING_DUE = (
    select(D.id).where(D.state == "pending", D.next_attempt_at <= bindparam("b_now")).limit(1)
)
_LEASE_LAPSED = (
    select(D.id).where(D.state == "sending", D.lease_expires_at < bindparam("b_now")).limit(1)
)


def claim_due(db: Database, now: datetime, limit: int, lease_seconds: float) -> list[Delivery]:
    """Take up to `limit` deliveries that are due (or whose sender's lease ran out)."""
    due = or_(
        and_(D.state == "pending", D.next_attempt_at <= now),
        and_(D.state == "sending", D.lease_expires_at < now),
    )
    with db.write() as conn:
        ids = (
            select(D.id)
            .where(due)
            .order_by(D.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = conn.execute(
            update(webhook_deliveries)
            .where(D.id.in_(ids.scalar_subquery()), due)
            .values(
                state="sending",
                attempts=D.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
            .returning(
                D.id, D.workspace_id, D.endpoint_id, D.url, D.event_type, D.payload, D.attempts
            )
        ).all()
        if not rows:
            return []
        endpoint_ids = sorted({r.endpoint_id for r in rows if r.endpoint_id})
        endpoints = (
            {
                e.id: e
                for e in conn.execute(
                    select(EP.id, EP.secret, EP.enabled, EP.url).where(EP.id.in_(endpoint_ids))
                ).all()
            }
            if endpoint_ids
            else {}
        )
        workspace_ids = sorted({r.workspace_id for r in rows if not r.endpoint_id})
        secrets = (
            dict(
                conn.execute(
                    select(workspaces.c.id, workspaces.c.webhook_secret).where(
                        workspaces.c.id.in_(workspace_ids)
                    )
                ).all()
            )
            if workspace_ids
            else {}
        )
    claimed = []
    for r in rows:
        endpoint = endpoints.get(r.endpoint_id) if r.endpoint_id else None
        claimed.append(
            Delivery(
                id=r.id,
                workspace_id=r.workspace_id,
                endpoint_id=r.endpoint_id,
                # An endpoint's deliveries go where it points now (its URL may have changed).
                url=endpoint.url if endpoint is not None else r.url,
                event_type=r.event_type,
                payload=r.payload,
                attempts=r.attempts,
                secret=endpoint.secret if endpoint is not None else secrets[r.workspace_id],
                endpoint_enabled=endpoint.enabled if endpoint is not None else True,
            )
        )
    return claimed


def record_attempt(
    db: Database,
    delivery: Delivery,
    *,
    now: datetime,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
    next_attempt_at: datetime | None,
    disable_endpoint: str | None = None,
) -> bool:
    """Log an attempt and move the delivery on: delivered (2xx), rescheduled, or failed for
    good (`next_attempt_at` None). False if the lease was lost (another sender took it)."""
    delivered = status_code is not None and 200 <= status_code < 300
    state = "delivered" if delivered else ("pending" if next_attempt_at else "failed")
    with db.write() as conn:
        moved = conn.execute(
            update(webhook_deliveries)
            .where(D.id == delivery.id, D.state == "sending", D.attempts == delivery.attempts)
            .values(
                state=state,
                next_attempt_at=None if delivered else next_attempt_at,
                lease_expires_at=None,
                last_status=status_code,
                last_error=error,
                delivered_at=now if delivered else None,
            )
        ).rowcount
        if not moved:
            return False
        conn.execute(
            insert(webhook_attempts).values(
                delivery_id=delivery.id,
                attempt=delivery.attempts,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
                created_at=now,
            )
        )
        if disable_endpoint and delivery.endpoint_id:
            conn.execute(
                update(webhook_endpoints)
                .where(EP.id == delivery.endpoint_id)
                .values(enabled=False, disabled_reason=disable_endpoint)
            )
            conn.execute(
                update(webhook_deliveries)
                .where(D.endpoint_id == delivery.endpoint_id, D.state == "pending")
                .values(state="failed", next_attempt_at=None, last_error=disable_endpoint)
            )
        return True


def list_deliveries(
    db: Database,
    workspace_id: str,
    *,
    endpoint_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> list[dict[str, Any]]:
    """Deliveries newest first, each with its attempts."""
    with db.read() as conn:
        if endpoint_id is not None:
            _get_endpoint(conn, workspace_id, endpoint_id)
        query = select(webhook_deliveries).where(D.workspace_id == workspace_id)
        if endpoint_id is not None:
            query = query.where(D.endpoint_id == endpoint_id)
        if cursor:
            query = query.where(D.id < cursor)
        rows = conn.execute(query.order_by(D.id.desc()).limit(limit)).all()
        return _with_attempts(conn, rows)


def get_delivery(db: Database, workspace_id: str, delivery_id: str) -> dict[str, Any]:
    with db.read() as conn:
        rows = conn.execute(
            select(webhook_deliveries).where(D.id == delivery_id, D.workspace_id == workspace_id)
        ).all()
        if not rows:
            raise NotFound(f"webhook delivery {delivery_id} does not exist")
        return _with_attempts(conn, rows)[0]


def _with_attempts(conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
    ids = [r.id for r in rows]
    attempts: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        for a in conn.execute(
            select(webhook_attempts)
            .where(webhook_attempts.c.delivery_id.in_(ids))
            .order_by(webhook_attempts.c.id)
        ).all():
            attempts[a.delivery_id].append(dict(a._mapping))
    return [{**dict(r._mapping), "attempt_log": attempts[r.id]} for r in rows]


def replay_delivery(
    db: Database, workspace_id: str, delivery_id: str, now: datetime
) -> dict[str, Any]:
    """Send a delivery again (same webhook-id, so receivers can tell it is the same event)."""
    with db.write() as conn:
        row = conn.execute(
            select(D.state, D.endpoint_id).where(
                D.id == delivery_id, D.workspace_id == workspace_id
            )
        ).first()
        if row is None:
            raise NotFound(f"webhook delivery {delivery_id} does not exist")
        if row.state in ("pending", "sending"):
            raise Conflict(
                f"webhook delivery {delivery_id} is {row.state}; only delivered or failed "
                "deliveries can be replayed",
                deliveryState=row.state,
            )
        if row.endpoint_id:
            enabled = conn.execute(select(EP.enabled).where(EP.id == row.endpoint_id)).scalar()
            if not enabled:
                raise Conflict(
                    f"webhook endpoint {row.endpoint_id} is disabled; enable it to replay"
                )
        conn.execute(
            update(webhook_deliveries)
            .where(D.id == delivery_id)
            # The retry schedule starts over; the attempt log keeps the earlier attempts.
            .values(state="pending", next_attempt_at=now, delivered_at=None, attempts=0)
        )
    return get_delivery(db, workspace_id, delivery_id)
