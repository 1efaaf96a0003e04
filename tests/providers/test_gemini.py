"""GeminiAdapter against GeminiFake: the body it sends, how it reads every answer."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage

from imagegraph.providers.base import ProviderConfig, ProviderError, Request, Route, SourceImage
from imagegraph.providers.gemini import GeminiAdapter, image_size, nearest_aspect_ratio
from imagegraph.testing.fakes.gemini import SIZES, GeminiFake
from imagegraph.testing.fakes.server import Fault

RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
GEMINI = Route(
    "gemini", "gemini-3.1-flash-image", options={"size": "aspect_ratio", "aspectRatios": RATIOS}
)
EDIT = Route("gemini", "gemini-3.1-flash-image")  # the catalog's edit:image route: no options


def source_image(width: int = 96, height: int = 64) -> SourceImage:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (30, 160, 90)).save(buffer, "PNG")
    return SourceImage(buffer.getvalue(), "image/png", width, height)


def decoded(data: bytes | None) -> PILImage.Image:
    assert data is not None
    return PILImage.open(io.BytesIO(data))


def answer(candidate: dict[str, Any]) -> Fault:
    """A 200 whose only candidate is `candidate`."""
    return Fault(status=200, body={"candidates": [candidate], "responseId": "r1"})


@pytest.fixture(scope="module")
def server() -> Iterator[GeminiFake]:
    with GeminiFake() as fake:
        assert isinstance(fake, GeminiFake)
        yield fake


@pytest.fixture
def fake(server: GeminiFake) -> GeminiFake:
    server.reset()
    server.block = "prompt"
    return server


@pytest.fixture
def adapter(fake: GeminiFake, http: httpx.AsyncClient) -> GeminiAdapter:
    return GeminiAdapter(ProviderConfig("gemini", "test-key", base_url=fake.url), http)


async def failure(adapter: GeminiAdapter, request: Request, route: Route = GEMINI) -> Any:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request)
    return caught.value


async def test_generation_sends_the_body_and_reads_image_usage_and_ids(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    request = Request(prompt="a kite", width=1344, height=768, safety_tolerance=6)
    result = await adapter.start(GEMINI, request)

    received = fake.received[-1]
    assert received["model"] == "gemini-3.1-flash-image"
    assert received["headers"]["x-goog-api-key"] == "test-key"
    assert received["body"] == {
        "contents": [{"role": "user", "parts": [{"text": "a kite"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"},
        },
    }
    picture = decoded(result.images[0].data)
    assert (picture.format, picture.size) == ("PNG", (2688, 1536))
    assert result.images[0].mime_type == "image/png"
    assert result.request_id is not None
    assert result.model_version == "gemini-3.1-flash-image"
    usage = result.details["usage"]
    assert (result.cost, result.cost_unit) == (usage["totalTokenCount"], "tokens")
    assert result.details["finishReason"] == "STOP"
    assert fake.requests["generate"] == 1
    assert fake.accepted == 1


async def test_without_dimensions_no_image_config_is_sent_and_seed_goes_in_config(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    result = await adapter.start(GEMINI, Request(prompt="a kite", seed=11))
    assert fake.received[-1]["body"]["generationConfig"] == {
        "responseModalities": ["IMAGE"],
        "seed": 11,
    }
    assert decoded(result.images[0].data).size == SIZES["1:1"]


@pytest.mark.parametrize(
    ("width", "height", "ratio", "size"),
    [
        (1024, 1024, "1:1", "1K"),
        (800, 1000, "4:5", "1K"),
        (1920, 1080, "16:9", "2K"),
        (2048, 2048, "1:1", "2K"),
        (3000, 1000, "21:9", "4K"),
        (600, 900, "2:3", "1K"),
        (4096, 3072, "4:3", "4K"),
    ],
)
def test_aspect_ratio_is_the_nearest_and_size_reaches_the_larger_side(
    width: int, height: int, ratio: str, size: str
) -> None:
    assert nearest_aspect_ratio(width, height, RATIOS) == ratio
    assert image_size(width, height, ["1K", "2K", "4K"]) == size


def test_image_size_is_capped_at_the_largest_tier_the_route_lists() -> None:
    assert image_size(4096, 4096, ["1K", "2K"]) == "2K"


async def test_an_edit_sends_the_image_as_inline_data(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    image = source_image(96, 64)
    result = await adapter.start(EDIT, Request(prompt="make it night", image=image))

    parts = fake.received[-1]["body"]["contents"][0]["parts"]
    assert parts == [
        {"text": "make it night"},
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image.data).decode()}},
    ]
    assert "imageConfig" not in fake.received[-1]["body"]["generationConfig"]
    assert fake.requests["edit"] == 1
    assert decoded(result.images[0].data).size == SIZES["3:2"]  # the input's ratio


async def test_extra_merges_into_the_generation_config(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    extra = {"generationConfig": {"temperature": 0.4}}
    await adapter.start(GEMINI, Request(prompt="a kite", extra=extra))
    assert fake.received[-1]["body"]["generationConfig"] == {
        "responseModalities": ["IMAGE"],
        "temperature": 0.4,
    }


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"negative_prompt": "rain"}, "negative_prompt"),
        ({"num_images": 2}, "num_images"),
        ({"steps": 20}, "steps"),
        ({"guidance": 4.0}, "guidance"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"image": source_image(), "mask": source_image()}, "mask"),
        ({"scale": 2}, "scale"),
    ],
)
async def test_parameters_the_model_does_not_take_are_refused_by_name(
    adapter: GeminiAdapter, fake: GeminiFake, change: dict[str, Any], param: str
) -> None:
    error = await failure(adapter, Request(prompt="a kite", **change))
    assert error.kind == "bad_request"
    assert param in error.message
    assert "gemini-3.1-flash-image" in error.message
    assert sum(fake.requests.values()) == 0


async def test_the_fake_refuses_unknown_fields_like_google(adapter: GeminiAdapter) -> None:
    extra = {"generationConfig": {"imageConfig": {"personGeneration": "ALLOW_ALL"}}}
    error = await failure(adapter, Request(prompt="a kite", extra=extra))
    assert (error.kind, error.status, error.provider_code) == (
        "bad_request",
        400,
        "INVALID_ARGUMENT",
    )
    assert "personGeneration" in error.message


@pytest.mark.parametrize("block", ["prompt", "image"])
async def test_the_fake_s_moderation_is_content_blocked(
    adapter: GeminiAdapter, fake: GeminiFake, block: Any
) -> None:
    fake.block = block
    error = await failure(adapter, Request(prompt="something forbidden"))
    code = "SAFETY" if block == "prompt" else "IMAGE_SAFETY"
    assert (error.kind, error.provider_code) == ("content_blocked", code)
    assert error.request_id is not None
    assert fake.accepted == 0


@pytest.mark.parametrize(
    "reason",
    ["IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "PROHIBITED_CONTENT", "SAFETY", "IMAGE_OTHER"],
)
async def test_safety_finish_reasons_are_content_blocked(
    adapter: GeminiAdapter, fake: GeminiFake, reason: str
) -> None:
    fake.faults.add("generate", answer({"finishReason": reason, "index": 0}))
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.provider_code, error.request_id) == ("content_blocked", reason, "r1")


async def test_a_blocked_prompt_of_any_reason_is_content_blocked(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    body = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "responseId": "r2"}
    fake.faults.add("generate", Fault(status=200, body=body))
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.provider_code) == ("content_blocked", "PROHIBITED_CONTENT")


async def test_no_image_is_a_failure_with_the_model_s_words(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    text = {"role": "model", "parts": [{"text": "Which kite do you mean?"}]}
    fake.faults.add("generate", answer({"finishReason": "NO_IMAGE", "content": text}))
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.provider_code) == ("failed", "NO_IMAGE")
    assert "Which kite" in error.message


@pytest.mark.parametrize(
    "fault",
    [
        Fault(malformed=True),
        Fault(status=200, body={"candidates": []}),
        answer({"finishReason": "STOP", "content": {"parts": [{"text": "Here it is!"}]}}),
        answer({"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "%%"}}]}}),
    ],
)
async def test_malformed_answers_are_malformed(
    adapter: GeminiAdapter, fake: GeminiFake, fault: Fault
) -> None:
    fake.faults.add("generate", fault)
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.retryable) == ("malformed", True)


async def test_resource_exhausted_is_rate_limited_with_its_retry_delay(
    adapter: GeminiAdapter, fake: GeminiFake
) -> None:
    body = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}],
        }
    }
    fake.faults.add("generate", Fault(status=429, body=body))
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.retry_after, error.provider_code) == (
        "rate_limited",
        37.0,
        "RESOURCE_EXHAUSTED",
    )
    fake.faults.add("generate", Fault(status=429, body=body, headers={"Retry-After": "5"}))
    error = await failure(adapter, Request(prompt="a kite"))
    assert error.retry_after == 5.0  # the header, when there is one


@pytest.mark.parametrize(("status", "name"), [(500, "INTERNAL"), (503, "UNAVAILABLE")])
async def test_server_errors_are_unavailable(
    adapter: GeminiAdapter, fake: GeminiFake, status: int, name: str
) -> None:
    body = {"error": {"code": status, "message": "The service is overloaded.", "status": name}}
    fake.faults.add("generate", Fault(status=status, body=body))
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.status, error.provider_code) == ("unavailable", status, name)


async def test_a_hanging_answer_times_out(fake: GeminiFake) -> None:
    fake.faults.add("generate", Fault(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as http:
        adapter = GeminiAdapter(ProviderConfig("gemini", "test-key", base_url=fake.url), http)
        error = await failure(adapter, Request(prompt="a kite"))
    assert error.kind == "timeout"


@pytest.mark.parametrize(("key", "status"), [("wrong", 400), (None, 403)])
async def test_a_wrong_or_missing_key_is_unauthorized(
    fake: GeminiFake, http: httpx.AsyncClient, key: str | None, status: int
) -> None:
    adapter = GeminiAdapter(ProviderConfig("gemini", key, base_url=fake.url), http)
    error = await failure(adapter, Request(prompt="a kite"))
    assert (error.kind, error.status) == ("unauthorized", status)
    assert fake.accepted == 0
