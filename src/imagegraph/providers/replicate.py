"""Replicate, through its predictions API.

    POST {base}/v1/models/{owner}/{name}/predictions   {input, webhook?, webhook_events_filter?}
    POST {base}/v1/predictions                          the same with `version` (owner/name:id)
         -> 201 the prediction {id, status: starting, version, urls: {get, cancel}, ...}
    GET  {urls.get}      -> the prediction: starting | processing | succeeded | failed |
                            canceled | aborted; when succeeded `output` is a URL or a list
    POST {urls.cancel}   -> the prediction, canceled
    GET  {base}/v1/webhooks/default/secret -> {"key": "whsec_..."}

Auth is `Authorization: Bearer <token>`; errors are RFC 7807 problem details. Moderation
is a failed prediction whose `error` says so; its wording is not documented, so an error
mentioning NSFW, sensitive, safety or moderation counts as moderation. Completion webhooks
are the prediction itself, signed per Standard Webhooks with the account's `whsec_` secret.

Models not listed in `MODELS` get common Cog names (prompt, negative_prompt, aspect_ratio,
seed, num_inference_steps, guidance_scale, num_outputs, output_format, image).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imagegraph.providers.base import (
    Adapter,
    ErrorKind,
    Image,
    Job,
    Pending,
    ProviderConfig,
    ProviderError,
    Request,
    Result,
    Route,
)

DEFAULT_BASE_URL = "https://api.replicate.com"
DEFAULT_ASPECT_RATIOS = ("1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "4:5", "5:4")
# Words of a failed prediction's `error` that mean moderation refused it.
MODERATION = re.compile(r"nsfw|sensitive|safety|moderat", re.IGNORECASE)
ERROR_CODE = re.compile(r"\b(E\d{3,4})\b")  # Replicate's error codes, e.g. "(E005)"
SEED = re.compile(r"\bseed:\s*(\d+)", re.IGNORECASE)  # "Using seed: 1234" in the logs
FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # ours -> Replicate's
MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class ReplicateModel:
    """What one model takes: our `Request` field -> its input field, and the values."""

    fields: Mapping[str, str]
    tolerance: tuple[int, int] | None = None  # the safety_tolerance range it takes
    max_images: int = 1


MODELS: Mapping[str, ReplicateModel] = {
    "black-forest-labs/flux-dev": ReplicateModel(
        {
            "prompt": "prompt",
            "size": "aspect_ratio",
            "seed": "seed",
            "steps": "num_inference_steps",
            "guidance": "guidance",
            "num_images": "num_outputs",
            "output_format": "output_format",
        },
        max_images=4,
    ),
    "black-forest-labs/flux-1.1-pro": ReplicateModel(
        {
            "prompt": "prompt",
            "size": "aspect_ratio",
            "seed": "seed",
            "output_format": "output_format",
            "safety_tolerance": "safety_tolerance",
        },
        tolerance=(1, 6),
    ),
    "black-forest-labs/flux-2-pro": ReplicateModel(
        {
            "prompt": "prompt",
            "size": "aspect_ratio",
            "seed": "seed",
            "output_format": "output_format",
            "safety_tolerance": "safety_tolerance",
        },
        tolerance=(1, 5),
    ),
}
GENERIC = ReplicateModel(
    {
        "prompt": "prompt",
        "negative_prompt": "negative_prompt",
        "size": "aspect_ratio",
        "seed": "seed",
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "num_images": "num_outputs",
        "output_format": "output_format",
        "image": "image",
    },
    max_images=4,
)


class ReplicateAdapter(Adapter):
    """Replicate's predictions API. `webhook_secret` (`whsec_...`) verifies webhooks; when
    None it is fetched from Replicate once, at the first webhook.

    adapter = ReplicateAdapter(ProviderConfig("replicate", token, DEFAULT_BASE_URL), http)
    """

    name: ClassVar[str] = "replicate"
    supports_cancel: ClassVar[bool] = True
    supports_webhook: ClassVar[bool] = True

    def __init__(
        self,
        config: ProviderConfig,
        http: httpx.AsyncClient,
        *,
        webhook_secret: str | None = None,
    ) -> None:
        super().__init__(config, http)
        self.webhook_secret = webhook_secret

    # -- the protocol --------------------------------------------------------------------

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Job | Result:
        body: dict[str, Any] = {"input": self.input(route, request)}
        model, _, version = route.model.partition(":")
        if version:
            url = self.url("/v1/predictions")
            body["version"] = version
        else:
            url = self.url(f"/v1/models/{model}/predictions")
        if webhook_url:
            body["webhook"] = webhook_url
            body["webhook_events_filter"] = ["completed"]
        response = await self._send("POST", url, body=body)
        if response.is_error:
            raise self.error(response)
        prediction = self._object(response)
        prediction_id = prediction.get("id")
        urls = prediction.get("urls")
        if not isinstance(prediction_id, str) or not prediction_id or not isinstance(urls, dict):
            raise self._malformed(response, "no prediction id or urls")
        return Job(
            provider=self.name,
            model=route.model,
            id=prediction_id,
            urls={key: self._url_in(response, urls, key) for key in ("get", "cancel")},
        )

    async def poll(self, job: Job) -> Pending | Result:
        response = await self._send("GET", self._job_url(job, "get"))
        if response.is_error:
            raise self.error(response)
        prediction = self._object(response)
        status = prediction.get("status")
        if status in ("starting", "processing"):
            return Pending(str(status))
        if status == "succeeded":
            return self._result(job, response, prediction)
        if status in ("failed", "canceled", "aborted"):
            raise self._job_error(job, prediction)
        raise self._malformed(response, f"unknown status {status!r}")

    async def cancel(self, job: Job) -> None:
        response = await self._send("POST", self._job_url(job, "cancel"))
        if response.is_error and response.status_code != 404:  # 404: nothing left to stop
            raise self.error(response)

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> str:
        secret = await self._webhook_secret()
        try:
            prediction = Webhook(secret).verify(body, dict(headers))
        except WebhookVerificationError as exc:
            raise ProviderError(self.name, "unauthorized", f"webhook: {exc}") from None
        except (binascii.Error, ValueError) as exc:  # an unusable secret, or a body not JSON
            raise ProviderError(self.name, "malformed", f"webhook: {exc!r}") from None
        prediction_id = prediction.get("id") if isinstance(prediction, dict) else None
        if not isinstance(prediction_id, str) or not prediction_id:
            raise ProviderError(self.name, "malformed", "webhook body is not a prediction")
        return prediction_id

    # -- our request in Replicate's terms ------------------------------------------------

    def input(self, route: Route, request: Request) -> dict[str, Any]:
        """The `input` Replicate's `route.model` takes for `request`; raises `bad_request`
        naming the first parameter the model does not take."""
        model = MODELS.get(route.model.partition(":")[0], GENERIC)
        sent: dict[str, Any] = {}

        def take(param: str, value: Any) -> None:
            if value is None:
                return
            name = model.fields.get(param)
            if name is None:
                raise _unsupported(param, route.model)
            sent[name] = value

        take("prompt", request.prompt)
        take("negative_prompt", request.negative_prompt)
        if request.width is not None or request.height is not None:
            if "size" not in model.fields:
                raise _unsupported("width/height", route.model)
            sent.update(_size(route, request))
        take("seed", request.seed)
        take("steps", request.steps)
        take("guidance", request.guidance)
        if request.num_images != 1:
            take("num_images", request.num_images)
            if not 1 <= request.num_images <= model.max_images:
                raise _bad_request(
                    f"num_images {request.num_images} is out of range for {route.model} "
                    f"(1 to {model.max_images})"
                )
        if request.output_format is not None:
            take("output_format", FORMATS[request.output_format])
        if request.safety_tolerance is not None:
            take("safety_tolerance", request.safety_tolerance)
            low, high = model.tolerance or (0, 6)
            if not low <= request.safety_tolerance <= high:
                raise _bad_request(
                    f"safety_tolerance {request.safety_tolerance} is out of range for "
                    f"{route.model} ({low} to {high})"
                )
        take("image", request.image.data_uri() if request.image else None)
        take("mask", request.mask.data_uri() if request.mask else None)
        take("scale", request.scale)
        fixed = route.options.get("fixed") or {}
        return {**fixed, **sent, **request.extra}

    # -- Replicate's answers in our terms ------------------------------------------------

    def _result(self, job: Job, response: httpx.Response, prediction: Mapping[str, Any]) -> Result:
        output = prediction.get("output")
        urls = [output] if isinstance(output, str) else output
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise self._malformed(response, "a succeeded prediction without image URLs")
        sent = prediction.get("input")
        fmt = sent.get("output_format") if isinstance(sent, dict) else None
        images = [self._image(response, url, MIME.get(str(fmt))) for url in urls]
        metrics = prediction.get("metrics")
        details = {
            key: metrics[key]
            for key in ("predict_time", "total_time")
            if isinstance(metrics, dict) and isinstance(metrics.get(key), int | float)
        }
        version = prediction.get("version")
        return Result(
            images=images,
            seed=_seed(prediction),
            request_id=job.id,
            model_version=version if isinstance(version, str) and version else None,
            details=details,
        )

    def _image(self, response: httpx.Response, url: str, mime: str | None) -> Image:
        """One output; its type from the URL's extension, else from `mime` (what was
        asked for)."""
        if url.startswith("data:"):  # answers to `Prefer: wait` may carry the bytes
            header, _, data = url.partition(",")
            try:
                content = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise self._malformed(response, "a data URI that does not decode") from None
            return Image(data=content, mime_type=header[5:].split(";")[0] or None)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise self._malformed(response, "an output URL that is not http(s)")
        suffix = parts.path.rpartition("/")[2].rpartition(".")[2].lower()
        return Image(url=url, mime_type=MIME.get(suffix, mime))

    def _job_error(self, job: Job, prediction: Mapping[str, Any]) -> ProviderError:
        status = str(prediction.get("status"))
        error = str(prediction.get("error") or f"the prediction was {status}")[:300]
        code = ERROR_CODE.search(error)
        kind: ErrorKind = "failed"
        if status in ("canceled", "aborted"):
            kind = "cancelled"
        elif MODERATION.search(error):
            kind = "content_blocked"
        return ProviderError(
            self.name,
            kind,
            error,
            provider_code=code.group(1) if code else status,
            request_id=job.id,
        )

    # -- HTTP ----------------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, body: Any = None) -> httpx.Response:
        """One exchange, its failures as `ProviderError`s; the token goes only to the
        configured host."""
        headers = {}
        if self.config.api_key and self.trusted(url):
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        try:
            return await self.http.request(method, url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderError(
                self.name, "timeout", f"{method} {_path(url)}: no answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(
                self.name, "unavailable", f"{method} {_path(url)} failed: {exc!r}"
            ) from exc

    async def _webhook_secret(self) -> str:
        if self.webhook_secret is None:
            response = await self._send("GET", self.url("/v1/webhooks/default/secret"))
            if response.is_error:
                raise self.error(response)
            key = self._object(response).get("key")
            if not isinstance(key, str) or not key.startswith("whsec_"):
                raise self._malformed(response, "no whsec_ key")
            self.webhook_secret = key
        return self.webhook_secret

    def _job_url(self, job: Job, key: str) -> str:
        url = job.urls.get(key)
        if not url:
            raise _bad_request(f"job {job.id} has no {key} URL")
        return url

    def _object(self, response: httpx.Response) -> dict[str, Any]:
        body = self.json(response)
        if not isinstance(body, dict):
            raise self._malformed(response, "not a JSON object")
        return body

    def _url_in(self, response: httpx.Response, urls: Mapping[str, Any], key: str) -> str:
        value = urls.get(key)
        if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
            raise self._malformed(response, f"no urls.{key}")
        return value

    def _malformed(self, response: httpx.Response, what: str) -> ProviderError:
        return ProviderError(
            self.name,
            "malformed",
            f"answer to {response.request.method} {response.request.url.path}: {what}",
            status=response.status_code,
        )


def _size(route: Route, request: Request) -> dict[str, Any]:
    """The route's `aspectRatios` entry nearest to width/height; `custom` with width and
    height instead when the route lists `custom` and no ratio matches exactly. A route that
    lists `megapixels` (FLUX.1 [dev]: "1", "0.25") also gets the one nearest the area."""
    size = _shape(route, request)
    sizes = [str(value) for value in route.options.get("megapixels") or ()]
    if sizes and "width" not in size and request.width and request.height:
        area = request.width * request.height / 1_000_000
        size["megapixels"] = min(sizes, key=lambda mp: abs(math.log(float(mp) / area)))
    return size


def _shape(route: Route, request: Request) -> dict[str, Any]:
    if request.width is None or request.height is None:
        raise _bad_request(f"{route.model} takes width and height together")
    width, height = request.width, request.height
    mode = route.options.get("size", "aspect_ratio")
    if mode == "width_height":
        return {"width": width, "height": height}
    if mode != "aspect_ratio":
        raise _bad_request(f"the replicate adapter cannot send a size as {mode!r}")
    choices = [str(ratio) for ratio in route.options.get("aspectRatios") or DEFAULT_ASPECT_RATIOS]
    ratios = {ratio: value for ratio in choices if (value := _ratio(ratio)) is not None}
    if not ratios:
        return {"aspect_ratio": "custom", "width": width, "height": height}
    wanted = math.log(width / height)
    nearest = min(ratios, key=lambda ratio: abs(math.log(ratios[ratio]) - wanted))
    if "custom" in choices and abs(math.log(ratios[nearest]) - wanted) > 1e-9:
        return {"aspect_ratio": "custom", "width": width, "height": height}
    return {"aspect_ratio": nearest}


def _ratio(text: str) -> float | None:
    """3:2 -> 1.5; None for anything else ("custom", "match_input_image")."""
    across, _, down = text.partition(":")
    try:
        value = float(across) / float(down)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _seed(prediction: Mapping[str, Any]) -> int | None:
    """The seed used: Replicate's FLUX models log it ("Using seed: 1234"); else the one
    we sent."""
    logs = prediction.get("logs")
    found = SEED.search(logs) if isinstance(logs, str) else None
    if found:
        return int(found.group(1))
    sent = prediction.get("input")
    seed = sent.get("seed") if isinstance(sent, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _unsupported(param: str, model: str) -> ProviderError:
    return _bad_request(f"{model} does not take {param}")


def _bad_request(message: str) -> ProviderError:
    return ProviderError("replicate", "bad_request", message)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"
