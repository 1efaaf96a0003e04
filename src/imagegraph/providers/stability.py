"""Stability AI's v2beta Stable Image API: one multipart/form-data POST per request.

Every call is `POST /v2beta/stable-image/{generate/core, generate/ultra, upscale/fast,
upscale/creative, edit/remove-background}` with a multipart body (even without a file) and
`accept: image/*`; the answer is the image's bytes, with `finish-reason` (SUCCESS, or
CONTENT_FILTERED: blurred, yet charged) and `seed` headers. Creative upscale alone is
asynchronous: it answers `{"id"}`, and `GET /v2beta/results/{id}` says 202 until the image
is ready, then 200 with it. Errors are `{"id", "name", "errors": [...]}`; a moderation
refusal is a 403 named `content_moderation`. Auth is `authorization: Bearer <key>`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from imagegraph.providers.base import (
    Adapter,
    Image,
    Job,
    Pending,
    ProviderError,
    Request,
    Result,
    Route,
)

DEFAULT_BASE_URL = "https://api.stability.ai"
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
COST_UNIT = "stability_credits"


@dataclass(frozen=True)
class _Endpoint:
    """What one of our `Route.model`s is at Stability."""

    path: str
    takes: frozenset[str]  # our names of the `Request` fields it takes
    needs: frozenset[str]
    formats: tuple[str, ...] = ("png", "jpeg", "webp")
    credits: float | None = None  # the price per call, when the reference gives one
    asynchronous: bool = False


_GENERATE = frozenset({"prompt", "negative_prompt", "width", "height", "seed", "output_format"})
ENDPOINTS: Mapping[str, _Endpoint] = {
    "core": _Endpoint(
        "/v2beta/stable-image/generate/core", _GENERATE, frozenset({"prompt"}), credits=3
    ),
    "ultra": _Endpoint(
        "/v2beta/stable-image/generate/ultra",
        _GENERATE | {"image"},
        frozenset({"prompt"}),
        credits=8,
    ),
    "upscale/fast": _Endpoint(
        "/v2beta/stable-image/upscale/fast",
        frozenset({"image", "output_format", "scale"}),
        frozenset({"image"}),
    ),
    "upscale/creative": _Endpoint(
        "/v2beta/stable-image/upscale/creative",
        frozenset({"image", "prompt", "negative_prompt", "seed", "output_format"}),
        frozenset({"image", "prompt"}),
        asynchronous=True,
    ),
    "edit/remove-background": _Endpoint(
        "/v2beta/stable-image/edit/remove-background",
        frozenset({"image", "output_format"}),
        frozenset({"image"}),
        formats=("png", "webp"),
    ),
}
FAST_UPSCALE_FACTOR = 4


class ChargedRefusal(ProviderError):
    """`content_blocked` for an answer Stability charged for (`finish-reason:
    CONTENT_FILTERED`: the image came back blurred): `cost` is what it cost."""

    def __init__(
        self,
        message: str,
        *,
        cost: float | None,
        cost_unit: str,
        seed: int | None,
        request_id: str | None,
    ) -> None:
        super().__init__(
            "stability",
            "content_blocked",
            message,
            status=200,
            provider_code="CONTENT_FILTERED",
            request_id=request_id,
        )
        self.cost = cost
        self.cost_unit = cost_unit
        self.seed = seed


class StabilityAdapter(Adapter):
    """Stable Image Core and Ultra, fast and creative upscale, background removal.

        adapter = StabilityAdapter(ProviderConfig("stability", key, DEFAULT_BASE_URL), http)
        route = Route("stability", "core", options={"size": "aspect_ratio"})
        result = await adapter.start(route, Request(prompt="a lighthouse", seed=7))

    `Route.model` is one of `ENDPOINTS` ("core", "ultra", "upscale/fast", "upscale/creative",
    "edit/remove-background"). Route options read: `aspectRatios` (the ratios the model
    takes; the nearest to width/height is sent) and `fixed` (fields sent as they are, like
    `Request.extra`, which wins). `safety_tolerance` is ignored: Stability's moderation has
    no per-request setting. Fast upscale is always x4, so `scale` may only be 4.
    """

    name = "stability"

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Job | Result:
        # `webhook_url` is ignored: Stability sends no webhooks (supports_webhook=False).
        endpoint = self._endpoint(route, request)
        parts = self._parts(route, request, endpoint)
        accept = "application/json" if endpoint.asynchronous else "image/*"
        response = await self._send("POST", endpoint.path, accept, files=parts)
        if response.status_code != 200:
            raise self._error(response)
        if not endpoint.asynchronous:
            return self._result(response, endpoint.credits)
        body = self.json(response)
        job_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise self._malformed(response, "no job id in the answer")
        return Job(provider=self.name, model=route.model, id=job_id)

    async def poll(self, job: Job) -> Pending | Result:
        """Where a creative upscale stands: 202 in progress, 200 its image."""
        response = await self._send("GET", f"/v2beta/results/{job.id}", "image/*")
        if response.status_code == 202:
            body = self.json(response)
            status = body.get("status") if isinstance(body, dict) else None
            return Pending(status=str(status or "in-progress"))
        if response.status_code != 200:
            raise self._error(response)
        return self._result(response, None)  # the reference gives no price for creative upscale

    # -- the request ---------------------------------------------------------------------

    def _endpoint(self, route: Route, request: Request) -> _Endpoint:
        endpoint = ENDPOINTS.get(route.model)
        if endpoint is None:
            raise self._refuse(
                f"no Stability model {route.model!r} here (one of {', '.join(ENDPOINTS)})"
            )
        given = {
            "prompt": request.prompt is not None,
            "negative_prompt": request.negative_prompt is not None,
            "width": request.width is not None,
            "height": request.height is not None,
            "seed": request.seed is not None,
            "steps": request.steps is not None,
            "guidance": request.guidance is not None,
            "num_images": request.num_images != 1,
            "output_format": request.output_format is not None,
            "image": request.image is not None,
            "mask": request.mask is not None,
            "scale": request.scale is not None,
        }
        refused = [
            param for param, present in given.items() if present and param not in endpoint.takes
        ]
        if refused:
            raise self._refuse(f"{route.model} does not take {', '.join(refused)}")
        missing = [param for param in sorted(endpoint.needs) if not given[param]]
        if missing:
            raise self._refuse(f"{route.model} needs {', '.join(missing)}")
        if request.output_format is not None and request.output_format not in endpoint.formats:
            raise self._refuse(
                f"{route.model} does not take output_format {request.output_format!r} "
                f"(one of {', '.join(endpoint.formats)})"
            )
        if request.scale is not None and request.scale != FAST_UPSCALE_FACTOR:
            raise self._refuse(
                f"{route.model} only upscales x{FAST_UPSCALE_FACTOR} (scale={request.scale})"
            )
        return endpoint

    def _parts(
        self, route: Route, request: Request, endpoint: _Endpoint
    ) -> list[tuple[str, tuple[str | None, bytes, str | None]]]:
        """The multipart body: every field a part of its own, so that the body is
        multipart/form-data even without a file, as the API requires."""
        fields: dict[str, Any] = {}
        if request.prompt is not None:
            fields["prompt"] = request.prompt
        if request.negative_prompt is not None:
            fields["negative_prompt"] = request.negative_prompt
        if "width" in endpoint.takes and (request.width is not None or request.height is not None):
            fields["aspect_ratio"] = self._aspect_ratio(route, request)
        if request.seed is not None:
            fields["seed"] = request.seed
        if request.output_format is not None:
            fields["output_format"] = request.output_format
        fields.update(route.options.get("fixed") or {})
        fields.update(request.extra)
        parts: list[tuple[str, tuple[str | None, bytes, str | None]]] = []
        for key, value in fields.items():
            if not isinstance(value, str | int | float):
                raise self._refuse(f"{key} cannot be sent as a form field to {route.model}")
            text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append((key, (None, text.encode(), None)))
        if request.image is not None:
            extension = request.image.mime_type.rsplit("/", 1)[-1]
            parts.append(
                ("image", (f"image.{extension}", request.image.data, request.image.mime_type))
            )
        return parts

    def _aspect_ratio(self, route: Route, request: Request) -> str:
        width, height = request.width, request.height
        if width is None or height is None or width <= 0 or height <= 0:
            raise self._refuse(f"{route.model} needs both width and height, above 0")
        return nearest_aspect_ratio(
            width, height, route.options.get("aspectRatios") or ASPECT_RATIOS
        )

    def _refuse(self, message: str) -> ProviderError:
        return ProviderError(self.name, "bad_request", message)

    async def _send(self, method: str, path: str, accept: str, **kwargs: Any) -> httpx.Response:
        headers = {"accept": accept}
        if self.config.api_key:
            headers["authorization"] = f"Bearer {self.config.api_key}"
        try:
            return await self.http.request(method, self.url(path), headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise ProviderError(
                self.name, "timeout", f"{method} {path}: no answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(self.name, "unavailable", f"{method} {path}: {exc!r}") from exc

    # -- the answer ----------------------------------------------------------------------

    def _result(self, response: httpx.Response, credits: float | None) -> Result:
        """The image of a 200 answer (`accept: image/*`: the bytes, facts in headers)."""
        mime_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not mime_type.startswith("image/") or not response.content:
            raise self._malformed(
                response, f"expected image bytes, got {mime_type or 'no content type'}"
            )
        seed = _int(response.headers.get("seed"))
        finish = response.headers.get("finish-reason", "SUCCESS")
        request_id = response.headers.get("x-request-id")
        if finish == "CONTENT_FILTERED":
            charged = f"; charged {credits:g} credits" if credits is not None else "; charged"
            raise ChargedRefusal(
                "the image was filtered by moderation and came back blurred" + charged,
                cost=credits,
                cost_unit=COST_UNIT,
                seed=seed,
                request_id=request_id,
            )
        if finish != "SUCCESS":
            raise ProviderError(
                self.name,
                "failed",
                f"finish-reason {finish}",
                status=200,
                provider_code=finish,
                request_id=request_id,
            )
        return Result(
            images=[Image(data=response.content, mime_type=mime_type)],
            seed=seed,
            request_id=request_id,
            cost=credits,
            cost_unit=COST_UNIT if credits is not None else None,
            details={"finishReason": finish},
        )

    def _malformed(self, response: httpx.Response, message: str) -> ProviderError:
        return ProviderError(
            self.name,
            "malformed",
            f"{response.request.url.path}: {message}",
            status=response.status_code,
        )

    def _error(self, response: httpx.Response) -> ProviderError:
        """The error of a Stability error body (`{"id", "name", "errors"}`)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self.error(response)
        name = body.get("name") if isinstance(body.get("name"), str) else None
        errors = body.get("errors")
        message = "; ".join(str(error) for error in errors) if isinstance(errors, list) else None
        request_id = body.get("id") if isinstance(body.get("id"), str) else None
        if response.status_code == 403 and name == "content_moderation":
            return ProviderError(
                self.name,
                "content_blocked",
                message or "denied by content moderation",
                status=403,
                provider_code=name,
                request_id=request_id,
            )
        failure = self.error(response, message or name)
        failure.provider_code = name
        failure.request_id = failure.request_id or request_id
        return failure


def nearest_aspect_ratio(width: int, height: int, ratios: Sequence[str]) -> str:
    """The "W:H" of `ratios` nearest width x height (the first on a tie; others skipped).

    >>> nearest_aspect_ratio(1920, 1080, ["21:9", "16:9", "1:1"])
    '16:9'
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


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
