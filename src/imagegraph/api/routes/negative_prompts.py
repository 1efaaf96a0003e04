"""`/negative-prompts`: the workspace's shared negative prompts, by name. A batch names the
entries to append (`negativePrompts: ["watermark", "anatomy"]`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status
from pydantic import Field

from imagegraph.api.auth import CanRead, CanWrite
from imagegraph.api.deps import RuntimeDep
from imagegraph.api.schemas import ApiModel, RequestModel, json_response
from imagegraph.store import negative_prompts as store

router = APIRouter(prefix="/negative-prompts", tags=["batches"])

EntryName = Annotated[str, Path(max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]


class NegativePromptIn(RequestModel):
    text: str = Field(min_length=1, max_length=5000)


class NegativePromptOut(ApiModel):
    name: str
    text: str
    created_at: datetime
    updated_at: datetime


class NegativePromptList(ApiModel):
    items: list[NegativePromptOut]


def _out(row: Any) -> NegativePromptOut:
    return NegativePromptOut(
        name=row["name"],
        text=row["text"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


@router.get("", response_model=NegativePromptList, summary="The negative prompt library")
async def list_entries(runtime: RuntimeDep, principal: CanRead) -> Response:
    rows = await runtime.db.run(store.list_entries, runtime.db, principal.workspace_id)
    return json_response(NegativePromptList(items=[_out(r) for r in rows]))


@router.put(
    "/{name}",
    response_model=NegativePromptOut,
    summary="Create or replace a named negative prompt",
    responses={201: {"model": NegativePromptOut, "description": "Created"}},
)
async def put_entry(
    runtime: RuntimeDep, principal: CanWrite, name: EntryName, body: NegativePromptIn
) -> Response:
    created = await runtime.db.run(
        store.put_entry, runtime.db, principal.workspace_id, name, body.text, datetime.now(UTC)
    )
    row = await runtime.db.run(store.get_entry, runtime.db, principal.workspace_id, name)
    return json_response(_out(row), status_code=201 if created else 200)


@router.get(
    "/{name}",
    response_model=NegativePromptOut,
    summary="One named negative prompt",
    responses={404: {"description": "No such entry"}},
)
async def get_entry(runtime: RuntimeDep, principal: CanRead, name: EntryName) -> Response:
    row = await runtime.db.run(store.get_entry, runtime.db, principal.workspace_id, name)
    return json_response(_out(row))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a named negative prompt (batches already started keep its text)",
    responses={404: {"description": "No such entry"}},
)
async def delete_entry(runtime: RuntimeDep, principal: CanWrite, name: EntryName) -> Response:
    await runtime.db.run(store.delete_entry, runtime.db, principal.workspace_id, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
