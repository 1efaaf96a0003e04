"""Public triggers: a URL that starts a workflow with no API key, for forms, no-code tools
and other services' webhooks.

The trigger id is the credential (192 random bits), so it is shown only to the workspace,
never written in full to logs, and can be disabled or rotated at any time. Calls are rate
limited per trigger and count against the workspace's execution limits; executions run in
the mode of the key that made the trigger (a test key's trigger never costs credits).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response, status

from imagegraph.api.auth import CanRead, CanWrite
from imagegraph.api.deps import BaseUrlDep, RuntimeDep
from imagegraph.api.idempotency import (
    HEADER,
    Idempotency,
    IdempotencyDep,
    fingerprint,
    idempotent,
)
from imagegraph.api.routes.workflows import submit
from imagegraph.api.schemas import (
    ExecuteResponse,
    TriggerList,
    TriggerOut,
    TriggerUpdate,
    json_response,
)
from imagegraph.errors import (
    ImagegraphError,
    InvalidInput,
    Issue,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from imagegraph.runtime import Runtime
from imagegraph.store import triggers as store
from imagegraph.store.triggers import Trigger

router = APIRouter(tags=["triggers"])
public_router = APIRouter(tags=["triggers"])

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, Retry-After, X-Request-Id, RateLimit, "
    "RateLimit-Policy, Idempotent-Replayed",
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": f"Content-Type, {HEADER}, webhook-id, X-Request-Id",
    "Access-Control-Max-Age": "86400",
}


def trigger_url(base_url: str, trigger_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v1/workflow/{trigger_id}/trigger"


def _out(trigger: Trigger, base_url: str) -> TriggerOut:
    return TriggerOut(
        webhook_id=trigger.id,
        url=trigger_url(base_url, trigger.id),
        workflow_id=trigger.workflow_id,
        mode=trigger.mode,
        enabled=trigger.enabled,
        created_at=trigger.created_at,
        last_used_at=trigger.last_used_at,
    )


@router.post(
    "/workflows/{workflow_id}/triggers",
    status_code=status.HTTP_201_CREATED,
    response_model=TriggerOut,
    summary="Make a public trigger URL for the workflow",
)
async def create_trigger(
    runtime: RuntimeDep,
    principal: CanWrite,
    base_url: BaseUrlDep,
    workflow_id: str,
    idempotency: IdempotencyDep,
) -> Response:
    async def create() -> Response:
        trigger = await runtime.db.run(
            store.create_trigger,
            runtime.db,
            principal.workspace_id,
            workflow_id,
            principal.mode,
            datetime.now(UTC),
        )
        return json_response(_out(trigger, base_url), status_code=status.HTTP_201_CREATED)

    return await idempotent(idempotency, create)


@router.get(
    "/workflows/{workflow_id}/triggers",
    response_model=TriggerList,
    summary="The workflow's public triggers",
)
async def list_triggers(
    runtime: RuntimeDep, principal: CanRead, base_url: BaseUrlDep, workflow_id: str
) -> TriggerList:
    found = await runtime.db.run(
        store.list_triggers, runtime.db, principal.workspace_id, workflow_id
    )
    return TriggerList(items=[_out(t, base_url) for t in found])


@router.patch(
    "/workflows/{workflow_id}/triggers/{webhook_id}",
    response_model=TriggerOut,
    summary="Enable or disable a trigger",
)
async def update_trigger(
    runtime: RuntimeDep,
    principal: CanWrite,
    base_url: BaseUrlDep,
    workflow_id: str,
    webhook_id: str,
    body: TriggerUpdate,
) -> TriggerOut:
    trigger = await runtime.db.run(
        store.set_enabled,
        runtime.db,
        principal.workspace_id,
        workflow_id,
        webhook_id,
        body.enabled,
    )
    return _out(trigger, base_url)


@router.post(
    "/workflows/{workflow_id}/triggers/{webhook_id}/rotate",
    response_model=TriggerOut,
    summary="Replace the trigger's id; the old URL stops working at once",
)
async def rotate_trigger(
    runtime: RuntimeDep,
    principal: CanWrite,
    base_url: BaseUrlDep,
    workflow_id: str,
    webhook_id: str,
    idempotency: IdempotencyDep,
) -> Response:
    async def rotate() -> Response:
        trigger = await runtime.db.run(
            store.rotate,
            runtime.db,
            principal.workspace_id,
            workflow_id,
            webhook_id,
            datetime.now(UTC),
        )
        return json_response(_out(trigger, base_url))

    return await idempotent(idempotency, rotate)


@router.delete(
    "/workflows/{workflow_id}/triggers/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a trigger",
)
async def delete_trigger(
    runtime: RuntimeDep, principal: CanWrite, workflow_id: str, webhook_id: str
) -> Response:
    await runtime.db.run(
        store.delete_trigger, runtime.db, principal.workspace_id, workflow_id, webhook_id
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@public_router.options(
    "/workflow/{webhook_id}/trigger",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="CORS preflight of a public trigger (any origin)",
    response_class=Response,
)
async def trigger_preflight(webhook_id: str) -> Response:
    return Response(status_code=status.HTTP_204_NO_CONTENT, headers=PREFLIGHT_HEADERS)


@public_router.post(
    "/workflow/{webhook_id}/trigger",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExecuteResponse,
    summary="Start the workflow of a public trigger (no API key)",
    description="The JSON body maps input node ids or labels to values, like `inputs` of "
    'an execute request (`{"inputs": {...}}` is accepted too). At most 1 MiB.',
    responses={
        402: {"description": "The workspace's credits do not cover the execution"},
        404: {"description": "No such trigger, or it is disabled"},
        409: {"description": "A request with this Idempotency-Key is still in progress"},
        413: {"description": "Body larger than the trigger limit"},
        415: {"description": "Body is not JSON"},
        429: {"description": "Too many calls of this trigger, or executions of the workspace"},
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def fire_trigger(runtime: RuntimeDep, webhook_id: str, request: Request) -> Response:
    try:
        response = await _fire(runtime, webhook_id, request)
    except ImagegraphError as exc:
        exc.headers.update(CORS_HEADERS)  # so a browser page can read why it failed
        raise
    response.headers.update(CORS_HEADERS)
    return response


async def _fire(runtime: Runtime, webhook_id: str, request: Request) -> Response:
    found = await runtime.db.run(store.find_enabled, runtime.db, webhook_id)
    if found is None:
        raise NotFound("no such trigger, or it is disabled")
    trigger, plan = found
    state = request.scope.setdefault("state", {})
    await runtime.limiter.count_trigger(
        state, trigger.id, runtime.settings.trigger_requests_per_minute
    )
    body = await _read_body(request, runtime.settings.trigger_max_body_bytes)
    inputs = _inputs(request, body)
    # A sender following Standard Webhooks names each event with webhook-id: de-duplicate.
    key = request.headers.get(HEADER) or request.headers.get("webhook-id")
    idempotency = Idempotency.of(
        runtime, trigger.workspace_id, key, fingerprint("POST", request.url.path, body)
    )
    if idempotency is not None:
        replay = await idempotency.replay()
        if replay is not None:
            return replay
    version, doc = await runtime.workflow_version(trigger.workspace_id, trigger.workflow_id)
    await runtime.limiter.count_execution(state, trigger.workspace_id, runtime.plan(plan))
    response = await submit(
        runtime,
        trigger.workspace_id,
        "test" if trigger.mode == "test" else "live",
        doc,
        workflow_id=trigger.workflow_id,
        workflow_version=version,
        inputs=inputs,
        idempotency=idempotency,
        status_code=status.HTTP_202_ACCEPTED,
    )
    await runtime.db.run(store.touch, runtime.db, trigger.id, datetime.now(UTC))
    return response


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"trigger bodies are limited to {limit} bytes", limitBytes=limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"trigger bodies are limited to {limit} bytes", limitBytes=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _inputs(request: Request, body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"trigger bodies must be JSON (Content-Type: application/json), not "
            f"{content_type or 'unspecified'}"
        )
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise InvalidInput(
            f"body is not valid JSON: {exc}", [Issue("invalid_json", str(exc), field="body")]
        ) from None
    if not isinstance(data, dict):
        raise InvalidInput(
            "the body must be a JSON object of input values",
            [Issue("invalid_field", "expected an object", field="body")],
        )
    if set(data) == {"inputs"} and isinstance(data["inputs"], dict):
        data = data["inputs"]
    return data
