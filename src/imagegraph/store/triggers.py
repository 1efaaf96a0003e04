"""Public triggers: unguessable ids that start a workflow without an API key."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from imagegraph.errors import NotFound
from imagegraph.store.db import Database
from imagegraph.store.tables import triggers, workflows, workspaces

T = triggers.c
# 24 random bytes: 192 bits, URL-safe base64 (32 characters).
ID_BYTES = 24


@dataclass(frozen=True)
class Trigger:
    id: str
    workspace_id: str
    workflow_id: str
    mode: str
    enabled: bool
    created_at: datetime
    last_used_at: datetime | None


def _trigger(row: Any) -> Trigger:
    return Trigger(
        row.id,
        row.workspace_id,
        row.workflow_id,
        row.mode,
        row.enabled,
        row.created_at,
        row.last_used_at,
    )


def new_trigger_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def create_trigger(
    db: Database, workspace_id: str, workflow_id: str, mode: str, now: datetime
) -> Trigger:
    with db.write() as conn:
        _check_workflow(conn, workspace_id, workflow_id)
        trigger_id = new_trigger_id()
        conn.execute(
            insert(triggers).values(
                id=trigger_id,
                workspace_id=workspace_id,
                workflow_id=workflow_id,
                mode=mode,
                enabled=True,
                created_at=now,
            )
        )
        return _trigger(conn.execute(select(triggers).where(T.id == trigger_id)).one())


def _check_workflow(conn: Connection, workspace_id: str, workflow_id: str) -> None:
    exists = conn.execute(
        select(workflows.c.id).where(
            workflows.c.id == workflow_id,
            workflows.c.workspace_id == workspace_id,
            workflows.c.deleted_at.is_(None),
        )
    ).first()
    if exists is None:
        raise NotFound(f"workflow {workflow_id} does not exist")


def list_triggers(db: Database, workspace_id: str, workflow_id: str) -> list[Trigger]:
    with db.read() as conn:
        _check_workflow(conn, workspace_id, workflow_id)
        rows = conn.execute(
            select(triggers)
            .where(T.workspace_id == workspace_id, T.workflow_id == workflow_id)
            .order_by(T.created_at)
        ).all()
    return [_trigger(r) for r in rows]


def get_trigger(db: Database, workspace_id: str, workflow_id: str, trigger_id: str) -> Trigger:
    with db.read() as conn:
        row = conn.execute(
            select(triggers).where(
                T.id == trigger_id, T.workspace_id == workspace_id, T.workflow_id == workflow_id
            )
        ).first()
    if row is None:
        raise NotFound(f"trigger {_shown(trigger_id)} does not exist")
    return _trigger(row)


def set_enabled(
    db: Database, workspace_id: str, workflow_id: str, trigger_id: str, enabled: bool
) -> Trigger:
    with db.write() as conn:
        done = conn.execute(
            update(triggers)
            .where(T.id == trigger_id, T.workspace_id == workspace_id, T.workflow_id == workflow_id)
            .values(enabled=enabled)
        ).rowcount
        if not done:
            raise NotFound(f"trigger {_shown(trigger_id)} does not exist")
        return _trigger(conn.execute(select(triggers).where(T.id == trigger_id)).one())


def rotate(
    db: Database, workspace_id: str, workflow_id: str, trigger_id: str, now: datetime
) -> Trigger:
    """Replace the trigger's id with a new one; the old id stops working at once."""
    with db.write() as conn:
        row = conn.execute(
            select(triggers).where(
                T.id == trigger_id, T.workspace_id == workspace_id, T.workflow_id == workflow_id
            )
        ).first()
        if row is None:
            raise NotFound(f"trigger {_shown(trigger_id)} does not exist")
        conn.execute(delete(triggers).where(T.id == trigger_id))
        new_id = new_trigger_id()
        conn.execute(
            insert(triggers).values(
                id=new_id,
                workspace_id=workspace_id,
                workflow_id=workflow_id,
                mode=row.mode,
                enabled=row.enabled,
                created_at=now,
            )
        )
        return _trigger(conn.execute(select(triggers).where(T.id == new_id)).one())


def delete_trigger(db: Database, workspace_id: str, workflow_id: str, trigger_id: str) -> None:
    with db.write() as conn:
        done = conn.execute(
            delete(triggers).where(
                T.id == trigger_id, T.workspace_id == workspace_id, T.workflow_id == workflow_id
            )
        ).rowcount
        if not done:
            raise NotFound(f"trigger {_shown(trigger_id)} does not exist")


def find_enabled(db: Database, trigger_id: str) -> tuple[Trigger, str] | None:
    """The trigger behind a public id and its workspace's plan, if it is enabled."""
    with db.read() as conn:
        row = conn.execute(
            select(triggers, workspaces.c.plan)
            .join(workspaces, workspaces.c.id == T.workspace_id)
            .where(T.id == trigger_id)
        ).first()
    if row is None or not row.enabled:
        return None
    return _trigger(row), row.plan


def touch(db: Database, trigger_id: str, now: datetime) -> None:
    with db.write() as conn:
        conn.execute(update(triggers).where(T.id == trigger_id).values(last_used_at=now))


def _shown(trigger_id: str) -> str:
    """A trigger id as it may appear in messages and logs: never in full."""
    return f"{trigger_id[:6]}…"
