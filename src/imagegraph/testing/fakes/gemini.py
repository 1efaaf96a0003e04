"""A fake of the Gemini API's `generateContent` for Gemini image models.

    with GeminiFake(block="image") as gemini:
        ...                        # GeminiAdapter, or genai.Client(http_options=HttpOptions(
                                   #     base_url=gemini.url))

`POST /v1beta/models/{model}:generateContent` (and `/v1/...`, the SDK's default) ["generate";
"edit" when a part carries `inlineData`], keyed by `x-goog-api-key` (or `?key=`): a wrong
key is Google's 400 `API_KEY_INVALID`, no key a 403. The body is checked as Google checks
it: unknown field names are a 400 INVALID_ARGUMENT (snake_case names are taken, as by any
proto JSON API),
so are an unknown `aspectRatio` or `imageSize`, several candidates, or an unknown model (404).
The answer is `candidates[0].content.parts[].inlineData` (PNG) at the size of
`imageConfig` (`aspectRatio` at `imageSize` 1K/2K/4K), with `usageMetadata`, `modelVersion`
and `responseId`. A prompt `moderate` flags is blocked with `promptFeedback.blockReason:
"SAFETY"` (`block="prompt"`) or a candidate that stops with `finishReason: "IMAGE_SAFETY"`
(`block="image"`). `received` keeps the JSON body and headers of each request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph.testing.fakes.server import FakeProvider

MODELS = frozenset({"gemini-3.1-flash-image", "gemini-3-pro-image", "gemini-2.5-flash-image"})
# Output size per aspect ratio at imageSize 1K; 2K and 4K double and quadruple the sides.
SIZES = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
SCALES = {"1K": 1, "2K": 2, "4K": 4}
OUTPUT_TOKENS = {"1K": 1120, "2K": 1120, "4K": 2000}
INPUT_IMAGE_TOKENS = 258
# The field names each object takes (lowerCamelCase), by where it is in the body.
KNOWN = {
    "": {
        "contents",
        "generationConfig",
        "safetySettings",
        "systemInstruction",
        "tools",
        "toolConfig",
        "cachedContent",
    },
    "contents": {"role", "parts"},
    "parts": {"text", "inlineData", "fileData", "thought", "thoughtSignature"},
    "inlineData": {"mimeType", "data"},
    "generationConfig": {
        "responseModalities",
        "imageConfig",
        "candidateCount",
        "seed",
        "temperature",
        "topP",
        "topK",
        "maxOutputTokens",
        "stopSequences",
        "responseMimeType",
        "thinkingConfig",
        "presencePenalty",
        "frequencyPenalty",
        "mediaResolution",
    },
    "imageConfig": {"aspectRatio", "imageSize"},
}


class GoogleError(Exception):
    """An error the fake answers (raised inside the handler)."""

    def __init__(
        self, code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.body: dict[str, Any] = {"error": {"code": code, "message": message, "status": status}}
        if details:
            self.body["error"]["details"] = details
        self.code = code


class GeminiFake(FakeProvider):
    """The Gemini API's generateContent on 127.0.0.1 (see the module docstring)."""

    name = "gemini"

    def __init__(self, *, block: Literal["prompt", "image"] = "prompt", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block = block  # how a moderated prompt is refused

    def routes(self) -> list[BaseRoute]:
        # google-genai 3.4.0 calls v1 by default; the v1beta path is the same method.
        return [
            Route(f"/{version}/models/{{model}}:generateContent", self._generate, methods=["POST"])
            for version in ("v1", "v1beta")
        ]

    async def _generate(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        fault = await self.inject("edit" if _has_image(body) else "generate")
        if fault is not None:
            return fault
        try:
            self._authorize(request)
            model = request.path_params["model"]
            if model not in MODELS:
                raise GoogleError(
                    404,
                    "NOT_FOUND",
                    f"models/{model} is not found for API version "
                    f"{request.url.path.split('/')[1]}, or is not supported "
                    "for generateContent. Call ListModels to see the list of available models "
                    "and their supported methods.",
                )
            if not isinstance(body, dict):
                raise _invalid("Invalid JSON payload received.")
            body = _camel(body)
            self.received.append({"model": model, "headers": dict(request.headers), "body": body})
            _check_names(body, "")
            prompt, source = _contents(body)
            config = body.get("generationConfig") or {}
            return await self._answer(model, prompt, source, config)
        except GoogleError as error:
            return JSONResponse(error.body, error.code)

    def _authorize(self, request: Request) -> None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key:
            raise GoogleError(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )

    async def _answer(
        self, model: str, prompt: str, source: tuple[int, int] | None, config: dict[str, Any]
    ) -> Response:
        modalities = config.get("responseModalities") or ["TEXT", "IMAGE"]
        if int(config.get("candidateCount") or 1) != 1:
            raise _invalid(f"Multiple candidates is not enabled for models/{model}.")
        image_config = config.get("imageConfig") or {}
        ratio = image_config.get("aspectRatio") or (_nearest(source) if source else "1:1")
        tier = image_config.get("imageSize") or "1K"
        if ratio not in SIZES:
            raise _invalid(f"Unsupported aspect ratio: {ratio}.")
        if tier not in SCALES:
            raise _invalid(f"Unsupported image size: {tier}. Use 1K, 2K or 4K.")
        await asyncio.sleep(self.latency)
        prompt_tokens = max(1, len(prompt.split())) + (INPUT_IMAGE_TOKENS if source else 0)
        meta = {"modelVersion": model, "responseId": self.new_id()}
        if self.moderate(prompt) and self.block == "prompt":
            usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
            return JSONResponse(
                {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage, **meta}
            )
        if self.moderate(prompt):
            candidate: dict[str, Any] = {"finishReason": "IMAGE_SAFETY", "index": 0}
            output_tokens = 0
        elif "IMAGE" not in [str(modality).upper() for modality in modalities]:
            text = f"I would draw {prompt}, but you asked for text only."
            candidate = {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
            output_tokens = len(text.split())
        else:
            width, height = (side * SCALES[tier] for side in SIZES[ratio])
            seed = int(config.get("seed") or 0)
            picture, mime_type = await asyncio.to_thread(self.image, prompt, seed, width, height)
            inline = {"mimeType": mime_type, "data": base64.b64encode(picture).decode()}
            candidate = {
                "content": {"role": "model", "parts": [{"inlineData": inline}]},
                "finishReason": "STOP",
                "index": 0,
            }
            output_tokens = OUTPUT_TOKENS[tier]
            self.count_accepted()
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens,
        }
        return JSONResponse({"candidates": [candidate], "usageMetadata": usage, **meta})


def _has_image(body: Any) -> bool:
    """Whether a request body sends an image (an edit)."""
    contents = _camel(body).get("contents") if isinstance(body, dict) else None
    return isinstance(contents, list) and any(
        isinstance(part, dict) and "inlineData" in part
        for content in contents
        if isinstance(content, dict) and isinstance(content.get("parts"), list)
        for part in content["parts"]
    )


def _invalid(message: str) -> GoogleError:
    return GoogleError(400, "INVALID_ARGUMENT", message)


def _camel(value: Any) -> Any:
    """`value` with snake_case field names turned lowerCamelCase (proto JSON takes both)."""
    if isinstance(value, dict):
        return {
            re.sub(r"_([a-z])", lambda match: match.group(1).upper(), key): _camel(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_camel(item) for item in value]
    return value


def _check_names(value: Any, where: str) -> None:
    """Refuse field names the API does not know, as Google does."""
    if isinstance(value, list):
        for item in value:
            _check_names(item, where)
        return
    if not isinstance(value, dict) or where not in KNOWN:
        return
    for key, item in value.items():
        if key not in KNOWN[where]:
            at = re.sub(r"([A-Z])", lambda match: "_" + match.group(1).lower(), where)
            raise GoogleError(
                400,
                "INVALID_ARGUMENT",
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{at}': "
                "Cannot find field.",
            )
        _check_names(item, key)


def _contents(body: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """The prompt (the text parts) and the size of the first inline image, if any."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified")
    texts: list[str] = []
    source: tuple[int, int] | None = None
    for content in contents:
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list) or not parts:
            raise _invalid("* GenerateContentRequest.contents.parts: must not be empty")
        for part in parts:
            if not isinstance(part, dict):
                raise _invalid("* GenerateContentRequest.contents.parts: must be objects")
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            inline = part.get("inlineData")
            if isinstance(inline, dict) and source is None:
                source = _inline_size(inline)
    if not texts and source is None:
        raise _invalid("* GenerateContentRequest.contents[0].parts: no text or image given")
    return " ".join(texts), source


def _inline_size(inline: dict[str, Any]) -> tuple[int, int]:
    if inline.get("mimeType") not in ("image/png", "image/jpeg", "image/webp"):
        raise _invalid(f"Unsupported MIME type: {inline.get('mimeType')}")
    try:
        # Proto JSON bytes: standard or URL-safe base64, padded or not (the SDK sends URL-safe).
        text = str(inline.get("data") or "").replace("-", "+").replace("_", "/")
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        with Image.open(io.BytesIO(data)) as picture:
            return picture.size
    except (binascii.Error, UnidentifiedImageError, OSError):
        raise _invalid("Unable to process input image.") from None


def _nearest(size: tuple[int, int]) -> str:
    """The aspect ratio nearest an input image's (what an edit keeps by default)."""
    width, height = size
    return min(SIZES, key=lambda ratio: abs(SIZES[ratio][0] / SIZES[ratio][1] - width / height))
