"""The official `openai` and `google-genai` SDKs against OpenAIFake and GeminiFake: if a fake
drifts from the real protocol (paths, field names, body shapes, error bodies), these fail."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image as PILImage

from imagegraph.testing.fakes.gemini import SIZES, GeminiFake
from imagegraph.testing.fakes.openai import OpenAIFake


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def decoded(data: bytes | None) -> PILImage.Image:
    assert data is not None
    return PILImage.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[OpenAIFake]:
    with OpenAIFake() as fake:
        assert isinstance(fake, OpenAIFake)
        yield fake


@pytest.fixture(scope="module")
def gemini_fake() -> Iterator[GeminiFake]:
    with GeminiFake() as fake:
        assert isinstance(fake, GeminiFake)
        yield fake


@pytest.fixture
async def client(openai_fake: OpenAIFake) -> AsyncIterator[openai.AsyncOpenAI]:
    openai_fake.received.clear()
    async with openai.AsyncOpenAI(
        api_key="test-key", base_url=openai_fake.url + "/v1", max_retries=0
    ) as client:
        yield client


@pytest.fixture
def genai_client(gemini_fake: GeminiFake) -> Iterator[genai.Client]:
    # The synchronous client: the asynchronous one picks aiohttp when it is installed (it is,
    # for other tests) and subclasses its ClientSession, which aiohttp warns about.
    gemini_fake.received.clear()
    with genai.Client(
        api_key="test-key", http_options=types.HttpOptions(base_url=gemini_fake.url)
    ) as client:
        yield client


async def test_openai_sdk_generates_an_image(
    client: openai.AsyncOpenAI, openai_fake: OpenAIFake
) -> None:
    response = await client.images.generate(
        model="gpt-image-1.5",
        prompt="a red fox",
        size="1536x1024",
        n=1,
        quality="low",
        output_format="jpeg",
        moderation="low",
    )

    assert response.data is not None
    assert response.data[0].b64_json is not None
    picture = decoded(base64.b64decode(response.data[0].b64_json))
    assert (picture.format, picture.size) == ("JPEG", (1536, 1024))
    assert (response.size, response.quality, response.output_format) == ("1536x1024", "low", "jpeg")
    assert response.usage is not None
    assert response.usage.total_tokens > 0
    assert openai_fake.received[-1]["fields"]["moderation"] == "low"


async def test_openai_sdk_edits_an_image_with_a_mask(
    client: openai.AsyncOpenAI, openai_fake: OpenAIFake
) -> None:
    response = await client.images.edit(
        model="gpt-image-1.5",
        prompt="add a hat",
        image=("fox.png", png(64, 64), "image/png"),
        mask=("mask.png", png(64, 64, "RGBA"), "image/png"),
        size="1024x1024",
        input_fidelity="high",
    )

    assert response.data is not None
    assert response.data[0].b64_json is not None
    assert decoded(base64.b64decode(response.data[0].b64_json)).size == (1024, 1024)
    received = openai_fake.received[-1]
    assert received["endpoint"] == "edit"
    assert set(received["files"]) == {"image", "mask"}
    assert received["fields"]["input_fidelity"] == "high"


async def test_openai_sdk_gets_the_typed_moderation_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="gpt-image-1.5", prompt="something forbidden")
    assert (caught.value.code, caught.value.type) == (
        "moderation_blocked",
        "image_generation_user_error",
    )
    assert caught.value.request_id is not None


async def test_openai_sdk_legacy_parameters_are_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(
            model="gpt-image-1.5", prompt="a fox", response_format="b64_json"
        )
    assert (caught.value.code, caught.value.param) == ("unknown_parameter", "response_format")


async def test_openai_sdk_wrong_key_is_an_authentication_error(openai_fake: OpenAIFake) -> None:
    async with openai.AsyncOpenAI(
        api_key="wrong", base_url=openai_fake.url + "/v1", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.images.generate(model="gpt-image-1.5", prompt="a fox")
    assert caught.value.code == "invalid_api_key"


def test_genai_sdk_generates_an_image(genai_client: genai.Client, gemini_fake: GeminiFake) -> None:
    response = genai_client.models.generate_content(
        model="gemini-3.1-flash-image",
        contents="a kite over the sea",
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(aspect_ratio="16:9", image_size="1K"),
        ),
    )

    assert response.candidates
    assert response.candidates[0].content
    parts = response.candidates[0].content.parts or []
    inline = parts[0].inline_data
    assert inline is not None
    assert inline.mime_type == "image/png"
    assert decoded(inline.data).size == SIZES["16:9"]
    assert response.usage_metadata is not None
    assert response.usage_metadata.total_token_count
    assert response.response_id is not None
    config = gemini_fake.received[-1]["body"]["generationConfig"]
    assert config == {
        "responseModalities": ["IMAGE"],
        "imageConfig": {"aspectRatio": "16:9", "imageSize": "1K"},
    }


def test_genai_sdk_edits_an_inline_image(genai_client: genai.Client) -> None:
    parts: list[types.Part] = [
        types.Part.from_bytes(data=png(90, 60), mime_type="image/png"),
        types.Part.from_text(text="at night"),
    ]
    response = genai_client.models.generate_content(
        model="gemini-3.1-flash-image",
        contents=types.Content(role="user", parts=parts),
        config=types.GenerateContentConfig(response_modalities=["IMAGE"]),
    )

    assert response.candidates
    assert response.candidates[0].content
    inline = (response.candidates[0].content.parts or [])[0].inline_data
    assert inline is not None
    assert decoded(inline.data).size == SIZES["3:2"]


def test_genai_sdk_reads_a_blocked_prompt(genai_client: genai.Client) -> None:
    response = genai_client.models.generate_content(
        model="gemini-3.1-flash-image",
        contents="something forbidden",
        config=types.GenerateContentConfig(response_modalities=["IMAGE"]),
    )

    assert response.prompt_feedback is not None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert not response.candidates


def test_genai_sdk_wrong_key_is_a_client_error(gemini_fake: GeminiFake) -> None:
    with (
        genai.Client(
            api_key="wrong", http_options=types.HttpOptions(base_url=gemini_fake.url)
        ) as client,
        pytest.raises(errors.ClientError) as caught,
    ):
        client.models.generate_content(model="gemini-3.1-flash-image", contents="a kite")
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
