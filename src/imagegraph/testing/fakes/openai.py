"""A fake of the OpenAI Images API for GPT image models: generations and edits.

    with OpenAIFake() as openai:
        adapter = OpenAIAdapter(ProviderConfig("openai", "test-key", openai.url), http)
        ...                                       # or openai.AsyncOpenAI(base_url=url + "/v1")
        assert openai.received[-1]["fields"]["size"] == "1536x1024"

`POST /v1/images/generations` takes JSON and `POST /v1/images/edits` multipart/form-data,
checked as the API checks them (unknown and legacy parameters such as `response_format`,
sizes the model does not take, `n` out of 1..10, a mask unlike its image: 400 with an
OpenAI error body). Both answer `{"created", "data": [{"b64_json"}], ..., "usage"}` with an
`x-request-id` header. A prompt `moderate` flags gets 400 `moderation_blocked`. Fault
endpoints: "generate" and "edit". `received` keeps what each request sent: its endpoint,
headers, fields, and files as `{field: [(content_type, bytes)]}`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph.testing.fakes.server import FakeProvider

MODELS = frozenset(
    {
        "gpt-image-1-mini",
        "gpt-image-1.5",
        "gpt-image-2",
        "gpt-image-2-2026-04-21",
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-sunburst-2026-09-08",
        "gpt-image-2.5-flare",
        "gpt-image-2.5-flare-2026-09-08",
        "chatgpt-image-latest",
    }
)
STANDARD_SIZES = ("1024x1024", "1024x1536", "1536x1024")
COMMON = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "background",
        "output_format",
        "output_compression",
        "stream",
        "partial_images",
        "safety_identifier",
        "user",
    }
)
GENERATE_FIELDS = COMMON | {"moderation"}
EDIT_FIELDS = COMMON | {"input_fidelity"}
EDIT_FILES = frozenset({"image", "image[]", "mask"})
CHOICES = {
    "quality": ("low", "medium", "high", "auto"),
    "background": ("transparent", "opaque", "auto"),
    "output_format": ("png", "webp", "jpeg"),
    "moderation": ("low", "auto"),
    "input_fidelity": ("high", "low"),
}
# Output tokens per image, by quality, for a 1024x1024 image (larger ones cost 1.5 times).
OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}
INPUT_IMAGE_TOKENS = 323


class OpenAIError(Exception):
    """A 400 the fake answers (raised inside the handlers)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        }


class OpenAIFake(FakeProvider):
    """The OpenAI Images API on 127.0.0.1 (see the module docstring)."""

    name = "openai"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/images/generations", self._generate, methods=["POST"]),
            Route("/v1/images/edits", self._edit, methods=["POST"]),
        ]

    # -- endpoints -----------------------------------------------------------------------

    async def _generate(self, request: Request) -> Response:
        fault = await self.inject("generate")
        if fault is not None:
            return fault
        if not self.authorized(request, "authorization", "Bearer "):
            return self._unauthorized(request)
        try:
            fields = await request.json()
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            return self._invalid(
                OpenAIError(
                    "We could not parse the JSON body of your request. (HINT: This likely "
                    "means you aren't using your HTTP library correctly.)"
                )
            )
        self._record("generate", request, fields, {})
        try:
            self._check(fields, GENERATE_FIELDS)
        except OpenAIError as error:
            return self._invalid(error)
        return await self._answer(fields, None)

    async def _edit(self, request: Request) -> Response:
        fault = await self.inject("edit")
        if fault is not None:
            return fault
        if not self.authorized(request, "authorization", "Bearer "):
            return self._unauthorized(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return self._invalid(
                OpenAIError(
                    f"Invalid Content-Type header ({content_type}), expected "
                    "multipart/form-data. (HINT: If you're using curl, you can pass "
                    "-F 'key=value' to send form data.)"
                )
            )
        async with request.form() as form:
            fields, files = await _split(form)
        self._record("edit", request, fields, files)
        try:
            unknown = sorted(set(files) - EDIT_FILES)
            if unknown:
                raise OpenAIError(
                    f"Unknown parameter: '{unknown[0]}'.", unknown[0], "unknown_parameter"
                )
            if "n" in fields:
                fields["n"] = _integer(fields["n"], "n")
            if "output_compression" in fields:
                fields["output_compression"] = _integer(
                    fields["output_compression"], "output_compression"
                )
            self._check(fields, EDIT_FIELDS)
            images = [*files.get("image", []), *files.get("image[]", [])]
            if not images:
                raise OpenAIError(
                    "Missing required parameter: 'image'.", "image", "missing_required_parameter"
                )
            if len(images) > 16:
                raise OpenAIError("Too many images: at most 16.", "image", "invalid_value")
            sizes = [_image_size(data, "image") for _, data in images]
            masks = files.get("mask", [])
            if masks:
                _check_mask(masks[0][1], sizes[0])
        except OpenAIError as error:
            return self._invalid(error)
        return await self._answer(fields, sizes[0])

    # -- the answer ----------------------------------------------------------------------

    async def _answer(self, fields: dict[str, Any], source: tuple[int, int] | None) -> Response:
        await asyncio.sleep(self.latency)
        prompt = str(fields["prompt"])
        if self.moderate(prompt):
            return JSONResponse(
                {
                    "error": {
                        "message": "Your request was rejected by the safety system. If you "
                        "believe this is an error, contact us at help.openai.com.",
                        "type": "image_generation_user_error",
                        "param": None,
                        "code": "moderation_blocked",
                        "moderation_details": {"moderation_stage": "input"},
                    }
                },
                400,
                headers=self._headers(),
            )
        size = str(fields.get("size") or "auto")
        if size == "auto":
            size = _nearest(source) if source else "1024x1024"
        width, height = (int(side) for side in size.split("x"))
        fmt = str(fields.get("output_format") or "png")
        quality = str(fields.get("quality") or "auto")
        quality = "medium" if quality == "auto" else quality
        count = int(fields.get("n") or 1)
        data = []
        for _ in range(count):
            picture, _mime = await asyncio.to_thread(
                self.image, prompt, secrets.randbelow(2**31), width, height, fmt
            )
            data.append({"b64_json": base64.b64encode(picture).decode()})
        self.count_accepted()
        text_tokens = max(1, len(prompt.split()))
        image_tokens = INPUT_IMAGE_TOKENS if source else 0
        per_image = OUTPUT_TOKENS.get(quality, OUTPUT_TOKENS["medium"])
        output_tokens = count * (per_image if width == height else per_image * 3 // 2)
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": data,
                "background": "transparent"
                if fields.get("background") == "transparent"
                else "opaque",
                "output_format": fmt,
                "quality": quality,
                "size": size,
                "usage": {
                    "input_tokens": text_tokens + image_tokens,
                    "input_tokens_details": {
                        "text_tokens": text_tokens,
                        "image_tokens": image_tokens,
                    },
                    "output_tokens": output_tokens,
                    "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
                    "total_tokens": text_tokens + image_tokens + output_tokens,
                },
            },
            headers=self._headers(),
        )

    # -- checks --------------------------------------------------------------------------

    def _check(self, fields: dict[str, Any], known: frozenset[str]) -> None:
        """Raise `OpenAIError` for what the API refuses in `fields`."""
        for key in fields:
            if key not in known:  # `response_format` and `style` too: GPT image models
                raise OpenAIError(f"Unknown parameter: '{key}'.", key, "unknown_parameter")
        for key in ("prompt", "model"):
            if not fields.get(key):
                raise OpenAIError(
                    f"Missing required parameter: '{key}'.", key, "missing_required_parameter"
                )
        model = fields["model"]
        if model not in MODELS:
            supported = ", ".join(f"'{name}'" for name in sorted(MODELS))
            raise OpenAIError(
                f"Invalid value: '{model}'. Supported values are: {supported}.",
                "model",
                "invalid_value",
            )
        for key, choices in CHOICES.items():
            if fields.get(key) is not None and fields[key] not in choices:
                raise OpenAIError(
                    f"Invalid value: '{fields[key]}'. Supported values are: "
                    + ", ".join(f"'{choice}'" for choice in choices)
                    + ".",
                    key,
                    "invalid_value",
                )
        n = fields.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10):
            code = "integer_below_min_value" if isinstance(n, int) and n < 1 else "invalid_value"
            raise OpenAIError(
                f"Invalid 'n': expected an integer from 1 to 10, got {n!r}.", "n", code
            )
        size = fields.get("size")
        if size is not None and not _size_ok(str(model), size):
            raise OpenAIError(
                f"Invalid value: '{size}'. Supported values are: "
                + ", ".join(f"'{choice}'" for choice in STANDARD_SIZES)
                + ", and 'auto'.",
                "size",
                "invalid_value",
            )
        if fields.get("stream"):
            raise OpenAIError("Streaming is not supported by this fake.", "stream", "invalid_value")
        if fields.get("background") == "transparent" and fields.get("output_format") == "jpeg":
            raise OpenAIError(
                "Transparent background requires output_format png or webp.",
                "background",
                "invalid_value",
            )

    # -- helpers -------------------------------------------------------------------------

    def _record(
        self,
        endpoint: str,
        request: Request,
        fields: dict[str, Any],
        files: dict[str, list[tuple[str, bytes]]],
    ) -> None:
        self.received.append(
            {
                "endpoint": endpoint,
                "headers": dict(request.headers),
                "fields": dict(fields),
                "files": files,
            }
        )

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_{secrets.token_hex(16)}", "openai-processing-ms": "1"}

    def _invalid(self, error: OpenAIError) -> Response:
        return JSONResponse(error.body, 400, headers=self._headers())

    def _unauthorized(self, request: Request) -> Response:
        if not request.headers.get("authorization"):
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            code = None
        else:
            message = (
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            code = "invalid_api_key"
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
        return JSONResponse(body, 401, headers=self._headers())


async def _split(form: FormData) -> tuple[dict[str, Any], dict[str, list[tuple[str, bytes]]]]:
    """The plain fields of a multipart form, and its files by field name."""
    fields: dict[str, Any] = {}
    files: dict[str, list[tuple[str, bytes]]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            files.setdefault(key, []).append((value.content_type or "", data))
        else:
            fields[key] = value
    return fields, files


def _integer(value: Any, param: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OpenAIError(
            f"Invalid type for '{param}': expected an integer, but got a string instead.",
            param,
            "invalid_type",
        ) from None


def _image_size(data: bytes, param: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if picture.format not in ("PNG", "JPEG", "WEBP"):
                raise OpenAIError(
                    f"Invalid file '{param}': unsupported mimetype. Supported file formats "
                    "are 'image/jpeg', 'image/png', and 'image/webp'.",
                    param,
                    "unsupported_file_mimetype",
                )
            return picture.size
    except (UnidentifiedImageError, OSError):
        raise OpenAIError(
            f"Invalid file '{param}': the file is not an image.", param, "invalid_image"
        ) from None


def _check_mask(data: bytes, size: tuple[int, int]) -> None:
    try:
        with Image.open(io.BytesIO(data)) as mask:
            fmt, mask_size = mask.format, mask.size
            alpha = mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info
    except (UnidentifiedImageError, OSError):
        raise OpenAIError("Invalid mask image: not an image.", "mask", "invalid_image") from None
    if fmt != "PNG":
        raise OpenAIError("Invalid mask image: the mask must be a PNG.", "mask", "invalid_image")
    if mask_size != size:
        raise OpenAIError(
            "Invalid mask image format - mask size does not match image size",
            "mask",
            "invalid_value",
        )
    if not alpha:
        raise OpenAIError(
            "Invalid mask image: the mask must have an alpha channel.", "mask", "invalid_image"
        )


def _size_ok(model: str, size: Any) -> bool:
    if size == "auto" or size in STANDARD_SIZES:
        return True
    # gpt-image-2 and later take any WxH with sides divisible by 16, up to 3840x2160.
    if not model.startswith("gpt-image-2") or not isinstance(size, str):
        return False
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        return False
    w, h = int(width), int(height)
    return (
        w % 16 == 0
        and h % 16 == 0
        and max(w, h) <= 3840
        and min(w, h) >= 16
        and 1 / 3 <= w / h <= 3
        and w * h <= 3840 * 2160
    )


def _nearest(source: tuple[int, int]) -> str:
    """The standard size nearest the aspect ratio of an image to edit ("auto")."""
    width, height = source
    return min(
        STANDARD_SIZES,
        key=lambda size: abs(int(size.split("x")[0]) / int(size.split("x")[1]) - width / height),
    )
