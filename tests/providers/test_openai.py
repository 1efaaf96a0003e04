"""OpenAIAdapter against OpenAIFake: the fields it sends, how it reads every answer."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage

from imagegraph.providers.base import ProviderConfig, ProviderError, Request, Route, SourceImage
from imagegraph.providers.openai import OpenAIAdapter, nearest_size
from imagegraph.testing.fakes.openai import OpenAIFake
from imagegraph.testing.fakes.server import Fault

SIZES = ["1024x1024", "1536x1024", "1024x1536"]
GPT_IMAGE = Route("openai", "gpt-image-1.5", options={"size": "openai_size", "sizes": SIZES})
EDIT = Route("openai", "gpt-image-1.5")  # the catalog's edit:image route: no options


def source_image(width: int = 64, height: int = 48, mode: str = "RGB") -> SourceImage:
    buffer = io.BytesIO()
    PILImage.new(mode, (width, height), (200, 40, 40, 255)[: len(mode)]).save(buffer, "PNG")
    return SourceImage(buffer.getvalue(), "image/png", width, height)


def decoded(data: bytes | None) -> PILImage.Image:
    assert data is not None
    return PILImage.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIFake]:
    with OpenAIFake() as fake:
        assert isinstance(fake, OpenAIFake)
        yield fake


@pytest.fixture
def fake(server: OpenAIFake) -> OpenAIFake:
    server.reset()
    return server


@pytest.fixture
def adapter(fake: OpenAIFake, http: httpx.AsyncClient) -> OpenAIAdapter:
    return OpenAIAdapter(ProviderConfig("openai", "test-key", base_url=fake.url), http)


async def failure(adapter: OpenAIAdapter, request: Request, route: Route = GPT_IMAGE) -> Any:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request)
    return caught.value


async def test_generation_sends_our_fields_and_reads_images_usage_and_request_id(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    request = Request(
        prompt="a red fox", width=1536, height=1024, num_images=2, output_format="webp"
    )
    result = await adapter.start(GPT_IMAGE, request)

    received = fake.received[-1]
    assert received["endpoint"] == "generate"
    assert received["headers"]["authorization"] == "Bearer test-key"
    assert received["fields"] == {
        "model": "gpt-image-1.5",
        "prompt": "a red fox",
        "n": 2,
        "size": "1536x1024",
        "quality": "auto",
        "output_format": "webp",
    }
    assert len(result.images) == 2
    for image in result.images:
        picture = decoded(image.data)
        assert (picture.format, picture.size) == ("WEBP", (1536, 1024))
        assert image.mime_type == "image/webp"
    assert result.request_id is not None
    assert result.request_id.startswith("req_")
    usage = result.details["usage"]
    assert usage["output_tokens"] > 0
    assert (result.cost, result.cost_unit) == (usage["total_tokens"], "tokens")
    assert result.seed is None  # OpenAI neither takes nor reports one
    assert fake.accepted == 1


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [
        (1024, 1024, "1024x1024"),
        (1280, 720, "1536x1024"),
        (1000, 1500, "1024x1536"),
        (1100, 1000, "1024x1024"),
        (4000, 1000, "1536x1024"),
    ],
)
def test_size_is_the_nearest_listed_size_by_aspect_ratio(
    width: int, height: int, size: str
) -> None:
    assert nearest_size(width, height, SIZES) == size


async def test_size_sent_is_the_nearest_and_auto_without_dimensions(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    await adapter.start(GPT_IMAGE, Request(prompt="a fox", width=1200, height=1800))
    assert fake.received[-1]["fields"]["size"] == "1024x1536"
    await adapter.start(GPT_IMAGE, Request(prompt="a fox"))
    assert fake.received[-1]["fields"]["size"] == "auto"


@pytest.mark.parametrize(
    ("tolerance", "moderation"), [(0, "auto"), (3, "auto"), (4, "low"), (6, "low")]
)
async def test_safety_tolerance_maps_to_moderation(
    adapter: OpenAIAdapter, fake: OpenAIFake, tolerance: int, moderation: str
) -> None:
    await adapter.start(GPT_IMAGE, Request(prompt="a fox", safety_tolerance=tolerance))
    assert fake.received[-1]["fields"]["moderation"] == moderation


async def test_unset_fields_are_not_sent_and_extra_wins(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    extra = {"quality": "high", "background": "transparent"}
    await adapter.start(GPT_IMAGE, Request(prompt="a fox", extra=extra))
    fields = fake.received[-1]["fields"]
    assert fields["quality"] == "high"
    assert fields["background"] == "transparent"
    assert "moderation" not in fields
    assert "output_format" not in fields


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"negative_prompt": "blurry"}, "negative_prompt"),
        ({"seed": 7}, "seed"),
        ({"steps": 20}, "steps"),
        ({"guidance": 3.5}, "guidance"),
        ({"scale": 2}, "scale"),
        ({"num_images": 11}, "num_images"),
    ],
)
async def test_parameters_the_model_does_not_take_are_refused_by_name(
    adapter: OpenAIAdapter, fake: OpenAIFake, change: dict[str, Any], param: str
) -> None:
    error = await failure(adapter, Request(prompt="a fox", **change))
    assert error.kind == "bad_request"
    assert param in error.message
    assert "gpt-image-1.5" in error.message
    assert sum(fake.requests.values()) == 0  # refused before anything was sent


async def test_edit_sends_multipart_with_image_and_mask(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    image = source_image(64, 64)
    mask = source_image(64, 64, mode="RGBA")
    request = Request(prompt="add a hat", image=image, mask=mask, output_format="png")
    result = await adapter.start(EDIT, request)

    received = fake.received[-1]
    assert received["endpoint"] == "edit"
    assert received["headers"]["content-type"].startswith("multipart/form-data")
    assert received["fields"] == {
        "model": "gpt-image-1.5",
        "prompt": "add a hat",
        "n": "1",  # form fields are text
        "size": "auto",
        "quality": "auto",
        "output_format": "png",
    }
    assert received["files"]["image"] == [("image/png", image.data)]
    assert received["files"]["mask"] == [("image/png", mask.data)]
    assert decoded(result.images[0].data).size == (1024, 1024)
    assert result.details["usage"]["input_tokens_details"]["image_tokens"] > 0


async def test_an_edit_refuses_safety_tolerance_and_a_mask_needs_an_image(
    adapter: OpenAIAdapter,
) -> None:
    image = source_image(64, 64)
    error = await failure(adapter, Request(prompt="x", image=image, safety_tolerance=5), EDIT)
    assert (error.kind, "safety_tolerance" in error.message) == ("bad_request", True)
    error = await failure(adapter, Request(prompt="x", mask=image), EDIT)
    assert (error.kind, "mask" in error.message) == ("bad_request", True)
    edit = Route("openai", "gpt-image-1.5", options={"operation": "edit"})
    error = await failure(adapter, Request(prompt="x"), edit)
    assert (error.kind, "image" in error.message) == ("bad_request", True)


async def test_the_fake_refuses_what_the_api_refuses(adapter: OpenAIAdapter) -> None:
    error = await failure(adapter, Request(prompt="a fox", extra={"response_format": "b64_json"}))
    assert (error.kind, error.status, error.provider_code) == (
        "bad_request",
        400,
        "unknown_parameter",
    )
    assert "response_format" in error.message
    unlisted = Route("openai", "gpt-image-1.5", options={"sizes": ["512x512"]})
    error = await failure(adapter, Request(prompt="a fox", width=512, height=512), unlisted)
    assert (error.kind, error.provider_code) == ("bad_request", "invalid_value")
    mask = source_image(32, 32, mode="RGBA")
    error = await failure(adapter, Request(prompt="x", image=source_image(64, 64), mask=mask), EDIT)
    assert (error.kind, error.provider_code) == ("bad_request", "invalid_value")


async def test_moderation_block_is_content_blocked_and_not_charged(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    error = await failure(adapter, Request(prompt="something forbidden"))
    assert (error.kind, error.status, error.provider_code) == (
        "content_blocked",
        400,
        "moderation_blocked",
    )
    assert error.request_id is not None
    assert not error.retryable
    assert fake.accepted == 0


async def test_image_generation_user_error_about_safety_is_content_blocked(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    body = {
        "error": {
            "message": "This request has been blocked by our content filters (safety system).",
            "type": "image_generation_user_error",
            "param": None,
            "code": None,
        }
    }
    fake.faults.add("generate", Fault(status=400, body=body))
    error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.provider_code) == ("content_blocked", "image_generation_user_error")


async def test_rate_limit_carries_retry_after_and_quota_is_payment_required(
    adapter: OpenAIAdapter, fake: OpenAIFake
) -> None:
    limited = {"error": {"message": "Rate limit reached", "type": "requests", "code": None}}
    fake.faults.add("generate", Fault(status=429, body=limited, headers={"retry-after-ms": "1500"}))
    error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.retry_after, error.retryable) == ("rate_limited", 1.5, True)

    quota = {
        "error": {
            "message": "You exceeded your current quota.",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        }
    }
    fake.faults.add("generate", Fault(status=429, body=quota))
    error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.retryable) == ("payment_required", False)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_unavailable(
    adapter: OpenAIAdapter, fake: OpenAIFake, status: int
) -> None:
    body = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    fake.faults.add("generate", Fault(status=status, body=body))
    error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.status, error.retryable) == ("unavailable", status, True)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(malformed=True),
        Fault(status=200, body={"created": 1, "data": []}),
        Fault(status=200, body={"created": 1, "data": [{"url": "https://example.com/x.png"}]}),
        Fault(status=200, body={"created": 1, "data": [{"b64_json": "not base64!"}]}),
    ],
)
async def test_malformed_answers_are_malformed(
    adapter: OpenAIAdapter, fake: OpenAIFake, fault: Fault
) -> None:
    fake.faults.add("generate", fault)
    error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.retryable) == ("malformed", True)


async def test_a_hanging_answer_times_out(fake: OpenAIFake) -> None:
    fake.faults.add("generate", Fault(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as http:
        adapter = OpenAIAdapter(ProviderConfig("openai", "test-key", base_url=fake.url), http)
        error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.retryable) == ("timeout", True)


async def test_a_refused_connection_is_unavailable(http: httpx.AsyncClient) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ProviderConfig("openai", "test-key", base_url=f"http://127.0.0.1:{port}")
    error = await failure(OpenAIAdapter(config, http), Request(prompt="a fox"))
    assert error.kind == "unavailable"


async def test_a_wrong_key_is_unauthorized(fake: OpenAIFake, http: httpx.AsyncClient) -> None:
    adapter = OpenAIAdapter(ProviderConfig("openai", "wrong", base_url=fake.url), http)
    error = await failure(adapter, Request(prompt="a fox"))
    assert (error.kind, error.status, error.provider_code) == (
        "unauthorized",
        401,
        "invalid_api_key",
    )
    assert fake.accepted == 0
