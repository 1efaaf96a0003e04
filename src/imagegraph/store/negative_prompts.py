"""The workspace's library of named negative prompts, appended to batches that name them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import RowMapping, delete, insert, select, update

from imagegraph.errors import NotFound
from imagegraph.store.db import Database
from imagegraph.store.tables import negative_prompts

N = negative_prompts.c


def list_entries(db: Database, workspace_id: str) -> list[RowMapping]:
    with db.read() as conn:
        rows = conn.execute(
            select(negative_prompts).where(N.workspace_id == workspace_id).order_by(N.name)
        )
        return [r._mapping for r in rows]


def get_entry(db: Database, workspace_id: str, name: str) -> RowMapping:
    with db.read() as conn:
        row = conn.execute(
            select(negative_prompts).where(N.workspace_id == workspace_id, N.name == name)
        ).first()
    if row is None:
        raise NotFound(f"the negative prompt library has no entry {name!r}")
    return row._mapping


def put_entry(db: Database, workspace_id: str, name: str, text: str, now: datetime) -> bool:
    """Create or replace an entry; True when it is new."""
    with db.write() as conn:
        changed = conn.execute(
            update(negative_prompts)
            .where(N.workspace_id == workspace_id, N.name == name)
            .values(text=text, updated_at=now)
        ).rowcount
        if changed:
            return False
        conn.execute(
            insert(negative_prompts).values(
                workspace_id=workspace_id, name=name, text=text, created_at=now, updated_at=now
            )
        )
        return True


def delete_entry(db: Database, workspace_id: str, name: str) -> None:
    with db.write() as conn:
        gone = conn.execute(
            delete(negative_prompts).where(N.workspace_id == workspace_id, N.name == name)
        ).rowcount
    if not gone:
        raise NotFound(f"the negative prompt library has no entry {name!r}")
