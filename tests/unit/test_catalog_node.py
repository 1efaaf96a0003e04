"""Catalog nodes on a scripted adapter: routes, fallback, throttling, resumption, refusals.

The adapters themselves are tested against the provider fakes (tests/providers); here the
adapter is a script, so each rule of the runner can be shown exactly.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, ClassVar

import pytest
from PIL import Image

from imagegraph.catalog import load_catalog
from imagegraph.errors import NodeError, TransientNodeError
from imagegraph.nodes import registry_for
from imagegraph.nodes.base import EXECUTION_CANCELLED
from imagegraph.nodes.catalog import CatalogNode
from imagegraph.providers.base import (
    Adapter,
    Job,
    Pending,
    ProviderError,
    Request,
    Result,
    Route,
)
from imagegraph.providers.base import (
    Image as ProviderImage,
)
from imagegraph.providers.hub import ProviderHub
from imagegraph.settings import Settings
from imagegraph.testing import MemoryContext

CATALOG = load_catalog(None)


def png(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 220)).save(buffer, "PNG")
    return buffer.getvalue()


class Script(Adapter):
    """Answers from a list of steps shared by the class (one script per test)."""

    name = "script"
    supports_cancel = True
    steps: ClassVar[list[Any]] = []
    calls: ClassVar[list[tuple[str, float]]] = []
    cancelled: ClassVar[list[str]] = []
    started_requests: ClassVar[list[tuple[Route, Request]]] = []

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Job | Result:
        Script.calls.append((f"start:{route.provider}", time.monotonic()))
        Script.started_requests.append((route, request))
        step = self._next()
        assert not isinstance(step, Pending)
        return step

    async def poll(self, job: Job) -> Pending | Result:
        Script.calls.append((f"poll:{job.provider}", time.monotonic()))
        step = self._next()
        assert not isinstance(step, Job)
        return step

    async def cancel(self, job: Job) -> None:
        Script.cancelled.append(job.id)

    def _next(self) -> Job | Pending | Result:
        step = Script.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if step == "hang":
            return Pending("IN_PROGRESS")
        assert isinstance(step, Job | Pending | Result)
        return step


@pytest.fixture(autouse=True)
def fresh_script() -> None:
    Script.steps = []
    Script.calls = []
    Script.cancelled = []
    Script.started_requests = []


def hub_for(**settings: Any) -> ProviderHub:
    configured = {"fal_api_key": "k", "bfl_api_key": "k", "replicate_api_key": "k", **settings}
    adapters = dict.fromkeys(("fal", "bfl", "replicate"), f"{__name__}:Script")
    return ProviderHub(Settings(**configured), adapters=adapters)


def node(node_type: str = "generate:flux_2_pro") -> CatalogNode:
    found = registry_for(CATALOG)[node_type]
    assert isinstance(found, CatalogNode)
    return found


def job(provider: str = "bfl", job_id: str = "job-1") -> Job:
    return Job(provider, "flux-2-pro", job_id, {"polling": "https://api.bfl.ai/x"})


def result(**kw: Any) -> Result:
    return Result(images=[ProviderImage(data=png())], seed=kw.pop("seed", 5), **kw)


async def run(ctx: MemoryContext, node_type: str = "generate:flux_2_pro", **params: Any) -> Any:
    target = node(node_type)
    parsed = target.parse_params({"width": 1024, "height": 1024, **params})
    return await target.run(ctx.as_context(), parsed, {"prompt": "a glass teapot"})


async def test_the_first_configured_route_serves_and_the_job_is_recorded_before_polling() -> None:
    Script.steps = [job(), Pending("Pending"), result(request_id="req-9", model_version="v2")]
    ctx = MemoryContext(hub=hub_for())
    outputs = await run(ctx, seed=5)
    route, request = Script.started_requests[0]
    assert route.label == "bfl:flux-2-pro"
    assert (request.prompt, request.width, request.seed) == ("a glass teapot", 1024, 5)
    # First the intent (route, no job yet), then the accepted job, before any poll.
    assert [saved["job"] is None for saved in ctx.saved_jobs] == [True, False]
    assert ctx.saved_jobs[1]["job"]["id"] == "job-1"
    generation = outputs["image"].generation
    assert generation["provider"] == "bfl"
    assert generation["providerModel"] == "flux-2-pro"
    assert generation["model"] == "flux_2_pro"
    assert generation["providerRequestId"] == "req-9"
    assert generation["modelVersion"] == "v2"
    assert generation["seed"] == 5
    assert outputs["images"] == [outputs["image"]]


async def test_an_open_circuit_sends_nodes_to_the_next_route_and_the_record_says_so() -> None:
    hub = hub_for(breaker_failures=2)
    down = ProviderError("bfl", "unavailable", "HTTP 503", status=503)
    for _ in range(2):
        Script.steps = [down]
        with pytest.raises(TransientNodeError) as failed:
            await run(MemoryContext(hub=hub))
        assert failed.value.code == "provider_unavailable"
        assert failed.value.extra["provider"] == "bfl"
    assert hub.breaker(Route("bfl", "flux-2-pro")).state == "open"
    Script.steps = [job("fal"), result()]
    ctx = MemoryContext(hub=hub)
    outputs = await run(ctx)
    assert Script.started_requests[-1][0].label == "fal:fal-ai/flux-2-pro"
    assert outputs["image"].generation["fallbackFrom"] == ["bfl:flux-2-pro"]
    assert ctx.saved_jobs[0]["skipped"] == [{"route": "bfl:flux-2-pro", "reason": "circuit open"}]


async def test_unconfigured_providers_are_passed_over() -> None:
    hub = hub_for(bfl_api_key=None)
    Script.steps = [job("fal"), result()]
    await run(MemoryContext(hub=hub))
    assert Script.started_requests[0][0].provider == "fal"


async def test_nothing_configured_is_a_clear_error_naming_the_variables() -> None:
    hub = ProviderHub(Settings(), adapters={"fal": f"{__name__}:Script"})
    with pytest.raises(NodeError) as failed:
        await run(MemoryContext(hub=hub))
    assert failed.value.code == "provider_not_configured"
    assert "IMAGEGRAPH_BFL_API_KEY" in failed.value.message
    assert "FAL_KEY" in failed.value.message


async def test_a_429_pauses_the_provider_for_its_retry_after_and_the_node_goes_on() -> None:
    throttled = ProviderError("bfl", "rate_limited", "slow down", status=429, retry_after=0.4)
    Script.steps = [throttled, job(), result()]
    hub = hub_for()
    ctx = MemoryContext(hub=hub)
    await run(ctx)
    starts = [at for name, at in Script.calls if name.startswith("start")]
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.4  # no call during the Retry-After
    assert hub.limiter("bfl").throttles == 1
    assert hub.breaker(Route("bfl", "flux-2-pro")).state == "closed"  # busy is not down
    assert any("throttling" in (message or "") for _, message in ctx.progress_calls)


async def test_a_resumed_run_polls_the_recorded_job_instead_of_paying_again() -> None:
    recorded = {"provider": "bfl", "model": "flux-2-pro", "route": 0, "job": job().to_json()}
    Script.steps = [result()]
    ctx = MemoryContext(hub=hub_for(), resumed_job=recorded, attempt=2)
    await run(ctx)
    assert [name for name, _ in Script.calls] == ["poll:bfl"]


async def test_poll_errors_are_asked_again_without_a_new_job() -> None:
    flaky = ProviderError("bfl", "unavailable", "HTTP 502", status=502)
    Script.steps = [job(), flaky, flaky, result()]
    await run(MemoryContext(hub=hub_for()))
    assert [name for name, _ in Script.calls] == ["start:bfl", "poll:bfl", "poll:bfl", "poll:bfl"]


async def test_moderation_is_content_blocked_and_not_retried() -> None:
    refused = ProviderError(
        "bfl", "content_blocked", "Request Moderated", provider_code="Request Moderated"
    )
    Script.steps = [job(), refused]
    with pytest.raises(NodeError) as failed:
        await run(MemoryContext(hub=hub_for()))
    assert failed.value.code == "content_blocked"
    assert not failed.value.retryable
    assert failed.value.extra["providerCode"] == "Request Moderated"


async def test_the_prompt_policy_refuses_before_any_call() -> None:
    hub = hub_for(blocked_prompt_terms=["teapot"])
    with pytest.raises(NodeError) as failed:
        await run(MemoryContext(hub=hub))
    assert failed.value.code == "content_blocked"
    assert "teapot" in failed.value.message
    assert Script.calls == []


async def test_cancelling_the_execution_cancels_the_provider_job() -> None:
    Script.steps = [job(job_id="job-c")] + ["hang"] * 100
    task = asyncio.create_task(run(MemoryContext(hub=hub_for())))
    await asyncio.sleep(0.3)
    task.cancel(EXECUTION_CANCELLED)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert Script.cancelled == ["job-c"]


async def test_a_server_stopping_leaves_the_provider_job_running() -> None:
    Script.steps = [job(job_id="job-s")] + ["hang"] * 100
    task = asyncio.create_task(run(MemoryContext(hub=hub_for())))
    await asyncio.sleep(0.3)
    task.cancel()  # shutdown: the job is resumed after the restart
    with pytest.raises(asyncio.CancelledError):
        await task
    assert Script.cancelled == []


async def test_a_model_refuses_params_it_does_not_take_by_name() -> None:
    target = node("generate:flux_2_pro")
    issues = target.check(target.parse_params({"steps": 30}))
    assert [i.message for i in issues] == [
        "generate:flux_2_pro does not take 'steps' (it takes: width, height, seed, outputFormat,"
        " safetyTolerance)"
    ]
    assert [p.name for p in target.inputs] == ["prompt"]  # no negative prompt for FLUX
    assert "negativePrompt" in [p.name for p in node("generate:stable_image_core").inputs]


def test_prices_follow_the_catalog() -> None:
    flux = node("generate:flux_2_pro")
    assert flux.price(flux.parse_params({"width": 1024, "height": 1024})) == 3.15
    assert flux.price(flux.parse_params({"width": 512, "height": 512})) == 3  # the minimum
    dev = node("generate:flux_dev")
    assert dev.price(dev.parse_params({"numImages": 3})) == 7.5


async def test_an_expired_result_url_fails_without_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = hub_for()

    async def expired(provider: str, url: str) -> bytes:
        raise NodeError(f"fetching {url} failed with HTTP 403", code="fetch_failed")

    monkeypatch.setattr(hub, "download", expired)
    Script.steps = [job(), Result(images=[ProviderImage(url="https://cdn.example/x.png")])]
    with pytest.raises(NodeError) as failed:
        await run(MemoryContext(hub=hub))
    assert failed.value.code == "result_expired"
    assert not failed.value.retryable


async def test_the_retry_budget_runs_dry_during_an_outage() -> None:
    hub = hub_for(provider_retry_budget=0.1)
    budget = hub.budget("bfl")
    allowed = sum(budget.allow_retry() for _ in range(50))
    assert allowed == 10  # the starting tokens, then nothing until traffic earns more
    for _ in range(10):
        budget.first_attempt()
    assert budget.allow_retry()
    assert not budget.allow_retry()


def test_webhooks_are_asked_for_only_with_a_public_url_and_a_provider_that_sends_them() -> None:
    assert hub_for().webhook_url("fal") is None  # no public URL: polling only
    with_url = hub_for(public_url="https://images.example.com")
    assert with_url.webhook_url("fal") is None  # the script sends no webhooks
    Script.supports_webhook = True
    try:
        assert with_url.webhook_url("fal") == (
            "https://images.example.com/api/v1/providers/fal/webhook"
        )
    finally:
        Script.supports_webhook = False
