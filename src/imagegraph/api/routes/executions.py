"""`/workflows/executions`: poll, inspect, stream, cancel and list executions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import RowMapping
from sse_starlette import EventSourceResponse

from imagegraph.api.auth import CanExecute, CanRead
from imagegraph.api.deps import MAX_ID, BaseUrlDep, CursorQuery, LimitQuery, RuntimeDep
from imagegraph.api.schemas import (
    CancelResponse,
    ExecutionList,
    ExecutionOut,
    ExecutionSummary,
    NodeRunOut,
    OutputOut,
    PollOut,
    ProviderRunOut,
    Totals,
    asset_url,
    json_response,
    output_out,
)
from imagegraph.engine import queries
from imagegraph.engine.events import Event
from imagegraph.engine.states import TERMINAL_EXECUTION, ExecutionStatus, RunState
from imagegraph.runtime import Runtime
from imagegraph.store import assets as asset_store
from imagegraph.store import executions as store

router = APIRouter(prefix="/workflows/executions", tags=["executions"])

MAX_WAIT_SECONDS = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+)")
PreferHeader = Annotated[
    str | None,
    Header(
        description="`wait=N` (RFC 7240): hold the response up to N seconds (at most 60) "
        "until the execution ends."
    ),
]


def _prefer_wait(prefer: str | None) -> int:
    if not prefer:
        return 0
    match = _PREFER_WAIT.search(prefer)
    return min(int(match.group(1)), MAX_WAIT_SECONDS) if match else 0


@router.get("", response_model=ExecutionList, summary="List executions, newest first")
async def list_executions(
    runtime: RuntimeDep,
    principal: CanRead,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
    workflow_id: Annotated[str | None, Query(alias="workflowId", max_length=64)] = None,
    status: Annotated[ExecutionStatus | None, Query()] = None,
) -> ExecutionList:
    rows = await runtime.db.run(
        store.list_executions,
        runtime.db,
        principal.workspace_id,
        limit=limit,
        cursor=cursor,
        workflow_id=workflow_id,
        status=status.value if status else None,
    )
    items = [
        ExecutionSummary(
            execution_id=r["id"],
            workflow_id=r["workflow_id"],
            workflow_version=r["workflow_version"],
            status=r["status"],
            created_at=r["created_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            credits=r["credits"],
            error=r["error"],
        )
        for r in rows
    ]
    next_cursor = items[-1].execution_id if len(items) == limit else None
    return ExecutionList(items=items, next_cursor=next_cursor)


@router.get("/{execution_id}/poll", response_model=PollOut, summary="Status and outputs")
async def poll_execution(
    runtime: RuntimeDep,
    principal: CanRead,
    base_url: BaseUrlDep,
    execution_id: str,
    prefer: PreferHeader = None,
) -> Response:
    headers = {}
    wait = _prefer_wait(prefer)
    if wait:
        # 404 if the workspace has no such execution
        await runtime.engine.wait(execution_id, max_wait=wait, workspace_id=principal.workspace_id)
        headers["Preference-Applied"] = f"wait={wait}"
    row, outputs = await runtime.db.run(
        store.poll_view, runtime.db, principal.workspace_id, execution_id
    )
    status = ExecutionStatus(row["status"])
    if status not in TERMINAL_EXECUTION:
        headers["Retry-After"] = "1"
    body = PollOut(
        execution_id=execution_id,
        status=status.value,
        outputs=[output_out(o, base_url) for o in outputs],
        error=row["error"],
    )
    return json_response(body, headers=headers)


@router.get("/{execution_id}", response_model=ExecutionOut, summary="The full record")
async def get_execution(
    runtime: RuntimeDep,
    principal: CanRead,
    base_url: BaseUrlDep,
    execution_id: str,
    response: Response,
) -> ExecutionOut:
    row, runs = await runtime.db.run(
        store.get_execution, runtime.db, principal.workspace_id, execution_id
    )
    outputs = await runtime.db.run(asset_store.execution_outputs, runtime.db, execution_id)
    if ExecutionStatus(row["status"]) not in TERMINAL_EXECUTION:
        response.headers["Retry-After"] = "1"
    return execution_out(row, runs, [output_out(o, base_url) for o in outputs], base_url)


def execution_out(
    row: Mapping[str, Any] | RowMapping, runs: list[Any], outputs: list[OutputOut], base_url: str
) -> ExecutionOut:
    labels = {
        n["id"]: (n.get("data") or {}).get("label") for n in (row["graph"] or {}).get("nodes", [])
    }
    nodes = [
        NodeRunOut(
            node_id=r["node_id"],
            node_type=r["node_type"],
            label=labels.get(r["node_id"]),
            status=r["state"],
            attempts=r["attempt"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            duration_ms=r["duration_ms"],
            credits=r["credits"],
            cached=r["cached"],
            progress=r["progress"],
            outputs=_with_urls(r["outputs"], base_url),
            error=r["error"],
            provider=_provider_run(r["provider_job"]),
            regenerations=r["regenerations"],
            adjust=r["adjust"],
        )
        for r in runs
    ]
    counts = dict.fromkeys(RunState, 0)
    for r in runs:
        counts[RunState(r["state"])] += 1
    totals = Totals(
        nodes=len(runs),
        pending=counts[RunState.PENDING] + counts[RunState.QUEUED],
        running=counts[RunState.RUNNING],
        succeeded=counts[RunState.SUCCEEDED],
        failed=counts[RunState.FAILED],
        skipped=counts[RunState.SKIPPED],
        cancelled=counts[RunState.CANCELLED],
        cached=sum(1 for r in runs if r["cached"]),
        attempts=sum(r["attempt"] for r in runs),
        credits=row["credits"],
        outputs=len(outputs),
    )
    duration = None
    if row["started_at"] and row["finished_at"]:
        duration = (row["finished_at"] - row["started_at"]).total_seconds() * 1000
    return ExecutionOut(
        execution_id=row["id"],
        workflow_id=row["workflow_id"],
        workflow_version=row["workflow_version"],
        status=row["status"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_ms=duration,
        inputs=row["inputs"] or {},
        error=row["error"],
        outputs=outputs,
        totals=totals,
        nodes=nodes,
    )


def _provider_run(record: Mapping[str, Any] | None) -> ProviderRunOut | None:
    """The route record a hosted-model node keeps (its provider URLs are left out)."""
    if not record or "provider" not in record:
        return None
    job = record.get("job") or {}
    return ProviderRunOut(
        provider=record["provider"],
        model=record.get("model", ""),
        route=int(record.get("route", 0)),
        job_id=job.get("id"),
        skipped=list(record.get("skipped") or []),
        previous_attempt_in_doubt=bool(record.get("previousAttemptInDoubt")),
    )


def _with_urls(outputs: Mapping[str, Any] | None, base_url: str) -> dict[str, Any] | None:
    """Node outputs as recorded, with a download URL added to every image."""
    if outputs is None:
        return None

    def link(value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") == "image":
            return {**value, "url": asset_url(base_url, value["assetId"])}
        if isinstance(value, dict) and value.get("type") == "image_list":
            return {**value, "items": [link(v) for v in value.get("items", [])]}
        return value

    return {port: link(value) for port, value in outputs.items()}


@router.get(
    "/{execution_id}/events",
    summary="Live events (server-sent events)",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "One event per state change, then the stream ends.",
        }
    },
)
async def stream_events(
    runtime: RuntimeDep,
    principal: CanRead,
    execution_id: str,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="Resume after this event id.")
    ] = None,
) -> EventSourceResponse:
    # 404 unless the workspace has it
    await runtime.db.run(store.check_execution, runtime.db, principal.workspace_id, execution_id)
    start = after or 0
    if last_event_id and last_event_id.isdigit() and int(last_event_id) <= MAX_ID:
        start = int(last_event_id)
    return EventSourceResponse(
        _events(runtime, principal.workspace_id, execution_id, start), ping=15
    )


async def _events(
    runtime: Runtime, workspace_id: str, execution_id: str, after: int
) -> AsyncIterator[dict[str, str]]:
    """Recorded events from the database in id order; progress notices as they come. Ends
    after the event that ends the execution (at once if the client has seen it already)."""
    db, bus = runtime.db, runtime.engine.bus
    last = after
    poll = runtime.settings.poll_interval_seconds
    with bus.subscribe(execution_id) as subscription:
        read_db = True
        while True:
            if read_db:
                events = await db.run(queries.load_events, db, execution_id, last)
                for event in events:
                    last = event.id or last
                    yield _sse(event)
                    if event.terminal:
                        return
                if not events:
                    status = await db.run(queries.execution_status, db, workspace_id, execution_id)
                    if status in TERMINAL_EXECUTION:
                        return  # resumed after its last event: nothing more will come
            read_db = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    notice = await subscription.queue.get()
                    if not notice.recorded:
                        yield _sse(notice)
                        read_db = False


def _sse(event: Event) -> dict[str, str]:
    message = {"event": event.type, "data": json.dumps(event.to_json(), default=str)}
    if event.id is not None:
        message["id"] = str(event.id)
    return message


@router.post(
    "/{execution_id}/cancel",
    response_model=CancelResponse,
    summary="Cancel",
    responses={409: {"description": "The execution already ended"}},
)
async def cancel_execution(
    runtime: RuntimeDep, principal: CanExecute, execution_id: str
) -> CancelResponse:
    await runtime.engine.cancel(execution_id, principal.workspace_id)
    return CancelResponse(execution_id=execution_id, status=ExecutionStatus.CANCELLED.value)
