"""Asset records: stored images and how they were made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, insert, select, update

from imagegraph.errors import NotFound
from imagegraph.store.db import Database
from imagegraph.store.tables import assets


def get_asset(db: Database, workspace_id: str, asset_id: str) -> RowMapping | None:
    with db.read() as conn:
        row = conn.execute(
            select(assets).where(assets.c.id == asset_id, assets.c.workspace_id == workspace_id)
        ).first()
    return None if row is None else row._mapping


def existing_ids(db: Database, workspace_id: str, asset_ids: Sequence[str]) -> set[str]:
    with db.read() as conn:
        return set(
            conn.execute(
                select(assets.c.id).where(
                    assets.c.id.in_(asset_ids), assets.c.workspace_id == workspace_id
                )
            ).scalars()
        )


def insert_asset(db: Database, row: Mapping[str, Any]) -> None:
    with db.write() as conn:
        conn.execute(insert(assets).values(**row))


def execution_outputs(db: Database, execution_id: str) -> list[RowMapping]:
    """Output assets of an execution, in the order they were stored."""
    with db.read() as conn:
        rows = conn.execute(
            select(assets)
            .where(assets.c.execution_id == execution_id, assets.c.kind == "output")
            .order_by(assets.c.created_at, assets.c.id)
        ).all()
    return [r._mapping for r in rows]


def lineage(db: Database, workspace_id: str, asset_id: str, limit: int = 1000) -> list[RowMapping]:
    """The asset and its ancestors, nearest first (following first parents)."""
    chain: list[RowMapping] = []
    current: str | None = asset_id
    with db.read() as conn:
        while current is not None and len(chain) < limit:
            row = conn.execute(
                select(assets).where(assets.c.id == current, assets.c.workspace_id == workspace_id)
            ).first()
            if row is None:
                break
            chain.append(row._mapping)
            parents = (row.meta or {}).get("parents") or []
            current = parents[0] if parents else None
    return chain


def set_review(
    db: Database,
    workspace_id: str,
    asset_id: str,
    state: str,
    note: str | None,
    now: datetime,
) -> RowMapping:
    """Set an asset's review state (a person's decision); returns the asset."""
    with db.write() as conn:
        row = conn.execute(
            update(assets)
            .where(assets.c.id == asset_id, assets.c.workspace_id == workspace_id)
            .values(review_state=state, review_note=note, reviewed_at=now)
            .returning(*assets.c)
        ).first()
    if row is None:
        raise NotFound(f"asset {asset_id} does not exist")
    return row._mapping
