"""HTTP clients of an in-process app, and the workspaces and keys they act for."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from imagegraph import keys
from imagegraph.api.app import create_app
from imagegraph.keys import Mode
from imagegraph.nodes.base import NodeRegistry
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store import workspaces
from imagegraph.store.tables import DEFAULT_WORKSPACE


@contextlib.asynccontextmanager
async def started_runtime(
    settings: Settings, registry: NodeRegistry | None = None, **overrides: Any
) -> AsyncIterator[Runtime]:
    """A started runtime of `settings` with `overrides` (say, a smaller limit)."""
    runtime = Runtime.build(settings.model_copy(update=overrides), registry=registry)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@contextlib.asynccontextmanager
async def api_client(runtime: Runtime, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `runtime`'s app sending `key` (the bootstrap admin key unless given;
    pass "" for none)."""
    key = runtime.bootstrap_key if key is None else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=create_app(runtime=runtime))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=headers
    ) as client:
        yield client


def make_key(
    runtime: Runtime,
    workspace_id: str = DEFAULT_WORKSPACE,
    scopes: Sequence[str] = ("admin",),
    mode: Mode = "live",
) -> str:
    """A new API key of a workspace; returns its secret."""
    new = keys.generate(mode)
    workspaces.add_key(runtime.db, workspace_id, new, "test key", list(scopes), datetime.now(UTC))
    return new.secret


def make_workspace(
    runtime: Runtime,
    *,
    plan: str = "self-hosted",
    credits: float = 0.0,
    scopes: Sequence[str] = ("admin",),
    mode: Mode = "live",
) -> tuple[str, str]:
    """A new workspace with a key; returns (workspace id, key secret)."""
    now = datetime.now(UTC)
    record = workspaces.create_workspace(runtime.db, "other", plan, now)
    if credits:
        workspaces.grant_credits(runtime.db, record.id, credits, "test", now)
    return record.id, make_key(runtime, record.id, scopes, mode)
