"""Dependencies routes declare: the runtime of this process and the base URL for links."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from imagegraph.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_base_url(request: Request) -> str:
    runtime: Runtime = request.app.state.runtime
    return runtime.settings.public_url or str(request.base_url)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]
LimitQuery = Annotated[int, Query(ge=1, le=200, description="Page size.")]
# Integers that reach the database are bounded by what its columns hold.
MAX_VERSION = 2**31 - 1
MAX_ID = 2**63 - 1
CursorQuery = Annotated[
    str | None,
    Query(
        max_length=64, pattern=r"^[A-Za-z0-9_]+$", description="`nextCursor` of the previous page."
    ),
]
