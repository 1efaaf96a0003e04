"""ReplicateAdapter against ReplicateFake: the input it sends, how it reads every
prediction, webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage

from imagegraph.providers.base import (
    Job,
    Pending,
    ProviderConfig,
    ProviderError,
    Request,
    Route,
    SourceImage,
)
from imagegraph.providers.replicate import ReplicateAdapter
from imagegraph.testing.fakes.replicate import ReplicateFake, version_of
from imagegraph.testing.fakes.server import Fault
from tests.providers.jobs import finish, refused, started
from tests.receiver import Receiver

RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
FLUX_DEV = Route(
    "replicate",
    "black-forest-labs/flux-dev",
    options={"size": "aspect_ratio", "aspectRatios": RATIOS},
)
FLUX_PRO = Route(
    "replicate",
    "black-forest-labs/flux-1.1-pro",
    options={"size": "aspect_ratio", "aspectRatios": ["custom"]},
)
FLUX_2_PRO = Route(
    "replicate",
    "black-forest-labs/flux-2-pro",
    options={"size": "aspect_ratio", "aspectRatios": RATIOS},
)


def small(prompt: str = "a fox", **changes: Any) -> Request:
    """A quick request: a quarter-megapixel square of `prompt` from FLUX.1 [dev]."""
    return dataclasses.replace(Request(prompt=prompt, extra={"megapixels": "0.25"}), **changes)


@pytest.fixture(scope="module")
def server() -> Iterator[ReplicateFake]:
    fake = ReplicateFake()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: ReplicateFake) -> ReplicateFake:
    """The module's fake, as new: no faults, no latency, counters at zero."""
    server.reset()
    return server


@pytest.fixture
def adapter(fake: ReplicateFake, http: httpx.AsyncClient) -> ReplicateAdapter:
    return ReplicateAdapter(ProviderConfig("replicate", fake.api_key, fake.url), http)


# -- what is sent ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "request_", "sent"),
    [
        (
            FLUX_DEV,
            Request(
                prompt="a red fox",
                width=1024,
                height=576,
                seed=7,
                steps=20,
                guidance=3.0,
                num_images=2,
                output_format="jpeg",
            ),
            {
                "prompt": "a red fox",
                "aspect_ratio": "16:9",
                "seed": 7,
                "num_inference_steps": 20,
                "guidance": 3.0,
                "num_outputs": 2,
                "output_format": "jpg",
            },
        ),
        (
            FLUX_PRO,
            Request(prompt="a red fox", width=800, height=608, safety_tolerance=3),
            {
                "prompt": "a red fox",
                "aspect_ratio": "custom",
                "width": 800,
                "height": 608,
                "safety_tolerance": 3,
            },
        ),
        (
            FLUX_2_PRO,
            Request(prompt="a red fox", width=1000, height=760, output_format="png"),
            {"prompt": "a red fox", "aspect_ratio": "4:3", "output_format": "png"},
        ),
        (
            Route(
                "replicate",
                "black-forest-labs/flux-dev",
                options={
                    "size": "aspect_ratio",
                    "aspectRatios": RATIOS,
                    "megapixels": ["1", "0.25"],
                },
            ),
            Request(prompt="a red fox", width=512, height=512),
            {"prompt": "a red fox", "aspect_ratio": "1:1", "megapixels": "0.25"},
        ),
    ],
    ids=["flux-dev", "flux-1.1-pro-custom", "flux-2-pro-nearest", "flux-dev-small"],
)
async def test_start_sends_the_input_the_model_takes(
    adapter: ReplicateAdapter,
    fake: ReplicateFake,
    route: Route,
    request_: Request,
    sent: dict[str, object],
) -> None:
    job = await started(adapter, route, request_)

    received = fake.jobs[job.id]
    assert received["input"] == sent
    assert received["model"] == route.model
    assert received["headers"]["authorization"] == f"Bearer {fake.api_key}"
    assert job.urls == {
        "get": f"{fake.url}/v1/predictions/{job.id}",
        "cancel": f"{fake.url}/v1/predictions/{job.id}/cancel",
    }


async def test_a_pinned_version_goes_to_the_predictions_endpoint(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    version = version_of("black-forest-labs/flux-dev")
    route = dataclasses.replace(FLUX_DEV, model=f"black-forest-labs/flux-dev:{version}")

    job = await started(adapter, route, small())

    assert fake.jobs[job.id]["model"] == "black-forest-labs/flux-dev"
    assert (await finish(adapter, job)).model_version == version


@pytest.mark.parametrize(
    ("route", "request_", "param"),
    [
        (FLUX_DEV, Request(prompt="a fox", negative_prompt="blurry"), "negative_prompt"),
        (FLUX_DEV, Request(prompt="a fox", safety_tolerance=2), "safety_tolerance"),
        (FLUX_DEV, Request(prompt="a fox", num_images=5), "num_images"),
        (FLUX_DEV, Request(prompt="a fox", width=1024), "width"),
        (FLUX_PRO, Request(prompt="a fox", steps=20), "steps"),
        (FLUX_PRO, Request(prompt="a fox", safety_tolerance=0), "safety_tolerance"),
        (FLUX_2_PRO, Request(prompt="a fox", num_images=2), "num_images"),
        (FLUX_2_PRO, Request(prompt="a fox", guidance=3.0), "guidance"),
        (
            FLUX_DEV,
            Request(prompt="a fox", mask=SourceImage(b"\x89PNG", "image/png", 1, 1)),
            "mask",
        ),
    ],
)
async def test_a_parameter_the_model_does_not_take_is_refused_by_name(
    adapter: ReplicateAdapter, fake: ReplicateFake, route: Route, request_: Request, param: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request_)

    assert caught.value.kind == "bad_request"
    assert param in caught.value.message
    assert route.model in caught.value.message
    assert fake.requests["submit"] == 0


# -- results -----------------------------------------------------------------------------


async def test_pending_then_a_result_with_downloadable_images(
    adapter: ReplicateAdapter, fake: ReplicateFake, http: httpx.AsyncClient
) -> None:
    fake.latency = 0.3
    job = await started(adapter, FLUX_DEV, small(seed=7, num_images=2, output_format="png"))

    assert await adapter.poll(job) == Pending("starting")
    result = await finish(adapter, job)

    assert len(result.images) == 2
    assert result.seed == 7
    assert result.request_id == job.id
    assert result.model_version == version_of("black-forest-labs/flux-dev")
    assert result.details == {"predict_time": 0.15, "total_time": 0.3}
    assert result.images[0].url is not None
    assert result.images[0].mime_type == "image/png"
    download = await http.get(result.images[0].url)
    assert download.status_code == 200
    assert PILImage.open(io.BytesIO(download.content)).size == (496, 496)
    assert fake.accepted == 1


async def test_the_logged_seed_is_the_one_used(adapter: ReplicateAdapter) -> None:
    result = await finish(adapter, await started(adapter, FLUX_PRO, small()))

    assert len(result.images) == 1  # FLUX1.1 [pro] answers one URL, not a list
    assert isinstance(result.seed, int)


async def test_a_moderated_prediction_is_content_blocked(adapter: ReplicateAdapter) -> None:
    error = await refused(adapter, FLUX_DEV, small("something forbidden"))

    assert error.kind == "content_blocked"
    assert error.provider_code == "E005"
    assert "flagged as sensitive" in error.message


async def test_a_failed_prediction_failed(adapter: ReplicateAdapter) -> None:
    error = await refused(adapter, FLUX_DEV, small("explode"))

    assert error.kind == "failed"
    assert "CUDA" in error.message


async def test_an_aborted_prediction_is_cancelled(
    adapter: ReplicateAdapter, fake: ReplicateFake, http: httpx.AsyncClient
) -> None:
    fake.latency = 2.0
    created = await http.post(
        f"{fake.url}/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "a fox"}},
        headers={"Authorization": f"Bearer {fake.api_key}", "Cancel-After": "100ms"},
    )
    urls = created.json()["urls"]
    job = Job("replicate", FLUX_DEV.model, created.json()["id"], urls=urls)
    await asyncio.sleep(0.15)

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "cancelled"
    assert caught.value.provider_code == "aborted"


async def test_an_unknown_status_is_malformed(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    job = await started(adapter, FLUX_DEV, small())
    fake.faults.add("status", Fault(status=200, body={"id": job.id, "status": "dreaming"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "malformed"


# -- HTTP failures -----------------------------------------------------------------------


async def test_429_is_rate_limited_with_retry_after(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    body = {"detail": "Request was throttled. Your rate limit resets in ~30s.", "status": 429}
    fake.faults.add("submit", Fault(status=429, body=body, headers={"Retry-After": "30"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, small())

    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after == 30.0
    assert "throttled" in caught.value.message
    assert fake.accepted == 0


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_unavailable(
    adapter: ReplicateAdapter, fake: ReplicateFake, status: int
) -> None:
    job = await started(adapter, FLUX_DEV, small())
    fake.faults.add("status", Fault(status=status, body={"detail": "Internal Server Error"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "unavailable"


async def test_a_body_that_is_not_json_is_malformed(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    fake.faults.add("submit", Fault(malformed=True))

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, small())
    assert caught.value.kind == "malformed"


async def test_no_answer_in_time_is_a_timeout(fake: ReplicateFake) -> None:
    fake.faults.add("status", Fault(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as http:
        adapter = ReplicateAdapter(ProviderConfig("replicate", fake.api_key, fake.url), http)
        job = await started(adapter, FLUX_DEV, small())

        with pytest.raises(ProviderError) as caught:
            await adapter.poll(job)
    assert caught.value.kind == "timeout"


async def test_a_refused_connection_is_unavailable(http: httpx.AsyncClient) -> None:
    adapter = ReplicateAdapter(ProviderConfig("replicate", "key", "http://127.0.0.1:1"), http)

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, small())
    assert caught.value.kind == "unavailable"


async def test_an_expired_result_url_answers_403(
    adapter: ReplicateAdapter, fake: ReplicateFake, http: httpx.AsyncClient
) -> None:
    fake.expire_after = 0.0
    result = await finish(adapter, await started(adapter, FLUX_DEV, small()))

    assert result.images[0].url is not None
    assert (await http.get(result.images[0].url)).status_code == 403


async def test_a_wrong_token_is_unauthorized(fake: ReplicateFake, http: httpx.AsyncClient) -> None:
    adapter = ReplicateAdapter(ProviderConfig("replicate", "wrong", fake.url), http)

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, small())

    assert caught.value.kind == "unauthorized"
    assert caught.value.status == 401
    assert "authentication token" in caught.value.message
    assert fake.accepted == 0


async def test_the_token_goes_only_to_the_configured_host(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    job = await started(adapter, FLUX_DEV, small())
    elsewhere = {key: url.replace("127.0.0.1", "localhost") for key, url in job.urls.items()}

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(Job(job.provider, job.model, job.id, urls=elsewhere))
    assert caught.value.kind == "unauthorized"  # the fake saw no token


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_stops_the_prediction(adapter: ReplicateAdapter, fake: ReplicateFake) -> None:
    fake.latency = 5.0
    job = await started(adapter, FLUX_DEV, small())

    await adapter.cancel(job)

    assert fake.cancelled == 1
    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "cancelled"
    assert caught.value.provider_code == "canceled"
    await adapter.cancel(job)  # already canceled: answered with the prediction, no error
    assert fake.cancelled == 1


# -- webhooks ----------------------------------------------------------------------------


async def test_the_webhook_is_delivered_and_verifies(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    fake.latency = 0.1
    with Receiver() as receiver:
        job = await adapter.start(FLUX_DEV, small(), webhook_url=receiver.url)
        assert isinstance(job, Job)
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)

    assert fake.jobs[job.id]["webhook"] == receiver.url
    assert fake.jobs[job.id]["events"] == ["completed"]
    assert await adapter.verify_webhook(delivery.headers, delivery.body) == job.id
    assert json.loads(delivery.body)["status"] == "succeeded"
    assert fake.requests["secret"] == 1  # fetched once, then kept


async def test_a_cancelled_prediction_sends_its_webhook_at_once(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    fake.latency = 5.0
    with Receiver() as receiver:
        job = await adapter.start(FLUX_DEV, small(), webhook_url=receiver.url)
        assert isinstance(job, Job)
        await adapter.cancel(job)
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)

    assert await adapter.verify_webhook(delivery.headers, delivery.body) == job.id
    assert json.loads(delivery.body)["status"] == "canceled"


async def test_a_forged_or_stale_webhook_is_refused(
    adapter: ReplicateAdapter, fake: ReplicateFake, http: httpx.AsyncClient
) -> None:
    body = json.dumps({"id": "p1", "status": "succeeded"}).encode()
    assert await adapter.verify_webhook(fake.sign_webhook(body), body) == "p1"
    other_secret = ReplicateAdapter(
        ProviderConfig("replicate", fake.api_key, fake.url),
        http,
        webhook_secret="whsec_" + "A" * 32,
    )

    forgeries: dict[str, tuple[ReplicateAdapter, dict[str, str], bytes]] = {
        "tampered body": (adapter, fake.sign_webhook(body), body.replace(b"p1", b"p2")),
        "another secret": (other_secret, fake.sign_webhook(body), body),
        "old timestamp": (adapter, fake.sign_webhook(body, timestamp=time.time() - 600), body),
        "no signature": (adapter, {"webhook-id": "msg_1"}, body),
    }
    for case, (verifier, headers, sent) in forgeries.items():
        with pytest.raises(ProviderError) as caught:
            await verifier.verify_webhook(headers, sent)
        assert caught.value.kind == "unauthorized", case
    assert fake.requests["secret"] == 1


# -- accounting --------------------------------------------------------------------------


async def test_accepted_jobs_are_the_starts_that_got_a_job(
    adapter: ReplicateAdapter, fake: ReplicateFake
) -> None:
    fake.faults.add("submit", Fault(status=503, body={"detail": "busy"}))
    outcomes = []
    for request in (
        small(),  # 503
        small(),
        small(negative_prompt="no"),  # refused before sending
        small("something forbidden"),  # accepted, then moderated
    ):
        with contextlib.suppress(ProviderError):
            outcomes.append(await adapter.start(FLUX_DEV, request))

    assert fake.accepted == len([job for job in outcomes if isinstance(job, Job)]) == 2
