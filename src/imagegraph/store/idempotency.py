"""Idempotency keys: the first response to a key, kept to be replayed.

A row is `in_flight` while the request that claimed the key runs (for requests whose work is
not one transaction), and `done` once its response is stored. Executions skip `in_flight`:
their key is inserted, already `done`, in the transaction that creates the execution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from imagegraph.store.db import Database
from imagegraph.store.tables import idempotency_keys

K = idempotency_keys.c


@dataclass(frozen=True)
class StoredKey:
    fingerprint: str
    state: str  # in_flight or done
    status_code: int | None
    headers: Mapping[str, str]
    body: bytes | None
    created_at: datetime
    locked_at: datetime | None


def lookup(db: Database, workspace_id: str, key: str, not_before: datetime) -> StoredKey | None:
    """The stored key, unless it is older than `not_before` (then it is forgotten)."""
    with db.read() as conn:
        row = conn.execute(
            select(idempotency_keys).where(K.workspace_id == workspace_id, K.key == key)
        ).first()
    if row is None:
        return None
    if row.created_at < not_before:
        forget(db, workspace_id, key)
        return None
    return StoredKey(
        row.fingerprint,
        row.state,
        row.status_code,
        row.response_headers or {},
        row.response_body,
        row.created_at,
        row.locked_at,
    )


def claim(db: Database, workspace_id: str, key: str, fingerprint: str, now: datetime) -> bool:
    """Mark the key in flight for this request; False if another request holds it."""
    try:
        with db.write() as conn:
            conn.execute(
                insert(idempotency_keys).values(
                    workspace_id=workspace_id,
                    key=key,
                    fingerprint=fingerprint,
                    state="in_flight",
                    created_at=now,
                    locked_at=now,
                )
            )
    except IntegrityError:
        return False
    return True


def take_over(
    db: Database, workspace_id: str, key: str, fingerprint: str, stale: datetime, now: datetime
) -> bool:
    """Claim a key whose request stopped (locked before `stale`) without answering."""
    with db.write() as conn:
        return bool(
            conn.execute(
                update(idempotency_keys)
                .where(
                    K.workspace_id == workspace_id,
                    K.key == key,
                    K.state == "in_flight",
                    K.fingerprint == fingerprint,
                    K.locked_at < stale,
                )
                .values(locked_at=now)
            ).rowcount
        )


def complete(
    db: Database,
    workspace_id: str,
    key: str,
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
) -> None:
    with db.write() as conn:
        conn.execute(
            update(idempotency_keys)
            .where(K.workspace_id == workspace_id, K.key == key)
            .values(
                state="done",
                status_code=status_code,
                response_headers=dict(headers),
                response_body=body,
                locked_at=None,
            )
        )


def forget(db: Database, workspace_id: str, key: str) -> None:
    with db.write() as conn:
        conn.execute(delete(idempotency_keys).where(K.workspace_id == workspace_id, K.key == key))


def reap(db: Database, before: datetime) -> int:
    """Delete keys created before `before`; returns how many."""
    with db.write() as conn:
        return int(conn.execute(delete(idempotency_keys).where(K.created_at < before)).rowcount)
