"""`/webhooks`: endpoints that hear about executions, and the log of what was sent (admin)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Response, status

from imagegraph.api.auth import IsAdmin
from imagegraph.api.deps import CursorQuery, LimitQuery, RuntimeDep
from imagegraph.api.idempotency import (
    IdempotencyDep,
    idempotent,
)
from imagegraph.api.schemas import (
    AttemptOut,
    DeliveryList,
    DeliveryOut,
    EndpointCreate,
    EndpointList,
    EndpointOut,
    EndpointUpdate,
    SecretOut,
    json_response,
)
from imagegraph.store import webhooks as store
from imagegraph.store.workspaces import new_webhook_secret

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def _endpoint_out(endpoint: store.Endpoint, *, secret: bool = False) -> EndpointOut:
    return EndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        events=list(endpoint.events),
        description=endpoint.description,
        enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
        secret=endpoint.secret if secret else None,
    )


def _delivery_out(row: dict[str, Any]) -> DeliveryOut:
    return DeliveryOut(
        id=row["id"],
        endpoint_id=row["endpoint_id"],
        url=row["url"],
        event_type=row["event_type"],
        payload=row["payload"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        delivered_at=row["delivered_at"],
        attempt_log=[
            AttemptOut(
                attempt=a["attempt"],
                status_code=a["status_code"],
                error=a["error"],
                duration_ms=a["duration_ms"],
                created_at=a["created_at"],
            )
            for a in row["attempt_log"]
        ],
    )


@router.post(
    "/endpoints",
    status_code=status.HTTP_201_CREATED,
    response_model=EndpointOut,
    summary="Register an endpoint for execution events",
)
async def create_endpoint(
    runtime: RuntimeDep,
    principal: IsAdmin,
    body: EndpointCreate,
    idempotency: IdempotencyDep,
) -> Response:
    await runtime.webhooks.check_url(body.url)

    async def create() -> Response:
        endpoint = await runtime.db.run(
            store.create_endpoint,
            runtime.db,
            principal.workspace_id,
            body.url,
            sorted(set(body.events)),
            body.description,
            new_webhook_secret(),
            datetime.now(UTC),
        )
        return json_response(
            _endpoint_out(endpoint, secret=True),
            status_code=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/webhooks/endpoints/{endpoint.id}"},
        )

    return await idempotent(idempotency, create)


@router.get("/endpoints", response_model=EndpointList, summary="Registered endpoints")
async def list_endpoints(runtime: RuntimeDep, principal: IsAdmin) -> EndpointList:
    found = await runtime.db.run(store.list_endpoints, runtime.db, principal.workspace_id)
    return EndpointList(items=[_endpoint_out(e) for e in found])


@router.get(
    "/endpoints/{endpoint_id}", response_model=EndpointOut, summary="An endpoint, with its secret"
)
async def get_endpoint(runtime: RuntimeDep, principal: IsAdmin, endpoint_id: str) -> EndpointOut:
    endpoint = await runtime.db.run(
        store.get_endpoint, runtime.db, principal.workspace_id, endpoint_id
    )
    return _endpoint_out(endpoint, secret=True)


@router.patch(
    "/endpoints/{endpoint_id}",
    response_model=EndpointOut,
    summary="Change an endpoint (url, events, description, enabled)",
)
async def update_endpoint(
    runtime: RuntimeDep, principal: IsAdmin, endpoint_id: str, body: EndpointUpdate
) -> EndpointOut:
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "url" in changes:
        await runtime.webhooks.check_url(changes["url"])
    if "events" in changes:
        changes["events"] = sorted(set(changes["events"]))
    endpoint = await runtime.db.run(
        store.update_endpoint, runtime.db, principal.workspace_id, endpoint_id, changes
    )
    return _endpoint_out(endpoint)


@router.delete(
    "/endpoints/{endpoint_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an endpoint (its delivery log stays)",
)
async def delete_endpoint(runtime: RuntimeDep, principal: IsAdmin, endpoint_id: str) -> Response:
    await runtime.db.run(store.delete_endpoint, runtime.db, principal.workspace_id, endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/endpoints/{endpoint_id}/deliveries",
    response_model=DeliveryList,
    summary="What was sent to an endpoint, newest first, with every attempt",
)
async def endpoint_deliveries(
    runtime: RuntimeDep,
    principal: IsAdmin,
    endpoint_id: str,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> DeliveryList:
    rows = await runtime.db.run(
        store.list_deliveries,
        runtime.db,
        principal.workspace_id,
        endpoint_id=endpoint_id,
        limit=limit,
        cursor=cursor,
    )
    items = [_delivery_out(r) for r in rows]
    return DeliveryList(items=items, next_cursor=items[-1].id if len(items) == limit else None)


@router.get(
    "/deliveries",
    response_model=DeliveryList,
    summary="Every delivery of the workspace (endpoints and executions' webhookUrl)",
)
async def list_deliveries(
    runtime: RuntimeDep, principal: IsAdmin, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> DeliveryList:
    rows = await runtime.db.run(
        store.list_deliveries, runtime.db, principal.workspace_id, limit=limit, cursor=cursor
    )
    items = [_delivery_out(r) for r in rows]
    return DeliveryList(items=items, next_cursor=items[-1].id if len(items) == limit else None)


@router.get("/deliveries/{delivery_id}", response_model=DeliveryOut, summary="A delivery")
async def get_delivery(runtime: RuntimeDep, principal: IsAdmin, delivery_id: str) -> DeliveryOut:
    row = await runtime.db.run(store.get_delivery, runtime.db, principal.workspace_id, delivery_id)
    return _delivery_out(row)


@router.post(
    "/deliveries/{delivery_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryOut,
    summary="Send a delivered or failed delivery again (same webhook-id)",
    responses={409: {"description": "Still being delivered, or its endpoint is disabled"}},
)
async def replay_delivery(runtime: RuntimeDep, principal: IsAdmin, delivery_id: str) -> Response:
    row = await runtime.db.run(
        store.replay_delivery, runtime.db, principal.workspace_id, delivery_id, datetime.now(UTC)
    )
    runtime.webhooks.wake()
    return json_response(_delivery_out(row), status_code=status.HTTP_202_ACCEPTED)


@router.get(
    "/secret",
    response_model=SecretOut,
    summary="The secret that signs deliveries to executions' own webhookUrl",
)
async def workspace_secret(runtime: RuntimeDep, principal: IsAdmin) -> SecretOut:
    secret = await runtime.db.run(store.workspace_secret, runtime.db, principal.workspace_id)
    return SecretOut(secret=secret)
