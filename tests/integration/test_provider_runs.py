"""Catalog nodes run through the engine and the API against the provider fakes: every
provider's happy path, and each fault a provider can throw at a running execution."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.testing.fakes.bfl import BflFake
from imagegraph.testing.fakes.fal import FalFake
from imagegraph.testing.fakes.gemini import GeminiFake
from imagegraph.testing.fakes.openai import OpenAIFake
from imagegraph.testing.fakes.replicate import ReplicateFake
from imagegraph.testing.fakes.server import FakeProvider, Fault
from imagegraph.testing.fakes.stability import StabilityFake
from tests.builders import edge, node, workflow
from tests.clients import api_client, make_key, started_runtime

API = "/api/v1"
FAKES: dict[str, type[FakeProvider]] = {
    "fal": FalFake,
    "bfl": BflFake,
    "replicate": ReplicateFake,
    "openai": OpenAIFake,
    "stability": StabilityFake,
    "gemini": GeminiFake,
}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FakeProvider]]:
    started = {name: fake().start() for name, fake in FAKES.items()}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture
def fakes(servers: dict[str, FakeProvider]) -> dict[str, FakeProvider]:
    """The module's fakes, as new: no faults, no latency, counters at zero."""
    for fake in servers.values():
        fake.reset()
    return servers


def configured(settings: Settings, *fakes: FakeProvider, **overrides: Any) -> dict[str, Any]:
    """Settings overrides that point the server at `fakes` (and only them)."""
    update: dict[str, Any] = {"provider_timeout_seconds": 5.0, **overrides}
    for fake in fakes:
        update[f"{fake.name}_api_key"] = SecretStr(fake.api_key)
        update[f"{fake.name}_base_url"] = fake.url
    if any(isinstance(fake, ReplicateFake) for fake in fakes):
        replicate = next(fake for fake in fakes if isinstance(fake, ReplicateFake))
        update["replicate_webhook_secret"] = SecretStr(replicate.webhook_secret)
    return update


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *fakes: FakeProvider, **overrides: Any
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    async with (
        started_runtime(settings, **configured(settings, *fakes, **overrides)) as runtime,
        api_client(runtime) as client,
    ):
        yield runtime, client


def generating(
    node_type: str, prompt: str = "a lighthouse at dusk", **params: Any
) -> dict[str, Any]:
    """Prompt -> one catalog node -> output."""
    return workflow(
        [
            node("prompt", "input:text", text=prompt),
            node("gen", node_type, **params),
            node("out", "output:image"),
        ],
        [edge("prompt", "text", "gen", "prompt"), edge("gen", "image", "out", "image")],
        name=node_type,
    )


async def start(client: httpx.AsyncClient, document: dict[str, Any]) -> str:
    saved = await client.post(f"{API}/workflows", json=document)
    assert saved.status_code == 201, saved.text
    started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json={})
    assert started.status_code == 201, started.text
    execution_id: str = started.json()["executionId"]
    return execution_id


async def finished(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=60"}
    )
    record: dict[str, Any] = (await client.get(f"{API}/workflows/executions/{execution_id}")).json()
    return record


async def run(client: httpx.AsyncClient, document: dict[str, Any]) -> dict[str, Any]:
    return await finished(client, await start(client, document))


def gen_run(record: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [n for n in record["nodes"] if n["nodeId"] == "gen"]
    assert len(found) == 1
    return found[0]


async def image_of(client: httpx.AsyncClient, record: dict[str, Any]) -> dict[str, Any]:
    asset_id = gen_run(record)["outputs"]["image"]["assetId"]
    asset: dict[str, Any] = (await client.get(f"{API}/assets/{asset_id}")).json()
    content = await client.get(asset["url"])
    assert content.status_code == 200
    assert len(content.content) == asset["sizeBytes"]
    return asset


# -- each provider --------------------------------------------------------------------------

ROUTES = [
    ("fal", "generate:flux_dev", {"width": 256, "height": 256, "seed": 5}, "fal-ai/flux/dev"),
    (
        "replicate",
        "generate:flux_dev",
        {"width": 256, "height": 256, "seed": 5},
        "black-forest-labs/flux-dev",
    ),
    (
        "bfl",
        "generate:flux_pro_1_1",
        {"width": 256, "height": 256, "seed": 5},
        "flux-pro-1.1",
    ),
    ("openai", "generate:gpt_image", {}, "gpt-image-1.5"),
    ("gemini", "generate:gemini_image", {}, None),
    ("stability", "generate:stable_image_core", {"seed": 5}, None),
]


@pytest.mark.parametrize(
    ("provider", "node_type", "params", "provider_model"),
    ROUTES,
    ids=[route[0] for route in ROUTES],
)
async def test_each_provider_serves_its_catalog_node(
    settings: Settings,
    fakes: dict[str, FakeProvider],
    provider: str,
    node_type: str,
    params: dict[str, Any],
    provider_model: str | None,
) -> None:
    fake = fakes[provider]
    async with serving(settings, fake) as (_, client):
        record = await run(client, generating(node_type, **params))

        assert record["status"] == "COMPLETED", record["error"]
        gen = gen_run(record)
        assert gen["provider"]["provider"] == provider
        assert gen["provider"]["jobId"] or provider in ("openai", "gemini", "stability")
        assert gen["credits"] > 0
        asset = await image_of(client, record)
        generation = asset["generation"]
        assert generation["provider"] == provider
        assert generation["prompt"] == "a lighthouse at dusk"
        if provider_model is not None:
            assert generation["providerModel"] == provider_model
        assert asset["model"] == node_type.split(":", 1)[1]
        assert fake.accepted == 1


async def test_unconfigured_models_are_refused_before_running_naming_the_key(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    async with serving(settings) as (_, client):
        saved = await client.post(f"{API}/workflows", json=generating("generate:gpt_image"))
        started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json={})

    assert started.status_code == 422
    problem = started.json()
    issue = problem["errors"][0]
    assert issue["nodeId"] == "gen"
    assert issue["code"] == "node_unavailable"
    assert "OPENAI_API_KEY" in issue["message"]
    assert fakes["openai"].requests.total() == 0


async def test_test_keys_run_catalog_nodes_on_the_sandbox(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    async with (
        serving(settings, fakes["fal"]) as (runtime, _),
        api_client(runtime, make_key(runtime, mode="test")) as client,
    ):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))

    assert record["status"] == "COMPLETED", record["error"]
    assert gen_run(record)["nodeType"] == "generate:sandbox"
    assert fakes["fal"].requests.total() == 0


# -- faults ---------------------------------------------------------------------------------


async def test_a_429_pauses_the_provider_for_its_retry_after_then_succeeds(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    fal.faults.add(
        "submit",
        Fault(status=429, body={"detail": "Too many requests"}, headers={"Retry-After": "7"}),
    )
    async with serving(settings, fal) as (_, client):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))

    assert record["status"] == "COMPLETED", record["error"]
    assert gen_run(record)["attempts"] == 1  # throttling is waited out, never a failure
    first, second = fal.arrivals["submit"]
    assert second - first >= 7.0
    assert fal.accepted == 1


async def test_a_submit_that_times_out_is_retried_and_flagged_in_doubt(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    fal.faults.add("submit", Fault(hang=True))
    async with serving(settings, fal, provider_timeout_seconds=0.5) as (_, client):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))

    assert record["status"] == "COMPLETED", record["error"]
    gen = gen_run(record)
    assert gen["attempts"] == 2
    assert gen["provider"]["previousAttemptInDoubt"] is True
    assert fal.requests["submit"] == 2
    assert fal.accepted == 1  # the hung call never reached the provider's queue


async def test_status_errors_and_malformed_answers_mid_job_are_ridden_out(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    replicate = fakes["replicate"]
    replicate.latency = 0.5
    replicate.faults.add("status", Fault(status=503, body={"detail": "unavailable"}, times=2))
    replicate.faults.add("status", Fault(malformed=True))
    async with serving(settings, replicate) as (_, client):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))

    assert record["status"] == "COMPLETED", record["error"]
    assert gen_run(record)["attempts"] == 1
    assert replicate.accepted == 1


async def test_an_outage_opens_the_circuit_and_the_next_route_serves(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal, replicate = fakes["fal"], fakes["replicate"]
    fal.faults.add("submit", Fault(status=503, body={"detail": "down"}, times=1000))
    async with serving(settings, fal, replicate, breaker_failures=2, node_max_attempts=4) as (
        _,
        client,
    ):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))
        assert record["status"] == "COMPLETED", record["error"]
        gen = gen_run(record)
        assert gen["provider"]["provider"] == "replicate"
        assert gen["provider"]["skipped"] == [
            {"route": "fal:fal-ai/flux/dev", "reason": "circuit open"}
        ]
        asset = await image_of(client, record)
        assert asset["generation"]["fallbackFrom"] == ["fal:fal-ai/flux/dev"]

        # While the circuit is open, new work goes straight to the next route.
        submits = fal.requests["submit"]
        again = await run(client, generating("generate:flux_dev", width=256, height=256, seed=9))
        assert again["status"] == "COMPLETED", again["error"]
        assert gen_run(again)["attempts"] == 1
        assert fal.requests["submit"] == submits
    assert fal.accepted == 0
    assert replicate.accepted == 2


async def test_a_few_refused_submits_among_accepted_ones_do_not_open_the_circuit(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    """Submits go out in bursts and their jobs end a while later: an accepted submit counts
    as a success for the circuit at once, so two 503s with an accepted job between them are
    not two failures in a row."""
    fal, replicate = fakes["fal"], fakes["replicate"]
    fal.latency = 2.0  # no job ends before the last submit below

    async def submitted(count: int) -> None:
        async with asyncio.timeout(10):
            while fal.requests["submit"] < count:
                await asyncio.sleep(0.01)

    async with serving(settings, fal, replicate, breaker_failures=2, node_max_attempts=4) as (
        _,
        client,
    ):
        document = generating("generate:flux_dev", width=256, height=256)
        fal.faults.add("submit", Fault(status=503, body={"detail": "busy"}))
        first = await start(client, document)
        await submitted(2)  # refused, then accepted on its retry
        second = await start(client, generating("generate:flux_dev", width=256, seed=2))
        await submitted(3)
        fal.faults.add("submit", Fault(status=503, body={"detail": "busy"}))
        third = await start(client, generating("generate:flux_dev", width=256, seed=3))
        records = [await finished(client, e) for e in (first, second, third)]

    assert [r["status"] for r in records] == ["COMPLETED"] * 3
    assert [gen_run(r)["provider"]["provider"] for r in records] == ["fal"] * 3
    assert all(gen_run(r)["provider"]["skipped"] == [] for r in records)
    assert replicate.accepted == 0
    assert fal.accepted == 3


async def test_after_an_outage_the_half_open_circuit_lets_the_node_through(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    fal.faults.add("submit", Fault(status=503, body={"detail": "down"}, times=1000))
    async with serving(
        settings,
        fal,
        breaker_failures=2,
        breaker_open_seconds=2.0,
        node_max_attempts=5,
        retry_cap_seconds=5.0,  # waits for the circuit's Retry-After
    ) as (_, client):
        execution_id = await start(client, generating("generate:flux_dev", width=256, height=256))
        async with asyncio.timeout(20):
            while fal.requests["submit"] < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the circuit is open: no calls go out
        assert fal.requests["submit"] == 2
        fal.faults.clear()  # the provider is back
        record = await finished(client, execution_id)

    assert record["status"] == "COMPLETED", record["error"]
    gen = gen_run(record)
    # Two failures open the circuit; the third attempt finds it open and waits out its
    # Retry-After; the fourth is the probe once it half-opens.
    assert gen["attempts"] == 4
    assert gen["provider"]["provider"] == "fal"
    assert fal.requests["submit"] == 3  # one probe through the half-open circuit
    assert fal.accepted == 1


async def test_an_outage_with_no_other_route_fails_truthfully(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    openai = fakes["openai"]
    openai.faults.add(
        "generate", Fault(status=503, body={"error": {"message": "down"}}, times=1000)
    )
    async with serving(settings, openai, node_max_attempts=2) as (_, client):
        record = await run(client, generating("generate:gpt_image"))

    assert record["status"] == "FAILED"
    gen = gen_run(record)
    assert gen["attempts"] == 2
    assert gen["error"]["code"] == "provider_unavailable"
    assert "openai" in gen["error"]["message"]
    assert gen["credits"] == 0
    assert openai.accepted == 0


async def test_moderation_is_content_blocked_and_never_retried(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    async with serving(settings, fal) as (_, client):
        record = await run(
            client, generating("generate:flux_dev", "something forbidden", width=256, height=256)
        )

    assert record["status"] == "FAILED"
    gen = gen_run(record)
    assert gen["attempts"] == 1
    assert gen["error"]["code"] == "content_blocked"
    assert gen["credits"] == 0


async def test_the_prompt_policy_refuses_before_anything_is_paid(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    async with serving(settings, fal, blocked_prompt_terms=["lighthouse"]) as (_, client):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))

    assert record["status"] == "FAILED"
    assert gen_run(record)["error"]["code"] == "content_blocked"
    assert fal.requests.total() == 0


async def test_an_expired_result_url_fails_without_paying_again(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    replicate = fakes["replicate"]
    replicate.expire_after = 0.0
    async with serving(settings, replicate) as (_, client):
        record = await run(client, generating("generate:flux_dev", width=256, height=256))

    assert record["status"] == "FAILED"
    gen = gen_run(record)
    assert gen["error"]["code"] == "result_expired"
    assert gen["attempts"] == 1
    assert replicate.accepted == 1


async def test_a_provider_that_goes_away_mid_job_is_waited_for(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    replicate = fakes["replicate"]
    replicate.latency = 1.0
    async with serving(settings, replicate) as (_, client):
        execution_id = await start(client, generating("generate:flux_dev", width=256, height=256))
        async with asyncio.timeout(10):
            while replicate.accepted == 0:
                await asyncio.sleep(0.02)
        await asyncio.to_thread(replicate.stop)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(replicate.start)
        record = await finished(client, execution_id)

    assert record["status"] == "COMPLETED", record["error"]
    assert gen_run(record)["attempts"] == 1
    assert replicate.accepted == 1


async def test_cancelling_an_execution_cancels_the_provider_job(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    fal.latency = 30.0
    async with serving(settings, fal) as (_, client):
        execution_id = await start(client, generating("generate:flux_dev", width=256, height=256))
        async with asyncio.timeout(10):
            while fal.accepted == 0:
                await asyncio.sleep(0.02)
        cancelled = await client.post(f"{API}/workflows/executions/{execution_id}/cancel")
        assert cancelled.status_code in (200, 202), cancelled.text
        record = await finished(client, execution_id)
        async with asyncio.timeout(10):
            while fal.cancelled == 0:
                await asyncio.sleep(0.02)

    assert record["status"] == "CANCELLED"
    assert fal.cancelled == 1
