"""Reading execution records (state changes are in `engine.transitions`).

Every read names the workspace: an execution of another workspace does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import RowMapping, bindparam, select

from imagegraph.errors import NotFound
from imagegraph.store.db import Database
from imagegraph.store.prepared import Prepared
from imagegraph.store.tables import assets, executions, node_runs


def _missing(execution_id: str) -> NotFound:
    return NotFound(f"execution {execution_id} does not exist")


def get_execution(
    db: Database, workspace_id: str, execution_id: str
) -> tuple[RowMapping, list[RowMapping]]:
    """The execution row and its node runs (in the order they were created)."""
    with db.read() as conn:
        row = conn.execute(
            select(executions).where(
                executions.c.id == execution_id, executions.c.workspace_id == workspace_id
            )
        ).first()
        if row is None:
            raise _missing(execution_id)
        runs = conn.execute(
            select(node_runs)
            .where(node_runs.c.execution_id == execution_id)
            .order_by(node_runs.c.id)
        ).all()
    return row._mapping, [r._mapping for r in runs]


def poll_view(
    db: Database, workspace_id: str, execution_id: str
) -> tuple[Mapping[str, Any], list[Mapping[str, Any]]]:
    """Status, error and output assets of an execution, in one read."""
    with db.read() as conn:
        row = _POLL_ROW.execute(conn, {"b_id": execution_id, "b_ws": workspace_id}).first()
        if row is None:
            raise _missing(execution_id)
        outputs = _POLL_OUTPUTS.execute(conn, {"b_id": execution_id}).all()
    return row._asdict(), [r._asdict() for r in outputs]


_POLL_ROW = Prepared(
    select(executions.c.id, executions.c.status, executions.c.error).where(
        executions.c.id == bindparam("b_id"), executions.c.workspace_id == bindparam("b_ws")
    )
)
_POLL_OUTPUTS = Prepared(
    select(assets)
    .where(assets.c.execution_id == bindparam("b_id"), assets.c.kind == "output")
    .order_by(assets.c.created_at, assets.c.id)
)


def check_execution(db: Database, workspace_id: str, execution_id: str) -> None:
    """Raise NotFound unless the workspace has this execution."""
    with db.read() as conn:
        row = _POLL_ROW.execute(conn, {"b_id": execution_id, "b_ws": workspace_id}).first()
    if row is None:
        raise _missing(execution_id)


def list_executions(
    db: Database,
    workspace_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    workflow_id: str | None = None,
    status: str | None = None,
) -> list[RowMapping]:
    """Newest first; `cursor` is the id of the last execution of the previous page."""
    columns = [c for c in executions.c if c.name not in ("graph", "inputs")]
    query = select(*columns).where(executions.c.workspace_id == workspace_id)
    if workflow_id:
        query = query.where(executions.c.workflow_id == workflow_id)
    if status:
        query = query.where(executions.c.status == status)
    if cursor:
        query = query.where(executions.c.id < cursor)
    with db.read() as conn:
        rows = conn.execute(query.order_by(executions.c.id.desc()).limit(limit)).all()
    return [r._mapping for r in rows]
