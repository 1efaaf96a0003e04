"""FalAdapter against FalFake: the fields it sends, how it reads every answer, webhooks."""

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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image as PILImage

from imagegraph.providers.base import (
    Job,
    Pending,
    ProviderConfig,
    ProviderError,
    Request,
    Result,
    Route,
    SourceImage,
)
from imagegraph.providers.fal import FalAdapter
from imagegraph.testing.fakes.fal import FalFake
from imagegraph.testing.fakes.server import Fault
from tests.providers.jobs import finish, refused, started
from tests.receiver import Receiver

FLUX_DEV = Route("fal", "fal-ai/flux/dev", options={"size": "image_size"})
FLUX_PRO = Route("fal", "fal-ai/flux-pro/v1.1", options={"size": "image_size"})
FLUX_2_PRO = Route("fal", "fal-ai/flux-2-pro", options={"size": "image_size"})
FLUX_2_FLEX = Route("fal", "fal-ai/flux-2/flex", options={"size": "image_size"})
ESRGAN = Route("fal", "fal-ai/esrgan", options={"fixed": {"model": "RealESRGAN_x4plus"}})
CLARITY = Route("fal", "fal-ai/clarity-upscaler")
BIREFNET = Route("fal", "fal-ai/birefnet")


def small(prompt: str = "a fox", **changes: Any) -> Request:
    """A quick request: a small image of `prompt`."""
    return dataclasses.replace(Request(prompt=prompt, width=256, height=192), **changes)


def source_image(width: int = 48, height: int = 32) -> SourceImage:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return SourceImage(buffer.getvalue(), "image/png", width, height)


@pytest.fixture(scope="module")
def server() -> Iterator[FalFake]:
    fake = FalFake()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: FalFake) -> FalFake:
    """The module's fake, as new: no faults, no latency, counters at zero."""
    server.reset()
    return server


@pytest.fixture
def adapter(fake: FalFake, http: httpx.AsyncClient) -> FalAdapter:
    return FalAdapter(ProviderConfig("fal", fake.api_key, fake.url), http, jwks_url=fake.jwks_url)


# -- what is sent ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "request_", "sent"),
    [
        (
            FLUX_DEV,
            Request(
                prompt="a red fox",
                width=512,
                height=384,
                seed=7,
                steps=20,
                guidance=3.0,
                num_images=2,
                output_format="png",
            ),
            {
                "prompt": "a red fox",
                "image_size": {"width": 512, "height": 384},
                "seed": 7,
                "num_inference_steps": 20,
                "guidance_scale": 3.0,
                "num_images": 2,
                "output_format": "png",
            },
        ),
        (
            FLUX_PRO,
            Request(prompt="a red fox", safety_tolerance=4, output_format="jpeg"),
            {"prompt": "a red fox", "safety_tolerance": "4", "output_format": "jpeg"},
        ),
        (
            FLUX_2_PRO,
            Request(prompt="a red fox", width=256, height=256, seed=1),
            {"prompt": "a red fox", "image_size": {"width": 256, "height": 256}, "seed": 1},
        ),
        (
            FLUX_2_FLEX,
            Request(prompt="a red fox", steps=30, guidance=5.0, safety_tolerance=1),
            {
                "prompt": "a red fox",
                "num_inference_steps": 30,
                "guidance_scale": 5.0,
                "safety_tolerance": "1",
            },
        ),
    ],
    ids=["flux-dev", "flux-pro", "flux-2-pro", "flux-2-flex"],
)
async def test_start_sends_the_fields_the_model_takes(
    adapter: FalAdapter, fake: FalFake, route: Route, request_: Request, sent: dict[str, object]
) -> None:
    job = await started(adapter, route, request_)

    received = fake.jobs[job.id]
    assert received["input"] == sent
    assert received["model"] == route.model
    assert received["headers"]["authorization"] == f"Key {fake.api_key}"


async def test_job_urls_are_the_ones_fal_returned(adapter: FalAdapter, fake: FalFake) -> None:
    job = await started(adapter, FLUX_DEV, small("a fox"))

    # Only owner/app, not the model's subpath: which is why they are never built.
    base = f"{fake.url}/fal-ai/flux/requests/{job.id}"
    assert job.urls == {"status": f"{base}/status", "response": base, "cancel": f"{base}/cancel"}
    assert Job.from_json(json.loads(json.dumps(job.to_json()))) == job


async def test_upscalers_and_cutout_get_the_image_as_a_data_uri(
    adapter: FalAdapter, fake: FalFake
) -> None:
    image = source_image()
    esrgan = await started(adapter, ESRGAN, Request(image=image, scale=4, extra={"face": True}))
    clarity = await started(
        adapter,
        CLARITY,
        Request(
            image=image,
            prompt="sharp",
            negative_prompt="blur",
            scale=2,
            seed=3,
            steps=18,
            guidance=4.0,
        ),
    )
    cutout = await started(adapter, BIREFNET, Request(image=image, output_format="webp"))

    uri = image.data_uri()
    assert fake.jobs[esrgan.id]["input"] == {
        "model": "RealESRGAN_x4plus",
        "image_url": uri,
        "scale": 4,
        "face": True,
    }
    assert fake.jobs[clarity.id]["input"] == {
        "image_url": uri,
        "prompt": "sharp",
        "negative_prompt": "blur",
        "upscale_factor": 2,
        "seed": 3,
        "num_inference_steps": 18,
        "guidance_scale": 4.0,
    }
    assert fake.jobs[cutout.id]["input"] == {"image_url": uri, "output_format": "webp"}


@pytest.mark.parametrize(
    ("route", "request_", "param"),
    [
        (FLUX_DEV, Request(prompt="a fox", negative_prompt="blurry"), "negative_prompt"),
        (FLUX_2_PRO, Request(prompt="a fox", negative_prompt="blurry"), "negative_prompt"),
        (FLUX_2_PRO, Request(prompt="a fox", steps=20), "steps"),
        (FLUX_2_PRO, Request(prompt="a fox", num_images=2), "num_images"),
        (FLUX_DEV, Request(prompt="a fox", num_images=9), "num_images"),
        (FLUX_DEV, Request(prompt="a fox", safety_tolerance=2), "safety_tolerance"),
        (FLUX_2_PRO, Request(prompt="a fox", safety_tolerance=6), "safety_tolerance"),
        (FLUX_DEV, Request(prompt="a fox", output_format="webp"), "output_format"),
        (FLUX_DEV, Request(prompt="a fox", width=512), "width"),
        (ESRGAN, Request(image=source_image(), mask=source_image()), "mask"),
        (BIREFNET, Request(image=source_image(), width=512, height=512), "width"),
        (CLARITY, Request(image=source_image(), output_format="png"), "output_format"),
    ],
)
async def test_a_parameter_the_model_does_not_take_is_refused_by_name(
    adapter: FalAdapter, fake: FalFake, route: Route, request_: Request, param: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request_)

    assert caught.value.kind == "bad_request"
    assert param in caught.value.message
    assert route.model in caught.value.message
    assert fake.requests["submit"] == 0


# -- results -----------------------------------------------------------------------------


async def test_pending_then_a_result_with_downloadable_images(
    adapter: FalAdapter, fake: FalFake, http: httpx.AsyncClient
) -> None:
    fake.latency = 0.3
    job = await started(
        adapter,
        FLUX_DEV,
        small("a fox", seed=7, num_images=2, output_format="png"),
    )

    assert await adapter.poll(job) == Pending("IN_QUEUE")
    result = await finish(adapter, job)

    assert len(result.images) == 2
    assert result.seed == 7
    assert result.request_id == job.id
    assert result.details["has_nsfw_concepts"] == [False, False]
    assert result.details["metrics"] == {"inference_time": 0.3}
    assert result.images[0].url is not None
    download = await http.get(result.images[0].url)
    assert download.status_code == 200
    assert download.headers["content-type"] == result.images[0].mime_type == "image/png"
    assert PILImage.open(io.BytesIO(download.content)).size == (256, 192)
    assert fake.accepted == 1


async def test_sync_mode_data_uris_become_bytes(adapter: FalAdapter) -> None:
    job = await started(
        adapter,
        FLUX_DEV,
        small("a fox", output_format="png", extra={"sync_mode": True}),
    )

    result = await finish(adapter, job)

    assert result.images[0].url is None
    assert result.images[0].mime_type == "image/png"
    assert result.images[0].data is not None
    assert PILImage.open(io.BytesIO(result.images[0].data)).format == "PNG"


async def test_an_upscale_answers_one_image(adapter: FalAdapter, http: httpx.AsyncClient) -> None:
    job = await started(adapter, ESRGAN, Request(image=source_image(48, 32), scale=2))

    result = await finish(adapter, job)

    assert len(result.images) == 1
    assert result.images[0].url is not None
    download = await http.get(result.images[0].url)
    assert PILImage.open(io.BytesIO(download.content)).size == (96, 64)


async def test_a_refused_prompt_is_content_blocked(adapter: FalAdapter) -> None:
    error = await refused(adapter, FLUX_DEV, small("something forbidden"))

    assert error.kind == "content_blocked"
    assert error.status == 422
    assert error.provider_code == "content_policy_violation"
    assert "flagged" in error.message


async def test_every_image_flagged_nsfw_is_content_blocked(adapter: FalAdapter) -> None:
    error = await refused(adapter, FLUX_DEV, small("nsfw fox", num_images=2))

    assert error.kind == "content_blocked"
    assert error.provider_code == "has_nsfw_concepts"


async def test_a_job_completed_with_an_error_failed(adapter: FalAdapter) -> None:
    error = await refused(adapter, FLUX_DEV, small("explode"))

    assert error.kind == "failed"
    assert error.provider_code == "internal_server_error"


async def test_an_unknown_status_is_malformed(adapter: FalAdapter, fake: FalFake) -> None:
    job = await started(adapter, FLUX_DEV, small("a fox"))
    fake.faults.add("status", Fault(status=200, body={"status": "SLEEPING"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "malformed"


# -- HTTP failures -----------------------------------------------------------------------


async def test_429_is_rate_limited_with_retry_after(adapter: FalAdapter, fake: FalFake) -> None:
    fake.faults.add(
        "submit",
        Fault(status=429, body={"detail": "Too many requests"}, headers={"Retry-After": "7"}),
    )

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, Request(prompt="a fox"))

    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after == 7.0
    assert fake.accepted == 0


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_unavailable(
    adapter: FalAdapter, fake: FalFake, status: int
) -> None:
    job = await started(adapter, FLUX_DEV, small("a fox"))
    body = {
        "detail": [
            {"loc": ["body"], "msg": "Internal server error", "type": "internal_server_error"}
        ]
    }
    fake.faults.add("result", Fault(status=status, body=body, headers={"X-Fal-Retryable": "false"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)

    assert caught.value.kind == "unavailable"
    assert caught.value.provider_code == "internal_server_error"
    assert "X-Fal-Retryable: false" in caught.value.message


async def test_a_body_that_is_not_json_is_malformed(adapter: FalAdapter, fake: FalFake) -> None:
    job = await started(adapter, FLUX_DEV, small("a fox"))
    fake.faults.add("status", Fault(malformed=True))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "malformed"


async def test_a_submit_answer_without_urls_is_malformed(
    adapter: FalAdapter, fake: FalFake
) -> None:
    fake.faults.add("submit", Fault(status=200, body={"request_id": "abc"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, Request(prompt="a fox"))
    assert caught.value.kind == "malformed"


async def test_no_answer_in_time_is_a_timeout(fake: FalFake) -> None:
    fake.faults.add("status", Fault(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as http:
        adapter = FalAdapter(ProviderConfig("fal", fake.api_key, fake.url), http)
        job = await started(adapter, FLUX_DEV, small("a fox"))

        with pytest.raises(ProviderError) as caught:
            await adapter.poll(job)
    assert caught.value.kind == "timeout"


async def test_a_refused_connection_is_unavailable(http: httpx.AsyncClient) -> None:
    adapter = FalAdapter(ProviderConfig("fal", "key", "http://127.0.0.1:1"), http)

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, Request(prompt="a fox"))
    assert caught.value.kind == "unavailable"


async def test_an_expired_result_url_answers_403(
    adapter: FalAdapter, fake: FalFake, http: httpx.AsyncClient
) -> None:
    fake.expire_after = 0.0
    result = await finish(adapter, await started(adapter, FLUX_DEV, small("a fox")))

    assert result.images[0].url is not None
    assert (await http.get(result.images[0].url)).status_code == 403


async def test_a_wrong_key_is_unauthorized(fake: FalFake, http: httpx.AsyncClient) -> None:
    adapter = FalAdapter(ProviderConfig("fal", "wrong", fake.url), http)

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_DEV, Request(prompt="a fox"))

    assert caught.value.kind == "unauthorized"
    assert caught.value.status == 401
    assert fake.accepted == 0


async def test_the_key_goes_only_to_the_configured_host(adapter: FalAdapter, fake: FalFake) -> None:
    job = await started(adapter, FLUX_DEV, small("a fox"))
    elsewhere = {key: url.replace("127.0.0.1", "localhost") for key, url in job.urls.items()}

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(Job(job.provider, job.model, job.id, urls=elsewhere))
    assert caught.value.kind == "unauthorized"  # the fake saw no key


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_stops_the_job(adapter: FalAdapter, fake: FalFake) -> None:
    fake.latency = 5.0
    job = await started(adapter, FLUX_DEV, small("a fox"))

    await adapter.cancel(job)

    assert fake.cancelled == 1
    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "cancelled"
    await adapter.cancel(job)  # ALREADY_COMPLETED: nothing left to stop, no error
    assert fake.cancelled == 1


# -- the status stream -------------------------------------------------------------------


async def test_watch_holds_the_status_stream_until_the_job_completes(
    adapter: FalAdapter, fake: FalFake
) -> None:
    fake.latency = 0.4
    job = await started(adapter, FLUX_DEV, small("a fox", seed=3))

    result = await adapter.watch(job, seconds=10)

    assert isinstance(result, Result)
    assert result.seed == 3
    assert result.details["metrics"] == {"inference_time": 0.4}
    assert fake.requests["status"] == 1  # one stream, not a poll every so often


async def test_a_watch_that_runs_out_of_time_says_where_the_job_is(
    adapter: FalAdapter, fake: FalFake
) -> None:
    fake.latency = 5.0
    job = await started(adapter, FLUX_DEV, small("a fox"))

    assert await adapter.watch(job, seconds=0.2) == Pending("IN_QUEUE")
    await adapter.cancel(job)


async def test_a_watched_job_that_fails_or_is_cancelled_raises(
    adapter: FalAdapter, fake: FalFake
) -> None:
    fake.latency = 0.2
    failing = await started(adapter, FLUX_DEV, small("explode"))
    with pytest.raises(ProviderError) as failed:
        await adapter.watch(failing, seconds=10)
    assert failed.value.kind == "failed"

    fake.latency = 5.0
    cancelled = await started(adapter, FLUX_DEV, small("a fox"))
    watching = asyncio.create_task(adapter.watch(cancelled, seconds=10))
    await asyncio.sleep(0.1)
    await adapter.cancel(cancelled)
    with pytest.raises(ProviderError) as stopped:
        await watching
    assert stopped.value.kind == "cancelled"


async def test_a_stream_refused_with_an_error_raises_it(adapter: FalAdapter, fake: FalFake) -> None:
    fake.latency = 0.2
    job = await started(adapter, FLUX_DEV, small("a fox"))
    fake.faults.add("status", Fault(status=503, body={"detail": "overloaded"}))

    with pytest.raises(ProviderError) as caught:
        await adapter.watch(job, seconds=10)

    assert caught.value.kind == "unavailable"
    assert isinstance(await adapter.watch(job, seconds=10), Result)  # the job was fine


# -- webhooks ----------------------------------------------------------------------------


async def test_the_webhook_is_delivered_and_verifies(adapter: FalAdapter, fake: FalFake) -> None:
    fake.latency = 0.1
    with Receiver() as receiver:
        job = await adapter.start(FLUX_DEV, small("a fox"), webhook_url=receiver.url)
        assert isinstance(job, Job)
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)

    assert fake.jobs[job.id]["webhook"] == receiver.url
    assert await adapter.verify_webhook(delivery.headers, delivery.body) == job.id
    body = json.loads(delivery.body)
    assert body["status"] == "OK"
    assert body["payload"]["images"][0]["url"].startswith(fake.url)


async def test_a_forged_or_stale_webhook_is_refused(adapter: FalAdapter, fake: FalFake) -> None:
    body = json.dumps({"request_id": "r1", "status": "OK", "payload": {}}).encode()
    assert await adapter.verify_webhook(fake.sign_webhook("r1", body), body) == "r1"

    forgeries = {
        "tampered body": (fake.sign_webhook("r1", body), body.replace(b"OK", b"KO")),
        "another key": (fake.sign_webhook("r1", body, key=Ed25519PrivateKey.generate()), body),
        "old timestamp": (fake.sign_webhook("r1", body, timestamp=int(time.time()) - 600), body),
        "other request": (fake.sign_webhook("r2", body), body),
        "no signature": ({"X-Fal-Webhook-Request-Id": "r1"}, body),
    }
    for case, (headers, sent) in forgeries.items():
        with pytest.raises(ProviderError) as caught:
            await adapter.verify_webhook(headers, sent)
        assert caught.value.kind == "unauthorized", case
    assert fake.requests["jwks"] == 1  # the keys are cached


# -- accounting --------------------------------------------------------------------------


async def test_accepted_jobs_are_the_starts_that_got_a_job(
    adapter: FalAdapter, fake: FalFake
) -> None:
    fake.faults.add("submit", Fault(status=503, body={"detail": "busy"}))
    outcomes = []
    for request in (
        Request(prompt="a fox"),  # 503
        Request(prompt="a fox"),
        Request(prompt="a fox", negative_prompt="no"),  # refused before sending
        Request(prompt="something forbidden"),  # accepted, then moderated
    ):
        with contextlib.suppress(ProviderError):
            outcomes.append(await adapter.start(FLUX_DEV, request))

    assert fake.accepted == len([job for job in outcomes if isinstance(job, Job)]) == 2
