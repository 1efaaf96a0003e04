"""Workflow records. Every save is a new immutable version; executions pin the one they ran."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from imagegraph.errors import NotFound
from imagegraph.store.db import Database
from imagegraph.store.prepared import Prepared
from imagegraph.store.tables import workflow_versions, workflows


@dataclass(frozen=True)
class WorkflowRecord:
    id: str
    name: str
    description: str
    version: int
    latest_version: int
    graph: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    version: int
    name: str
    created_at: datetime


def create_workflow(
    db: Database, workspace_id: str, workflow_id: str, graph: Mapping[str, Any], now: datetime
) -> WorkflowRecord:
    with db.write() as conn:
        conn.execute(
            insert(workflows).values(
                id=workflow_id,
                workspace_id=workspace_id,
                name=graph["name"],
                description=graph.get("description", ""),
                latest_version=1,
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(
            insert(workflow_versions).values(
                workflow_id=workflow_id, version=1, graph=dict(graph), created_at=now
            )
        )
        return _get(conn, workspace_id, workflow_id, None)


def update_workflow(
    db: Database, workspace_id: str, workflow_id: str, graph: Mapping[str, Any], now: datetime
) -> WorkflowRecord:
    """Save `graph` as the next version."""
    with db.write() as conn:
        current = conn.execute(
            select(workflows.c.latest_version)
            .where(
                workflows.c.id == workflow_id,
                workflows.c.workspace_id == workspace_id,
                workflows.c.deleted_at.is_(None),
            )
            .with_for_update()
        ).scalar()
        if current is None:
            raise NotFound(f"workflow {workflow_id} does not exist")
        version = current + 1
        conn.execute(
            insert(workflow_versions).values(
                workflow_id=workflow_id, version=version, graph=dict(graph), created_at=now
            )
        )
        conn.execute(
            update(workflows)
            .where(workflows.c.id == workflow_id)
            .values(
                name=graph["name"],
                description=graph.get("description", ""),
                latest_version=version,
                updated_at=now,
            )
        )
        return _get(conn, workspace_id, workflow_id, None)


def resolve_version(
    db: Database, workspace_id: str, workflow_id: str, version: int | None = None
) -> int:
    """The version to run: `version` if the workflow has it, else the latest."""
    with db.read() as conn:
        latest = _LATEST.execute(conn, {"b_id": workflow_id, "b_ws": workspace_id}).scalar()
    if latest is None:
        raise NotFound(f"workflow {workflow_id} does not exist")
    if version is not None and not 1 <= version <= latest:
        raise NotFound(f"workflow {workflow_id} has no version {version} (latest is {latest})")
    return int(version or latest)


_LATEST = Prepared(
    select(workflows.c.latest_version).where(
        workflows.c.id == bindparam("b_id"),
        workflows.c.workspace_id == bindparam("b_ws"),
        workflows.c.deleted_at.is_(None),
    )
)


def version_graph(db: Database, workflow_id: str, version: int) -> dict[str, Any]:
    """A saved version's graph, whether or not its workflow was deleted since (what ran, or
    runs, on a version stays readable)."""
    with db.read() as conn:
        graph = conn.execute(
            select(workflow_versions.c.graph).where(
                workflow_versions.c.workflow_id == workflow_id,
                workflow_versions.c.version == version,
            )
        ).scalar()
    if graph is None:
        raise NotFound(f"workflow {workflow_id} has no version {version}")
    return dict(graph)


def get_workflow(
    db: Database, workspace_id: str, workflow_id: str, version: int | None = None
) -> WorkflowRecord:
    with db.read() as conn:
        return _get(conn, workspace_id, workflow_id, version)


def _get(
    conn: Connection, workspace_id: str, workflow_id: str, version: int | None
) -> WorkflowRecord:
    row = conn.execute(
        select(workflows).where(
            workflows.c.id == workflow_id,
            workflows.c.workspace_id == workspace_id,
            workflows.c.deleted_at.is_(None),
        )
    ).first()
    if row is None:
        raise NotFound(f"workflow {workflow_id} does not exist")
    wanted = version or row.latest_version
    graph = conn.execute(
        select(workflow_versions.c.graph).where(
            workflow_versions.c.workflow_id == workflow_id,
            workflow_versions.c.version == wanted,
        )
    ).scalar()
    if graph is None:
        raise NotFound(
            f"workflow {workflow_id} has no version {wanted} (latest is {row.latest_version})"
        )
    return WorkflowRecord(
        id=row.id,
        name=graph.get("name", row.name),
        description=graph.get("description", ""),
        version=wanted,
        latest_version=row.latest_version,
        graph=graph,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def list_workflows(
    db: Database, workspace_id: str, *, limit: int, cursor: str | None = None
) -> list[WorkflowRecord]:
    """Newest first; `cursor` is the id of the last workflow of the previous page."""
    with db.read() as conn:
        query = select(workflows.c.id).where(
            workflows.c.workspace_id == workspace_id, workflows.c.deleted_at.is_(None)
        )
        if cursor:
            query = query.where(workflows.c.id < cursor)
        ids = conn.execute(query.order_by(workflows.c.id.desc()).limit(limit)).scalars().all()
        return [_get(conn, workspace_id, workflow_id, None) for workflow_id in ids]


def list_versions(db: Database, workspace_id: str, workflow_id: str) -> list[VersionRecord]:
    with db.read() as conn:
        _get(conn, workspace_id, workflow_id, None)
        rows = conn.execute(
            select(
                workflow_versions.c.version,
                workflow_versions.c.graph,
                workflow_versions.c.created_at,
            )
            .where(workflow_versions.c.workflow_id == workflow_id)
            .order_by(workflow_versions.c.version.desc())
        ).all()
    return [VersionRecord(r.version, r.graph.get("name", ""), r.created_at) for r in rows]


def delete_workflow(db: Database, workspace_id: str, workflow_id: str, now: datetime) -> None:
    """Hide a workflow; its versions stay so past executions remain explainable."""
    with db.write() as conn:
        done = conn.execute(
            update(workflows)
            .where(
                workflows.c.id == workflow_id,
                workflows.c.workspace_id == workspace_id,
                workflows.c.deleted_at.is_(None),
            )
            .values(deleted_at=now)
        ).rowcount
        if not done:
            raise NotFound(f"workflow {workflow_id} does not exist")
