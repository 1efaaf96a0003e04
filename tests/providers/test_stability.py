"""StabilityAdapter against StabilityFake: the fields it sends, how it reads every answer."""

from __future__ import annotations

import asyncio
import io
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
    Result,
    Route,
    SourceImage,
)
from imagegraph.providers.stability import ChargedRefusal, StabilityAdapter, nearest_aspect_ratio
from imagegraph.testing.fakes.server import Fault
from imagegraph.testing.fakes.stability import SIZES, StabilityFake

RATIOS = ["21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21"]
CORE = Route("stability", "core", options={"size": "aspect_ratio", "aspectRatios": RATIOS})
ULTRA = Route("stability", "ultra", options={"size": "aspect_ratio", "aspectRatios": RATIOS})
FAST = Route("stability", "upscale/fast")
CREATIVE = Route("stability", "upscale/creative")
CUTOUT = Route("stability", "edit/remove-background")


def source_image(width: int = 64, height: int = 64) -> SourceImage:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (40, 120, 200)).save(buffer, "PNG")
    return SourceImage(buffer.getvalue(), "image/png", width, height)


def decoded(data: bytes | None) -> PILImage.Image:
    assert data is not None
    return PILImage.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def server() -> Iterator[StabilityFake]:
    with StabilityFake() as fake:
        assert isinstance(fake, StabilityFake)
        yield fake


@pytest.fixture
def fake(server: StabilityFake) -> StabilityFake:
    server.reset()
    server.content_filtered = False
    return server


@pytest.fixture
def adapter(fake: StabilityFake, http: httpx.AsyncClient) -> StabilityAdapter:
    return StabilityAdapter(ProviderConfig("stability", "test-key", base_url=fake.url), http)


async def failure(adapter: StabilityAdapter, route: Route, request: Request) -> Any:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request)
    return caught.value


async def test_core_sends_multipart_fields_and_reads_image_seed_and_cost(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    request = Request(
        prompt="a lighthouse",
        negative_prompt="fog",
        width=1920,
        height=1080,
        seed=42,
        output_format="jpeg",
        safety_tolerance=6,  # ignored: Stability has no per-request moderation setting
    )
    result = await adapter.start(CORE, request)

    received = fake.received[-1]
    assert received["path"] == "/v2beta/stable-image/generate/core"
    assert received["headers"]["content-type"].startswith("multipart/form-data")
    assert received["headers"]["accept"] == "image/*"
    assert received["headers"]["authorization"] == "Bearer test-key"
    assert received["fields"] == {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "aspect_ratio": "16:9",
        "seed": "42",
        "output_format": "jpeg",
    }
    assert received["files"] == {}
    assert isinstance(result, Result)
    picture = decoded(result.images[0].data)
    assert (picture.format, picture.size) == ("JPEG", SIZES["16:9"])
    assert result.images[0].mime_type == "image/jpeg"
    assert result.seed == 42
    assert result.request_id is not None
    assert (result.cost, result.cost_unit) == (3, "stability_credits")
    assert result.details["finishReason"] == "SUCCESS"
    assert fake.accepted == 1


async def test_a_prompt_alone_is_still_multipart_and_the_seed_comes_back(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    result = await adapter.start(ULTRA, Request(prompt="a lighthouse"))
    received = fake.received[-1]
    assert received["headers"]["content-type"].startswith("multipart/form-data")
    assert received["fields"] == {"prompt": "a lighthouse"}
    assert isinstance(result, Result)
    assert result.seed is not None
    assert result.seed > 0
    assert (result.cost, result.cost_unit) == (8, "stability_credits")
    assert decoded(result.images[0].data).size == SIZES["1:1"]


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [
        (1024, 1024, "1:1"),
        (1024, 768, "5:4"),
        (1536, 1024, "3:2"),
        (2560, 1080, "21:9"),
        (768, 1366, "9:16"),
        (900, 1100, "4:5"),
        (400, 2000, "9:21"),
    ],
)
def test_aspect_ratio_is_the_nearest_listed(width: int, height: int, ratio: str) -> None:
    assert nearest_aspect_ratio(width, height, RATIOS) == ratio


async def test_the_route_s_aspect_ratios_are_the_choices(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    narrow = Route("stability", "core", options={"aspectRatios": ["1:1", "9:16", "custom"]})
    await adapter.start(narrow, Request(prompt="x", width=1600, height=900))
    assert fake.received[-1]["fields"]["aspect_ratio"] == "1:1"


@pytest.mark.parametrize(
    ("route", "change", "param"),
    [
        (CORE, {"steps": 30}, "steps"),
        (CORE, {"guidance": 5.0}, "guidance"),
        (CORE, {"num_images": 2}, "num_images"),
        (CORE, {"image": source_image()}, "image"),
        (ULTRA, {"mask": source_image()}, "mask"),
        (FAST, {"image": source_image(), "prompt": "sharper"}, "prompt"),
        (FAST, {"image": source_image(), "scale": 2}, "scale"),
        (FAST, {"image": source_image(), "seed": 3}, "seed"),
        (CUTOUT, {"image": source_image(), "output_format": "jpeg"}, "output_format"),
        (CUTOUT, {"image": source_image(), "width": 64, "height": 64}, "width, height"),
        (CREATIVE, {"image": source_image()}, "prompt"),
        (FAST, {}, "image"),
    ],
)
async def test_parameters_the_model_does_not_take_are_refused_by_name(
    adapter: StabilityAdapter,
    fake: StabilityFake,
    route: Route,
    change: dict[str, Any],
    param: str,
) -> None:
    request = Request(**{"prompt": "x", **change}) if route in (CORE, ULTRA) else Request(**change)
    error = await failure(adapter, route, request)
    assert error.kind == "bad_request"
    assert param in error.message
    assert route.model in error.message
    assert sum(fake.requests.values()) == 0


async def test_an_unknown_model_is_refused(adapter: StabilityAdapter) -> None:
    error = await failure(adapter, Route("stability", "sd3"), Request(prompt="x"))
    assert error.kind == "bad_request"
    assert "sd3" in error.message


async def test_fast_upscale_is_four_times_larger(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    image = source_image(64, 48)
    result = await adapter.start(FAST, Request(image=image, scale=4, output_format="webp"))

    received = fake.received[-1]
    assert received["path"] == "/v2beta/stable-image/upscale/fast"
    assert received["fields"] == {"output_format": "webp"}
    assert received["files"]["image"] == [("image/png", image.data)]
    assert isinstance(result, Result)
    picture = decoded(result.images[0].data)
    assert (picture.format, picture.size) == ("WEBP", (256, 192))
    assert result.cost is None  # the reference gives no price for it


async def test_background_removal_keeps_the_size_and_cuts_out(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    result = await adapter.start(CUTOUT, Request(image=source_image(96, 64), output_format="png"))
    assert fake.received[-1]["path"] == "/v2beta/stable-image/edit/remove-background"
    assert isinstance(result, Result)
    picture = decoded(result.images[0].data)
    assert (picture.size, picture.mode) == ((96, 64), "RGBA")
    assert picture.getpixel((0, 0))[3] == 0  # type: ignore[index]


async def test_creative_upscale_is_a_job_polled_until_its_image_is_ready(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    fake.latency = 0.3
    image = source_image(64, 64)
    job = await adapter.start(CREATIVE, Request(prompt="crisp", image=image, seed=9))

    assert isinstance(job, Job)
    assert (job.provider, job.model) == ("stability", "upscale/creative")
    assert fake.received[-1]["fields"] == {"prompt": "crisp", "seed": "9"}
    assert fake.received[-1]["headers"]["accept"] == "application/json"
    assert fake.accepted == 1
    restored = Job.from_json(job.to_json())  # as the runner keeps it
    assert await adapter.poll(restored) == Pending(status="in-progress")
    await asyncio.sleep(0.35)
    result = await adapter.poll(restored)
    assert isinstance(result, Result)
    assert decoded(result.images[0].data).size == (256, 256)
    assert result.seed == 9
    assert fake.requests["result"] == 2


async def test_polling_an_unknown_job_is_not_found(adapter: StabilityAdapter) -> None:
    with pytest.raises(ProviderError) as caught:
        await adapter.poll(Job(provider="stability", model="upscale/creative", id="f" * 64))
    assert (caught.value.kind, caught.value.provider_code) == ("not_found", "not_found")


async def test_moderation_403_is_content_blocked_and_not_charged(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    error = await failure(adapter, CORE, Request(prompt="something forbidden"))
    assert (error.kind, error.status, error.provider_code) == (
        "content_blocked",
        403,
        "content_moderation",
    )
    assert "not charged" in error.message
    assert error.request_id is not None
    assert fake.accepted == 0


async def test_a_filtered_image_is_content_blocked_but_charged(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    fake.content_filtered = True
    error = await failure(adapter, ULTRA, Request(prompt="something forbidden"))
    assert isinstance(error, ChargedRefusal)
    assert (error.kind, error.provider_code) == ("content_blocked", "CONTENT_FILTERED")
    assert "blurred" in error.message
    assert "charged 8 credits" in error.message
    assert (error.cost, error.cost_unit) == (8, "stability_credits")
    assert error.seed is not None
    assert fake.accepted == 1


async def test_rate_limit_is_rate_limited_without_retry_after(
    adapter: StabilityAdapter, fake: StabilityFake
) -> None:
    body = {
        "id": "abc",
        "name": "rate_limit_exceeded",
        "errors": ["You have exceeded the rate limit of 150 requests within a 10 second period"],
    }
    fake.faults.add("generate", Fault(status=429, body=body))
    error = await failure(adapter, CORE, Request(prompt="x"))
    assert (error.kind, error.retry_after, error.provider_code) == (
        "rate_limited",
        None,
        "rate_limit_exceeded",
    )
    assert error.request_id == "abc"
    assert "150 requests" in error.message


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_unavailable(
    adapter: StabilityAdapter, fake: StabilityFake, status: int
) -> None:
    body = {"id": "abc", "name": "internal_error", "errors": ["An unexpected server error"]}
    fake.faults.add("upscale", Fault(status=status, body=body))
    error = await failure(adapter, FAST, Request(image=source_image()))
    assert (error.kind, error.status) == ("unavailable", status)


async def test_other_errors_keep_their_name(adapter: StabilityAdapter, fake: StabilityFake) -> None:
    body = {"id": "abc", "name": "payload_too_large", "errors": ["body: over 10MiB"]}
    fake.faults.add("remove_background", Fault(status=413, body=body))
    error = await failure(adapter, CUTOUT, Request(image=source_image()))
    assert (error.kind, error.provider_code) == ("bad_request", "payload_too_large")
    error = await failure(adapter, CORE, Request(prompt="x", seed=2**33))
    assert (error.kind, error.status, error.provider_code) == ("bad_request", 400, "bad_request")


@pytest.mark.parametrize(
    "fault",
    [Fault(malformed=True), Fault(status=200, body=b"", headers={"content-type": "image/png"})],
)
async def test_malformed_answers_are_malformed(
    adapter: StabilityAdapter, fake: StabilityFake, fault: Fault
) -> None:
    fake.faults.add("generate", fault)
    error = await failure(adapter, CORE, Request(prompt="x"))
    assert error.kind == "malformed"


async def test_a_hanging_answer_times_out(fake: StabilityFake) -> None:
    fake.faults.add("generate", Fault(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as http:
        config = ProviderConfig("stability", "test-key", base_url=fake.url)
        error = await failure(StabilityAdapter(config, http), CORE, Request(prompt="x"))
    assert error.kind == "timeout"


async def test_a_wrong_key_is_unauthorized(fake: StabilityFake, http: httpx.AsyncClient) -> None:
    adapter = StabilityAdapter(ProviderConfig("stability", "wrong", base_url=fake.url), http)
    error = await failure(adapter, CORE, Request(prompt="x"))
    assert (error.kind, error.status, error.provider_code) == ("unauthorized", 401, "unauthorized")
    assert fake.accepted == 0
