"""`/nodes` (the node catalog for editors and clients) and the health probes."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from imagegraph import __version__
from imagegraph.api.auth import CanRead
from imagegraph.api.deps import RuntimeDep
from imagegraph.api.schemas import Health, NodeTypeOut
from imagegraph.errors import ServiceUnavailable
from imagegraph.store.db import Database

router = APIRouter(tags=["meta"])
health_router = APIRouter(tags=["health"])


@router.get("/nodes", response_model=list[NodeTypeOut], summary="Every node type")
async def list_nodes(runtime: RuntimeDep, principal: CanRead) -> list[NodeTypeOut]:
    return [NodeTypeOut.model_validate(node.describe()) for node in runtime.registry]


@health_router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok", version=__version__)


@health_router.get(
    "/readyz",
    response_model=Health,
    summary="The database answers and the worker runs",
    responses={503: {"description": "Not ready"}},
)
async def readyz(runtime: RuntimeDep) -> Health:
    try:
        await runtime.db.run(_ping, runtime.db)
    except Exception as exc:
        raise ServiceUnavailable(f"database is not reachable: {type(exc).__name__}") from None
    worker = runtime.engine.worker
    checks = {"database": "ok", "worker": "ok" if worker is not None else "disabled"}
    return Health(status="ok", version=__version__, checks=checks)


def _ping(db: Database) -> None:
    with db.read() as conn:
        conn.execute(text("SELECT 1"))
