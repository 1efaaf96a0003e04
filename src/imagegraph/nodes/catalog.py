"""Node types served by hosted models, one per catalog entry (`generate:flux_2_pro`, ...).

A run of such a node:
1. builds a provider `Request` from its params and inputs, and refuses a prompt the
   server's policy blocks (before anything is paid for);
2. takes the first route of the catalog entry whose provider is configured and whose
   circuit is closed (or resumes the provider job an earlier, interrupted attempt
   recorded: a job is recorded the moment the provider accepts it, so a crash never makes
   us pay for a second one);
3. waits for a slot of the provider's admission limit, submits, and on a 429 pauses the
   whole provider for its Retry-After and submits again (throttling never fails a node);
4. watches the job on its status stream where the provider has one, else polls it (waking
   early when the provider's webhook announces it), downloads the images at once (provider
   URLs expire within minutes) and stores them as assets with provider, model, version,
   request id, seed and reported cost.

Failures become node errors the engine knows how to treat: `content_blocked` (never
retried), transient ones (retried with backoff, within the provider's retry budget), and
the rest (not retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model

from imagegraph.catalog import PARAM_TYPES, ModelSpec, ParamSpec
from imagegraph.errors import Issue, NodeError, TransientNodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import (
    EXECUTION_CANCELLED,
    SANDBOX_TYPE,
    Inputs,
    Node,
    NodeContext,
    NodeParams,
    Outputs,
)
from imagegraph.nodes.values import ImageValue
from imagegraph.providers.base import (
    Adapter,
    Image,
    Job,
    ProviderError,
    Request,
    Result,
    Route,
    SourceImage,
)
from imagegraph.providers.hub import Chosen, NoRoute, ProviderHub

MAX_SEED = 2**32 - 1
# How often a job is polled: soon after submission, then less and less often.
FIRST_POLL_SECONDS = 0.1
POLL_GROWTH = 1.5
MAX_POLL_SECONDS = 2.0
# With a webhook announcing the end, polling is only the safety net.
MAX_POLL_SECONDS_WITH_WEBHOOK = 10.0
# How long one watch (a provider's status stream) is held open before it is opened again.
WATCH_SECONDS = 30.0
# Poll errors in a row (the job may well be fine) before the attempt gives up.
MAX_POLL_ERRORS = 8
CANCEL_SECONDS = 5.0
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
_FIELD_NAMES = {
    "numImages": "num_images",
    "outputFormat": "output_format",
    "safetyTolerance": "safety_tolerance",
}


class CatalogParams(NodeParams):
    """Params of a catalog node; fields the model does not take are kept and reported by
    `check` with a clear message, instead of pydantic's generic one."""

    model_config = ConfigDict(
        extra="allow",
        alias_generator=NodeParams.model_config.get("alias_generator"),
        populate_by_name=True,
        frozen=True,
    )


def params_model(spec: ModelSpec) -> type[CatalogParams]:
    fields: dict[str, Any] = {}
    for name, param in spec.params.items():
        field_name = _FIELD_NAMES.get(name, name)
        annotation: Any = PARAM_TYPES[name]
        if param.choices:
            annotation = Literal[tuple(param.choices)]
        if name == "seed":
            annotation = int | None
            fields[field_name] = (
                annotation,
                Field(
                    default=None,
                    ge=int(param.min or 0),
                    le=int(param.max or MAX_SEED),
                    description="Fixed seed; empty lets the model pick.",
                ),
            )
            continue
        fields[field_name] = (annotation, _field(name, param))
    model: type[CatalogParams] = create_model(
        f"{_class_name(spec.type)}Params", __base__=CatalogParams, **fields
    )
    return model


def _field(name: str, param: ParamSpec) -> Any:
    extra: dict[str, Any] = {}
    if param.min is not None:
        extra["ge"] = param.min
    if param.max is not None:
        extra["le"] = param.max
    if param.multiple_of is not None:
        extra["multiple_of"] = param.multiple_of
    default = param.default
    if default is None and name in ("width", "height"):
        default = 1024
    return Field(default=default, description=param.description, **extra)


def _class_name(node_type: str) -> str:
    return "".join(part.capitalize() for part in node_type.replace(":", "_").split("_"))


class CatalogNode(Node[CatalogParams]):
    """A node type made from a catalog entry."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.type = spec.type
        self.version = spec.version
        self.title = spec.title
        self.description = spec.description
        self.params_model = params_model(spec)
        self.routes = tuple(spec.routes_resolved)
        self.inputs = _inputs(spec)
        self.outputs = (
            (OutputPort("image", PortType.IMAGE), OutputPort("images", PortType.IMAGE_LIST))
            if spec.operation in ("generate", "edit")
            else (OutputPort("image", PortType.IMAGE),)
        )

    @property
    def model_name(self) -> str:
        """The model, as usage reports name it: the node type without its category."""
        return self.type.split(":", 1)[1]

    def check(self, params: CatalogParams) -> list[Issue]:
        unknown = sorted((params.model_extra or {}).keys())
        if not unknown:
            return []
        takes = ", ".join(self.spec.params) or "no params"
        return [
            Issue(
                "unsupported_param",
                f"{self.type} does not take {name!r} (it takes: {takes})",
                field=f"params.{name}",
            )
            for name in unknown
        ]

    def is_cacheable(self, params: CatalogParams, inputs: Inputs) -> bool:
        if "seed" in self.spec.params and self.spec.operation in ("generate", "edit"):
            return getattr(params, "seed", None) is not None  # a random seed wants a new image
        return True

    def price(self, params: CatalogParams) -> float:
        return self.spec.price_of(
            getattr(params, "width", None),
            getattr(params, "height", None),
            int(getattr(params, "num_images", 1) or 1),
        )

    def model(self, params: CatalogParams) -> str:
        return self.model_name

    def test_stand_in(self, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """Test keys never reach a provider: generations run on the sandbox, upscales on
        Lanczos, background removal passes the image through."""
        operation = self.spec.operation
        if operation == "upscale":
            factor = params.get("scale", 2)
            return "upscale:lanczos", {"factor": factor if factor in (2, 4) else 2}
        if operation == "remove_background":
            return "convert:format", {"format": "png"}
        kept: dict[str, Any] = {}
        for name in ("width", "height"):
            value = params.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                kept[name] = min(max(value, 64), 2048)
        if isinstance(params.get("seed"), int):
            kept["seed"] = params["seed"]
        return SANDBOX_TYPE, kept

    async def run(self, ctx: NodeContext, params: CatalogParams, inputs: Inputs) -> Outputs:
        hub = ctx.providers
        request = self._request(ctx, params, inputs)
        blocked = hub.policy.violation(request.prompt) or hub.policy.violation(
            request.negative_prompt
        )
        if blocked:
            raise NodeError(
                f"refused by this server's prompt policy: {blocked}",
                code="content_blocked",
                source="prompt_policy",
            )
        result, chosen, job = await _serve(ctx, hub, self.spec, request)
        return await self._store(ctx, hub, chosen, request, result, job, inputs)

    def _request(self, ctx: NodeContext, params: CatalogParams, inputs: Inputs) -> Request:
        def value(name: str) -> Any:
            return getattr(params, _FIELD_NAMES.get(name, name), None)

        def source(image: Any) -> SourceImage | None:
            if not isinstance(image, ImageValue):
                return None
            return SourceImage(
                ctx.read_bytes(image),
                _MIME.get(image.format, f"image/{image.format}"),
                image.width,
                image.height,
            )

        prompt = inputs.get("prompt")
        negative = inputs.get("negativePrompt")
        return Request(
            prompt=str(prompt).strip() if prompt is not None else None,
            negative_prompt=str(negative).strip() or None if negative is not None else None,
            width=value("width"),
            height=value("height"),
            seed=value("seed"),
            steps=value("steps"),
            guidance=value("guidance"),
            num_images=int(value("numImages") or 1),
            output_format=value("outputFormat"),
            safety_tolerance=value("safetyTolerance"),
            image=source(inputs.get("image")),
            mask=source(inputs.get("mask")),
            scale=value("scale"),
        )

    async def _store(
        self,
        ctx: NodeContext,
        hub: ProviderHub,
        chosen: Chosen,
        request: Request,
        result: Result,
        job: Job | None,
        inputs: Inputs,
    ) -> Outputs:
        if not result.images:
            raise TransientNodeError(
                f"{chosen.route.label} answered without an image",
                code="provider_malformed",
                provider=chosen.route.provider,
            )
        route = chosen.route
        parents = [inputs[p] for p in ("image", "mask") if isinstance(inputs.get(p), ImageValue)]
        generation = {
            "prompt": request.prompt,
            "negativePrompt": request.negative_prompt,
            "seed": result.seed if result.seed is not None else request.seed,
            "model": self.model_name,
            "nodeType": self.type,
            "provider": route.provider,
            "providerModel": route.model,
            "modelVersion": result.model_version or route.version,
            "providerRequestId": result.request_id or (job.id if job else None),
            "providerCost": result.cost,
            "providerCostUnit": result.cost_unit,
            "route": chosen.index,
            "fallbackFrom": [label for label, _ in chosen.skipped] or None,
            "params": _jsonable_request(request),
            "details": dict(result.details),
            "nodeId": ctx.node_id,
        }
        if parents and isinstance(parents[0], ImageValue):
            generation["sourceAsset"] = parents[0].asset_id
        stored = []
        for image in result.images:
            data = await _bytes_of(hub, route, image)
            stored.append(
                await ctx.run_cpu(
                    lambda data=data: ctx.store_image(data, parents=parents, generation=generation)
                )
            )
        outputs: Outputs = {"image": stored[0]}
        if self.spec.operation in ("generate", "edit"):
            outputs["images"] = stored
        return outputs


def _inputs(spec: ModelSpec) -> tuple[InputPort, ...]:
    ports: list[InputPort] = []
    if spec.operation in ("edit", "upscale", "remove_background"):
        ports.append(InputPort("image", PortType.IMAGE))
    if spec.takes_prompt:
        ports.append(InputPort("prompt", PortType.TEXT, required=spec.operation != "upscale"))
    if spec.negative_prompt:
        ports.append(InputPort("negativePrompt", PortType.TEXT, required=False))
    if spec.mask:
        ports.append(
            InputPort("mask", PortType.MASK, required=False, accepts=frozenset({PortType.IMAGE}))
        )
    return tuple(ports)


def _jsonable_request(request: Request) -> dict[str, Any]:
    fields = {
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance": request.guidance,
        "numImages": request.num_images,
        "outputFormat": request.output_format,
        "safetyTolerance": request.safety_tolerance,
        "scale": request.scale,
    }
    return {k: v for k, v in fields.items() if v is not None}


async def _bytes_of(hub: ProviderHub, route: Route, image: Image) -> bytes:
    if image.data is not None:
        return image.data
    if image.url is None:
        raise TransientNodeError(
            f"{route.label} returned an image without data or URL",
            code="provider_malformed",
            provider=route.provider,
        )
    try:
        return await hub.download(route.provider, image.url)
    except TransientNodeError:
        raise
    except NodeError as exc:
        raise NodeError(
            f"{route.label}'s result could not be downloaded ({exc.message}); its URL may "
            "have expired",
            code="result_expired",
            provider=route.provider,
        ) from None


# -- serving a request -----------------------------------------------------------------------


async def _serve(
    ctx: NodeContext, hub: ProviderHub, spec: ModelSpec, request: Request
) -> tuple[Result, Chosen, Job | None]:
    """The provider's result, from a job resumed or a route chosen now."""
    saved = ctx.provider_job
    if saved and saved.get("job"):
        chosen = _chosen_from(saved, spec)
        job = Job.from_json(saved["job"])
        adapter = hub.adapter(chosen.route.provider)
        async with _slot(hub, chosen.route.provider):
            result = await _finish(ctx, hub, adapter, chosen, job)
        return result, chosen, job
    try:
        chosen = hub.choose(spec.type, spec.routes_resolved)
    except NoRoute as exc:
        if exc.retry_in is None:
            raise NodeError(exc.message, code="provider_not_configured") from None
        raise TransientNodeError(
            exc.message, code="provider_circuit_open", retry_after=exc.retry_in
        ) from None
    route = chosen.route
    adapter = hub.adapter(route.provider)
    record: dict[str, Any] = {
        "provider": route.provider,
        "model": route.model,
        "route": chosen.index,
        "skipped": [{"route": label, "reason": why} for label, why in chosen.skipped],
        "startedAt": time.time(),
        "job": None,
    }
    if saved:
        # An earlier attempt was cut off during a synchronous call: whether the provider
        # did (and charged) that work cannot be known. Said in the record.
        record["previousAttemptInDoubt"] = True
    async with _slot(hub, route.provider):
        if ctx.attempt == 1:
            # Counted when the call goes out, so the budget grows with the real traffic
            # (not with a queue of nodes waiting for a slot, which its cap would cut off).
            hub.budget(route.provider).first_attempt()
        started = await _submit(ctx, hub, adapter, route, request, record)
        if isinstance(started, Result):
            hub.breaker(route).success()
            hub.limiter(route.provider).succeeded()
            return started, chosen, None
        result = await _finish(ctx, hub, adapter, chosen, started)
        return result, chosen, started


@contextlib.asynccontextmanager
async def _slot(hub: ProviderHub, provider: str) -> Any:
    async with hub.limiter(provider).slot():
        yield


async def _submit(
    ctx: NodeContext,
    hub: ProviderHub,
    adapter: Adapter,
    route: Route,
    request: Request,
    record: dict[str, Any],
) -> Job | Result:
    """Submit, waiting out 429s (the whole provider pauses for their Retry-After)."""
    limiter = hub.limiter(route.provider)
    await ctx.save_provider_job(record)  # intent: the record shows the route even mid-call
    while True:
        try:
            started = await adapter.start(
                route, request, webhook_url=hub.webhook_url(route.provider)
            )
        except ProviderError as exc:
            if exc.kind == "rate_limited":
                pause = limiter.throttled(exc.retry_after)
                ctx.progress(0.0, f"{route.provider} is throttling; waiting {pause:g} s")
                await limiter.pace()
                continue
            _count_failure(hub, route, exc)
            error = _node_error(exc, route)
            if exc.kind == "timeout":
                # The request may have reached the provider: the next attempt says so.
                error.extra["submitInDoubt"] = True
            raise error from None
        break
    if isinstance(started, Job):
        # Accepted: the provider is answering. Counted now, not when the job ends a minute
        # later, or a burst of submits with a few 503s in it reads as failures in a row.
        hub.breaker(route).success()
        await ctx.save_provider_job({**record, "job": started.to_json()})
    return started


async def _finish(
    ctx: NodeContext, hub: ProviderHub, adapter: Adapter, chosen: Chosen, job: Job
) -> Result:
    """Poll an accepted job until it ends; cancel it if the execution is cancelled."""
    route = chosen.route
    waiter = hub.waiter(route.provider, job.id)
    ceiling = (
        MAX_POLL_SECONDS_WITH_WEBHOOK if hub.webhook_url(route.provider) else (MAX_POLL_SECONDS)
    )
    # A job announced by webhook is polled now and then; otherwise it is watched on the
    # provider's status stream if it has one (one held connection per job).
    watching = adapter.watches and not hub.webhook_url(route.provider)
    delay = FIRST_POLL_SECONDS
    errors = 0
    try:
        while True:
            if not watching or errors:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await waiter.wait()
                waiter.clear()
            try:
                if watching:
                    outcome = await adapter.watch(job, WATCH_SECONDS)
                else:
                    outcome = await adapter.poll(job)
            except ProviderError as exc:
                if exc.retryable and errors < MAX_POLL_ERRORS:
                    errors += 1  # the job itself may be fine: ask again later
                    delay = min(ceiling, max(delay * POLL_GROWTH, exc.retry_after or 0.0))
                    continue
                _count_failure(hub, route, exc)
                raise _node_error(exc, route) from None
            errors = 0
            if isinstance(outcome, Result):
                hub.breaker(route).success()
                hub.limiter(route.provider).succeeded()
                return outcome
            if outcome.progress is not None:
                ctx.progress(outcome.progress, f"{route.provider}: {outcome.status}")
            delay = min(ceiling, delay * POLL_GROWTH)
    except asyncio.CancelledError as cancelled:
        if cancelled.args == (EXECUTION_CANCELLED,) and adapter.supports_cancel:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CANCEL_SECONDS):
                    await asyncio.shield(adapter.cancel(job))
        raise
    finally:
        hub.forget_waiter(route.provider, job.id)


def _count_failure(hub: ProviderHub, route: Route, exc: ProviderError) -> None:
    """Failures that say something about the provider's health open its circuit; refusals
    of this request (moderation, a bad parameter) and throttling do not."""
    if exc.retryable or exc.kind == "failed":
        hub.breaker(route).failure()


def _node_error(exc: ProviderError, route: Route) -> NodeError:
    where = f"{route.label}: {exc.message}"
    extra: dict[str, Any] = {"provider": route.provider, "providerModel": route.model}
    if exc.provider_code:
        extra["providerCode"] = exc.provider_code
    if exc.request_id:
        extra["providerRequestId"] = exc.request_id
    if exc.status is not None:
        extra["providerStatus"] = exc.status
    if exc.kind == "content_blocked":
        return NodeError(
            f"blocked by {route.provider}'s moderation: {where}", "content_blocked", **extra
        )
    if exc.retryable or exc.kind == "failed":
        return TransientNodeError(
            where, f"provider_{exc.kind}", retry_after=exc.retry_after, **extra
        )
    return NodeError(where, f"provider_{exc.kind}", **extra)


def _chosen_from(saved: Mapping[str, Any], spec: ModelSpec) -> Chosen:
    routes = spec.routes_resolved
    index = int(saved.get("route", 0))
    if 0 <= index < len(routes) and routes[index].provider == saved.get("provider"):
        route = routes[index]
    else:  # the catalog changed since: serve from what was recorded
        route = Route(str(saved["provider"]), str(saved["model"]))
    skipped = tuple((s["route"], s["reason"]) for s in saved.get("skipped") or ())
    return Chosen(index, route, skipped)
