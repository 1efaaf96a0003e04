"""Google's Gemini image models through the Gemini API: one synchronous `generateContent`.

`POST /v1beta/models/{model}:generateContent` with `x-goog-api-key` and a JSON body: the
prompt (and, for an edit, the image as `inlineData`) in `contents[0].parts`, and
`generationConfig` asking for images (`responseModalities: ["IMAGE"]`) with an `imageConfig`
(`aspectRatio`, `imageSize` 1K/2K/4K). The images come back as base64 `inlineData` parts
of `candidates[].content`, with token counts in `usageMetadata`. A refusal is a 200 whose
`promptFeedback.blockReason` is set or whose candidate stops with a safety `finishReason`;
errors are `{"error": {"code", "message", "status"}}`. There is no job, cancel or webhook.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from imagegraph.providers.base import (
    Adapter,
    Image,
    ProviderError,
    Request,
    Result,
    Route,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# imageSize tiers by the pixels of their larger side (for a square image).
IMAGE_SIZES = {"1K": 1024, "2K": 2048, "4K": 4096}
# Candidate finish reasons that are refusals by a policy filter: content_blocked. IMAGE_OTHER
# ("stopped for a reason not otherwise specified", at the image stage) is counted as one:
# it is what the image filter answers when it names no category.
REFUSALS = frozenset(
    {
        "SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_OTHER",
        "IMAGE_RECITATION",
        "RECITATION",
        "BLOCKLIST",
        "SPII",
    }
)
# NO_IMAGE (the model answered without an image, usually with text) is not a refusal: it
# is `failed`, with the model's text in the message.


class GeminiAdapter(Adapter):
    """Gemini image models (`gemini-3.1-flash-image`, `gemini-3-pro-image`).

        adapter = GeminiAdapter(ProviderConfig("gemini", key, DEFAULT_BASE_URL), http)
        route = Route("gemini", "gemini-3.1-flash-image", options={"size": "aspect_ratio"})
        result = await adapter.start(route, Request(prompt="a kite", width=1920, height=1080))

    Route options read: `aspectRatios` (the nearest to width/height is sent), `imageSizes`
    (the tiers the model takes, default 1K/2K/4K: the smallest whose side reaches the larger
    of width and height is sent), `operation` ("edit", or a request with an `image`, sends
    the image as `inlineData`), and `fixed` (merged into the body, like `Request.extra`,
    which wins). `safety_tolerance` is ignored: the image safety filters of the Gemini API
    are not adjustable per request. `seed` goes to `generationConfig.seed`.
    """

    name = "gemini"

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Result:
        # `webhook_url` is ignored: the answer is the result itself (supports_webhook=False).
        body = self._body(route, request)
        path = f"/v1beta/models/{route.model}:generateContent"
        headers = {"x-goog-api-key": self.config.api_key} if self.config.api_key else {}
        try:
            response = await self.http.post(self.url(path), json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderError(
                self.name, "timeout", f"POST {path}: no answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(self.name, "unavailable", f"POST {path}: {exc!r}") from exc
        if response.status_code != 200:
            raise self._error(response)
        return self._result(response)

    # -- the request ---------------------------------------------------------------------

    def _body(self, route: Route, request: Request) -> dict[str, Any]:
        operation = route.options.get("operation", "edit" if request.image else "generate")
        if operation not in ("generate", "edit"):
            raise self._refuse(f"{route.model} cannot {operation}")
        refused = [
            param
            for param, given in (
                ("negative_prompt", request.negative_prompt is not None),
                ("steps", request.steps is not None),
                ("guidance", request.guidance is not None),
                ("num_images", request.num_images != 1),
                # The Gemini API chooses the format (the SDK refuses outputMimeType too).
                ("output_format", request.output_format is not None),
                ("mask", request.mask is not None),
                ("scale", request.scale is not None),
            )
            if given
        ]
        if refused:
            raise self._refuse(f"{route.model} does not take {', '.join(refused)}")
        if not request.prompt:
            raise self._refuse(f"{route.model} needs a prompt")
        if operation == "edit" and request.image is None:
            raise self._refuse(f"an edit with {route.model} needs an image")
        parts: list[dict[str, Any]] = [{"text": request.prompt}]
        if request.image is not None:
            data = base64.b64encode(request.image.data).decode()
            parts.append({"inlineData": {"mimeType": request.image.mime_type, "data": data}})
        config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
        if request.width is not None or request.height is not None:
            config["imageConfig"] = self._image_config(route, request)
        if request.seed is not None:
            config["seed"] = request.seed
        body: dict[str, Any] = {
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": config,
        }
        _merge(body, route.options.get("fixed") or {})
        _merge(body, request.extra)
        return body

    def _image_config(self, route: Route, request: Request) -> dict[str, str]:
        width, height = request.width, request.height
        if width is None or height is None or width <= 0 or height <= 0:
            raise self._refuse(f"{route.model} needs both width and height, above 0")
        ratios = route.options.get("aspectRatios") or ASPECT_RATIOS
        tiers = route.options.get("imageSizes") or list(IMAGE_SIZES)
        return {
            "aspectRatio": nearest_aspect_ratio(width, height, ratios),
            "imageSize": image_size(width, height, tiers),
        }

    def _refuse(self, message: str) -> ProviderError:
        return ProviderError(self.name, "bad_request", message)

    # -- the answer ----------------------------------------------------------------------

    def _result(self, response: httpx.Response) -> Result:
        body = self.json(response)
        if not isinstance(body, dict):
            raise self._malformed(response, "the answer is not a JSON object")
        request_id = body.get("responseId") if isinstance(body.get("responseId"), str) else None
        feedback = body.get("promptFeedback")
        blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
        if blocked:
            raise ProviderError(
                self.name,
                "content_blocked",
                f"the prompt was blocked ({blocked})",
                status=200,
                provider_code=str(blocked),
                request_id=request_id,
            )
        candidates = body.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            raise self._malformed(response, "no candidates in the answer")
        images: list[Image] = []
        texts: list[str] = []
        reasons: list[str] = []
        for candidate in candidates:
            if not isinstance(candidate, dict):
                raise self._malformed(response, "a candidate is not an object")
            if isinstance(candidate.get("finishReason"), str):
                reasons.append(candidate["finishReason"])
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else []:
                # Thought parts (the drafts of thinking models) are not the answer.
                if not isinstance(part, dict) or part.get("thought"):
                    continue
                if isinstance(part.get("inlineData"), dict):
                    images.append(self._image(response, part["inlineData"]))
                elif isinstance(part.get("text"), str):
                    texts.append(part["text"])
        if not images:
            raise self._no_image(response, reasons, texts, request_id)
        usage = body.get("usageMetadata")
        total = usage.get("totalTokenCount") if isinstance(usage, dict) else None
        details: dict[str, Any] = {"finishReason": reasons[0] if reasons else None}
        if isinstance(usage, dict):
            details["usage"] = usage
        if texts:
            details["text"] = "\n".join(texts)[:1000]
        return Result(
            images=images,
            request_id=request_id,
            model_version=body.get("modelVersion")
            if isinstance(body.get("modelVersion"), str)
            else None,
            cost=float(total) if isinstance(total, int | float) else None,
            cost_unit="tokens" if isinstance(total, int | float) else None,
            details=details,
        )

    def _image(self, response: httpx.Response, inline: Mapping[str, Any]) -> Image:
        data = inline.get("data")
        if not isinstance(data, str):
            raise self._malformed(response, "inlineData without data")
        # Proto JSON bytes may be standard or URL-safe base64, padded or not.
        data = data.replace("-", "+").replace("_", "/")
        try:
            decoded = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        except binascii.Error:
            raise self._malformed(response, "inlineData.data is not base64") from None
        mime_type = inline.get("mimeType")
        return Image(data=decoded, mime_type=mime_type if isinstance(mime_type, str) else None)

    def _no_image(
        self, response: httpx.Response, reasons: list[str], texts: list[str], request_id: str | None
    ) -> ProviderError:
        """Why an answer has no image: a refusal, NO_IMAGE, or a malformed answer."""
        said = f": {' '.join(texts)[:300]}" if texts else ""
        for reason in reasons:
            if reason in REFUSALS:
                return ProviderError(
                    self.name,
                    "content_blocked",
                    f"generation stopped ({reason}){said}",
                    status=200,
                    provider_code=reason,
                    request_id=request_id,
                )
        stopped = next((reason for reason in reasons if reason != "STOP"), None)
        if stopped is not None:
            return ProviderError(
                self.name,
                "failed",
                f"no image ({stopped}){said}",
                status=200,
                provider_code=stopped,
                request_id=request_id,
            )
        return self._malformed(response, f"no image in the answer{said}")

    def _malformed(self, response: httpx.Response, message: str) -> ProviderError:
        return ProviderError(
            self.name,
            "malformed",
            f"{response.request.url.path}: {message}",
            status=response.status_code,
        )

    def _error(self, response: httpx.Response) -> ProviderError:
        """The error of a Google error body (`{"error": {"code", "message", "status"}}`)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return self.error(response)
        status = error.get("status") if isinstance(error.get("status"), str) else None
        message = str(error.get("message") or status or f"HTTP {response.status_code}")
        details = [item for item in error.get("details") or [] if isinstance(item, dict)]
        if any(item.get("reason") == "API_KEY_INVALID" for item in details):
            # Google answers a wrong key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
            return ProviderError(
                self.name,
                "unauthorized",
                message,
                status=response.status_code,
                provider_code="API_KEY_INVALID",
            )
        failure = self.error(response, message)
        failure.provider_code = status
        if failure.kind == "rate_limited" and failure.retry_after is None:
            failure.retry_after = _retry_delay(details)
        return failure


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a `google.rpc.RetryInfo` detail (`"retryDelay": "37s"`)."""
    for item in details:
        delay = item.get("retryDelay")
        if isinstance(delay, str):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)s", delay.strip())
            if match:
                return float(match.group(1))
    return None


def _merge(target: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge `extra` into `target`, objects key by key (so that `generationConfig` in
    `extra` adds to ours instead of replacing it)."""
    for key, value in extra.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _merge(current, value)
        else:
            target[key] = value


def nearest_aspect_ratio(width: int, height: int, ratios: Sequence[str]) -> str:
    """The "W:H" of `ratios` nearest width x height (the first on a tie; others skipped).

    >>> nearest_aspect_ratio(1000, 1250, ["1:1", "4:5", "3:4"])
    '4:5'
    """
    target = math.log(width / height)
    distances = {}
    for ratio in ratios:
        ratio_width, _, ratio_height = ratio.partition(":")
        if (
            ratio_width.isdigit()
            and ratio_height.isdigit()
            and int(ratio_width)
            and int(ratio_height)
        ):
            distances[ratio] = abs(math.log(int(ratio_width) / int(ratio_height)) - target)
    return min(distances, key=distances.__getitem__)


def image_size(width: int, height: int, tiers: Sequence[str]) -> str:
    """The smallest `imageSize` of `tiers` ("1K", "2K", "4K") whose side reaches the larger
    of width and height, so the image is at least as large as asked; else the largest.

    >>> image_size(1920, 1080, ["1K", "2K", "4K"])
    '2K'
    """
    known = sorted((IMAGE_SIZES[tier], tier) for tier in tiers if tier in IMAGE_SIZES)
    side = max(width, height)
    return next((tier for pixels, tier in known if pixels >= side), known[-1][1])
