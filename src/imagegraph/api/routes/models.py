"""`/models` (the catalog of hosted models, and which of their routes this server can use)
and `/providers/{provider}/webhook` (providers announcing finished jobs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from pydantic import Field

from imagegraph.api.auth import CanRead
from imagegraph.api.deps import RuntimeDep
from imagegraph.api.schemas import ApiModel
from imagegraph.errors import NotFound, Unauthorized
from imagegraph.nodes.catalog import CatalogNode
from imagegraph.providers.base import ProviderError
from imagegraph.providers.hub import ProviderHub

router = APIRouter(tags=["models"])
public_router = APIRouter(tags=["models"])
MAX_WEBHOOK_BYTES = 1024 * 1024


class RouteOut(ApiModel):
    provider: str
    model: str
    version: str | None = None
    configured: bool = Field(description="Whether this server has the provider's key.")
    circuit: str = Field(description="closed, open (being skipped) or half_open.")
    key_variable: str = Field(description="The environment variable of the provider's key.")


class ModelOut(ApiModel):
    type: str = Field(description="The node type: use it as a node's data.nodeType.")
    title: str
    description: str
    operation: str
    price: dict[str, float] = Field(description="Credits: perImage, or perMegapixel and minimum.")
    params: dict[str, Any] = Field(description="JSON schema of the node's params.")
    routes: list[RouteOut]
    available: bool = Field(description="Whether at least one route is configured.")


def model_entries(hub: ProviderHub, nodes: list[CatalogNode]) -> list[ModelOut]:
    entries = []
    for node in nodes:
        routes = [
            RouteOut(
                provider=route.provider,
                model=route.model,
                version=route.version,
                configured=hub.configured(route.provider),
                circuit=hub.breaker(route).state,
                key_variable=hub.key_hint(route.provider),
            )
            for route in node.routes
        ]
        price = node.spec.price.model_dump(by_alias=True, exclude_none=True)
        entries.append(
            ModelOut(
                type=node.type,
                title=node.title,
                description=node.description,
                operation=node.spec.operation,
                price=price,
                params=node.params_model.model_json_schema(by_alias=True),
                routes=routes,
                available=any(r.configured for r in routes),
            )
        )
    return entries


@router.get("/models", response_model=list[ModelOut], summary="Hosted models and their routes")
async def list_models(runtime: RuntimeDep, principal: CanRead) -> list[ModelOut]:
    nodes = [node for node in runtime.registry if isinstance(node, CatalogNode)]
    return model_entries(runtime.providers, nodes)


class WebhookAck(ApiModel):
    received: bool
    job_id: str
    polling: bool = Field(description="Whether a node run of this server was waiting for it.")


@public_router.post(
    "/providers/{provider}/webhook",
    status_code=status.HTTP_200_OK,
    response_model=WebhookAck,
    summary="A provider announces a finished job (signature checked; no API key)",
    responses={401: {"description": "The signature does not verify"}},
)
async def provider_webhook(runtime: RuntimeDep, provider: str, request: Request) -> WebhookAck:
    hub = runtime.providers
    if provider not in hub.providers or not hub.configured(provider):
        raise NotFound(f"no configured provider {provider!r}")
    body = await request.body()
    if len(body) > MAX_WEBHOOK_BYTES:
        raise Unauthorized("webhook body too large")
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        job_id = await hub.adapter(provider).verify_webhook(headers, body)
    except ProviderError as exc:
        raise Unauthorized(f"{provider} webhook refused: {exc.message}") from None
    # The webhook only wakes the run polling the job; the result itself is always read
    # through the API, so a forged or replayed call can do no more than an early poll.
    polling = hub.notify(provider, job_id)
    return WebhookAck(received=True, job_id=job_id, polling=polling)
