"""Reads the engine makes while running executions (state changes are in `transitions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select

from imagegraph.engine import statements as sql
from imagegraph.engine.events import Event
from imagegraph.engine.states import TERMINAL_EXECUTION, ExecutionStatus, RunState
from imagegraph.errors import NotFound
from imagegraph.store.db import Database
from imagegraph.store.tables import executions, node_runs


def lease_owners(db: Database) -> list[str]:
    """Owners of RUNNING node runs."""
    with db.read() as conn:
        return list(
            conn.execute(
                select(node_runs.c.lease_owner)
                .where(
                    node_runs.c.state == RunState.RUNNING.value,
                    node_runs.c.lease_owner.is_not(None),
                )
                .distinct()
            ).scalars()
        )


def cancelled_runs(db: Database, run_ids: Sequence[int]) -> set[int]:
    """Which of these node runs are CANCELLED."""
    with db.read() as conn:
        return set(
            conn.execute(
                select(node_runs.c.id).where(
                    node_runs.c.id.in_(list(run_ids)),
                    node_runs.c.state == RunState.CANCELLED.value,
                )
            ).scalars()
        )


def lookup_cache(db: Database, key: str) -> Mapping[str, Any] | None:
    with db.read() as conn:
        outputs: Mapping[str, Any] | None = sql.LOOKUP_CACHE.execute(conn, {"b_key": key}).scalar()
        return outputs


def load_execution(db: Database, execution_id: str) -> tuple[Mapping[str, Any], str, str]:
    """The graph an execution runs, its workspace and its mode."""
    with db.read() as conn:
        row = conn.execute(
            select(executions.c.graph, executions.c.workspace_id, executions.c.mode).where(
                executions.c.id == execution_id
            )
        ).first()
    if row is None:
        raise NotFound(f"execution {execution_id} does not exist")
    return row.graph, row.workspace_id, row.mode


def regeneration_state(
    db: Database, execution_id: str, node_id: str
) -> tuple[int, Mapping[str, Any] | None]:
    """How many times a quality gate sent a node run back, and the params it changed."""
    with db.read() as conn:
        row = conn.execute(
            select(node_runs.c.regenerations, node_runs.c.adjust).where(
                node_runs.c.execution_id == execution_id, node_runs.c.node_id == node_id
            )
        ).one()
    return row.regenerations, row.adjust


def load_outputs(
    db: Database, execution_id: str, node_ids: Sequence[str]
) -> dict[str, Mapping[str, Any] | None]:
    with db.read() as conn:
        rows = conn.execute(
            sql.RUN_STATES, {"b_execution": execution_id, "b_nodes": list(node_ids)}
        ).all()
    return {r.node_id: r.outputs for r in rows}


def load_events(db: Database, execution_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
    with db.read() as conn:
        rows = sql.EVENTS_AFTER.execute(
            conn, {"b_execution": execution_id, "b_after": after, "b_limit": limit}
        ).all()
    return [Event(r.id, r.execution_id, r.type, r.node_id, r.data, r.created_at) for r in rows]


def ended_among(db: Database, execution_ids: Sequence[str]) -> dict[str, ExecutionStatus]:
    """Which of these executions have ended, with how."""
    ended: dict[str, ExecutionStatus] = {}
    terminal = [status.value for status in TERMINAL_EXECUTION]
    with db.read() as conn:
        for start in range(0, len(execution_ids), 500):
            chunk = execution_ids[start : start + 500]
            rows = conn.execute(
                select(executions.c.id, executions.c.status).where(
                    executions.c.id.in_(chunk), executions.c.status.in_(terminal)
                )
            )
            ended.update((row.id, ExecutionStatus(row.status)) for row in rows)
    return ended


def execution_status(db: Database, workspace_id: str, execution_id: str) -> ExecutionStatus | None:
    with db.read() as conn:
        status = sql.EXECUTION_STATUS.execute(
            conn, {"b_id": execution_id, "b_ws": workspace_id}
        ).scalar()
    return None if status is None else ExecutionStatus(status)
