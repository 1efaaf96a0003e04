"""The OpenAI Images API for GPT image models: one synchronous HTTP call per request.

`POST /v1/images/generations` (JSON) makes images from a prompt; `POST /v1/images/edits`
(multipart/form-data: the `image` file, an optional `mask` file, and the same options as form
fields) changes an image. Both answer with the images as base64 (`data[].b64_json`) and the
tokens used (`usage`); there is no job, status, cancel or webhook. A moderation refusal is a
400 whose `error.code` is `moderation_blocked`. Auth is `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from imagegraph.providers.base import (
    Adapter,
    ProviderError,
    Request,
    Result,
    Route,
    SourceImage,
)
from imagegraph.providers.base import Image as ResultImage

DEFAULT_BASE_URL = "https://api.openai.com"
# The sizes every GPT image model takes, when the route lists none.
STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536")
MAX_IMAGES = 10
# At this `safety_tolerance` (0 strictest .. 6) and above, ask for OpenAI's "low" moderation.
LOW_MODERATION_FROM = 4
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class OpenAIAdapter(Adapter):
    """GPT image models (`gpt-image-1.5`, `gpt-image-2`, ...) through the Images API.

        adapter = OpenAIAdapter(ProviderConfig("openai", key, DEFAULT_BASE_URL), http)
        route = Route("openai", "gpt-image-1.5", options={"size": "openai_size"})
        result = await adapter.start(route, Request(prompt="a red fox", width=1536, height=1024))

    Route options read: `sizes` (the `WxH` sizes the model takes; nearest by aspect ratio),
    `operation` ("edit" sends to /v1/images/edits, as does a request with an `image`), and
    `fixed` (fields sent as they are, like `Request.extra`, which wins over both).
    """

    name = "openai"

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Result:
        # `webhook_url` is ignored: the answer is the result itself (supports_webhook=False).
        if self._is_edit(route, request):
            assert request.image is not None  # _is_edit refuses an edit without one
            fields = self._fields(route, request, edit=True)
            files = [_file("image", request.image)]
            if request.mask is not None:
                files.append(_file("mask", request.mask))
            response = await self._post(
                "/v1/images/edits", data=self._form(route, fields), files=files
            )
        else:
            fields = self._fields(route, request, edit=False)
            response = await self._post("/v1/images/generations", json=fields)
        if response.status_code != 200:
            raise self._error(response)
        return self._result(response, fields)

    # -- the request ---------------------------------------------------------------------

    def _is_edit(self, route: Route, request: Request) -> bool:
        operation = route.options.get("operation", "edit" if request.image else "generate")
        if operation not in ("generate", "edit"):
            raise self._refuse(route, f"OpenAI has no {operation} endpoint")
        if operation == "edit" and request.image is None:
            raise self._refuse(route, f"an edit with {route.model} needs an image")
        if request.mask is not None and request.image is None:
            raise self._refuse(route, f"a mask for {route.model} needs an image to edit")
        return operation == "edit" or request.image is not None

    def _fields(self, route: Route, request: Request, *, edit: bool) -> dict[str, Any]:
        refused = [
            param
            for param, given in (
                ("negative_prompt", request.negative_prompt is not None),
                ("seed", request.seed is not None),
                ("steps", request.steps is not None),
                ("guidance", request.guidance is not None),
                ("scale", request.scale is not None),
                # /v1/images/edits has no `moderation` field.
                ("safety_tolerance", edit and request.safety_tolerance is not None),
            )
            if given
        ]
        if refused:
            raise self._refuse(route, f"{route.model} does not take {', '.join(refused)}")
        if not request.prompt:
            raise self._refuse(route, f"{route.model} needs a prompt")
        if not 1 <= request.num_images <= MAX_IMAGES:
            raise self._refuse(
                route,
                f"{route.model} makes 1 to {MAX_IMAGES} images (num_images={request.num_images})",
            )
        fields: dict[str, Any] = {
            "model": route.model,
            "prompt": request.prompt,
            "n": request.num_images,
            "size": self._size(route, request),
            "quality": "auto",
        }
        if request.output_format is not None:
            fields["output_format"] = request.output_format
        if request.safety_tolerance is not None:
            low = request.safety_tolerance >= LOW_MODERATION_FROM
            fields["moderation"] = "low" if low else "auto"
        fields.update(route.options.get("fixed") or {})
        fields.update(request.extra)
        return fields

    def _size(self, route: Route, request: Request) -> str:
        width, height = request.width, request.height
        if width is None and height is None:
            return "auto"
        if width is None or height is None or width <= 0 or height <= 0:
            raise self._refuse(route, f"{route.model} needs both width and height, above 0")
        return nearest_size(width, height, route.options.get("sizes") or STANDARD_SIZES)

    def _form(self, route: Route, fields: Mapping[str, Any]) -> dict[str, str]:
        """The fields as multipart form values (scalars only)."""
        form = {}
        for key, value in fields.items():
            if isinstance(value, bool):
                form[key] = "true" if value else "false"
            elif isinstance(value, str | int | float):
                form[key] = str(value)
            else:
                raise self._refuse(route, f"{key} cannot be sent as a form field of an edit")
        return form

    def _refuse(self, route: Route, message: str) -> ProviderError:
        return ProviderError(self.name, "bad_request", message)

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            return await self.http.post(self.url(path), headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise ProviderError(
                self.name, "timeout", f"POST {path}: no answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(self.name, "unavailable", f"POST {path}: {exc!r}") from exc

    # -- the answer ----------------------------------------------------------------------

    def _result(self, response: httpx.Response, fields: Mapping[str, Any]) -> Result:
        body = self.json(response)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not data:
            raise self._malformed(response, "no images in the answer")
        fmt = body.get("output_format") or fields.get("output_format") or "png"
        images = []
        for item in data:
            encoded = item.get("b64_json") if isinstance(item, dict) else None
            if not isinstance(encoded, str):
                raise self._malformed(response, "an image without b64_json")
            try:
                decoded = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise self._malformed(response, "b64_json is not base64") from None
            images.append(ResultImage(data=decoded, mime_type=MIME.get(fmt, f"image/{fmt}")))
        usage = body.get("usage")
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        details = {
            key: body[key] for key in ("usage", "size", "quality", "background") if key in body
        }
        return Result(
            images=images,
            request_id=response.headers.get("x-request-id"),
            cost=float(total) if isinstance(total, int | float) else None,
            cost_unit="tokens" if isinstance(total, int | float) else None,
            details=details,
        )

    def _malformed(self, response: httpx.Response, message: str) -> ProviderError:
        return ProviderError(
            self.name,
            "malformed",
            f"{response.request.url.path}: {message}",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        )

    def _error(self, response: httpx.Response) -> ProviderError:
        """The error for a non-200 answer: moderation and quota first, then by status."""
        error = _error_body(response)
        code = error.get("code") if isinstance(error.get("code"), str) else None
        kind = error.get("type") if isinstance(error.get("type"), str) else None
        message = str(error.get("message") or f"HTTP {response.status_code}")
        request_id = response.headers.get("x-request-id")
        moderated = code == "moderation_blocked" or (
            kind == "image_generation_user_error" and "safety" in message.lower()
        )
        if response.status_code == 400 and moderated:
            return ProviderError(
                self.name,
                "content_blocked",
                message,
                status=400,
                provider_code=code or kind,
                request_id=request_id,
            )
        if response.status_code == 429 and "insufficient_quota" in (code, kind):
            # OpenAI answers an account out of credit with 429, but waiting will not help.
            return ProviderError(
                self.name,
                "payment_required",
                message,
                status=429,
                provider_code="insufficient_quota",
                request_id=request_id,
            )
        failure = self.error(response, message if error else None)
        failure.provider_code = code or kind
        return failure


def _error_body(response: httpx.Response) -> dict[str, Any]:
    """`error` of an OpenAI error body (`{"error": {"message", "type", "param", "code"}}`)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _file(field: str, image: SourceImage) -> tuple[str, tuple[str, bytes, str]]:
    extension = image.mime_type.rsplit("/", 1)[-1].replace("jpeg", "jpg")
    return field, (f"{field}.{extension}", image.data, image.mime_type)


def nearest_size(width: int, height: int, sizes: Sequence[str]) -> str:
    """The `WxH` of `sizes` nearest the aspect ratio of width x height (the first on a tie).

    >>> nearest_size(1280, 720, ["1024x1024", "1536x1024", "1024x1536"])
    '1536x1024'
    """
    target = math.log(width / height)

    def distance(size: str) -> float:
        size_width, size_height = (int(side) for side in size.split("x"))
        return abs(math.log(size_width / size_height) - target)

    return min((size for size in sizes if "x" in size), key=distance)
