"""fal.ai, through its queue API.

    POST {base}/{owner}/{app}[/{path}][?fal_webhook=URL]  the model input as JSON
         -> {request_id, status_url, response_url, cancel_url, status: IN_QUEUE}
    GET  {status_url}     -> 202 IN_QUEUE | IN_PROGRESS, 200 COMPLETED (maybe with `error`)
    GET  {response_url}   -> the model output: {images: [...], seed, ...} or {image: {...}}
    PUT  {cancel_url}     -> CANCELLATION_REQUESTED | ALREADY_COMPLETED | NOT_FOUND

Auth is `Authorization: Key <key>`. Status, result and cancel URLs name only the model's
owner/app (not its subpath), so they are taken from the submit answer, never built.

Moderation comes in two forms: a 422 whose `detail[].type` is `content_policy_violation`,
or a success whose `has_nsfw_concepts` flags every image. Completion webhooks are signed
with Ed25519 over `request_id \\n user_id \\n timestamp \\n sha256_hex(body)`, with public keys
from a JWKS URL.

Models not listed in `MODELS` get the common FLUX-style fields (prompt, image_size, seed,
steps, guidance, num_images, output_format, image_url); anything else goes in `extra`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
    error_for_status,
)

DEFAULT_BASE_URL = "https://queue.fal.run"
DEFAULT_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"
WEBHOOK_TOLERANCE = 300.0  # seconds a webhook timestamp may be off from our clock
JWKS_TTL = 3600.0  # seconds fetched webhook keys are used before fetching them again
# A signature no cached key verifies makes us fetch the keys again (fal may have rotated
# them), but not more often than this, so forged webhooks cannot make us hammer the URL.
JWKS_MIN_REFETCH = 60.0
# How long the rest of a status stream is read after COMPLETED (it ends right after).
DRAIN_SECONDS = 0.5


@dataclass(frozen=True)
class FalModel:
    """What one fal model takes: our `Request` field -> its input field, and the values."""

    fields: Mapping[str, str]
    formats: frozenset[str] = frozenset()  # output formats it takes
    tolerance: tuple[int, int] | None = None  # the safety_tolerance range it takes
    max_images: int = 1


_FLUX_DEV = FalModel(
    {
        "prompt": "prompt",
        "size": "image_size",
        "seed": "seed",
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "num_images": "num_images",
        "output_format": "output_format",
    },
    formats=frozenset({"png", "jpeg"}),
    max_images=4,
)
_FLUX_2_FLEX = FalModel(
    {
        "prompt": "prompt",
        "size": "image_size",
        "seed": "seed",
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "output_format": "output_format",
        "safety_tolerance": "safety_tolerance",
    },
    formats=frozenset({"png", "jpeg"}),
    tolerance=(1, 5),
)
MODELS: Mapping[str, FalModel] = {
    "fal-ai/flux/dev": _FLUX_DEV,
    "fal-ai/flux-pro/v1.1": FalModel(
        {
            "prompt": "prompt",
            "size": "image_size",
            "seed": "seed",
            "num_images": "num_images",
            "output_format": "output_format",
            "safety_tolerance": "safety_tolerance",
        },
        formats=frozenset({"png", "jpeg"}),
        tolerance=(1, 6),
        max_images=4,
    ),
    "fal-ai/flux-2-pro": FalModel(
        {
            "prompt": "prompt",
            "size": "image_size",
            "seed": "seed",
            "output_format": "output_format",
            "safety_tolerance": "safety_tolerance",
        },
        formats=frozenset({"png", "jpeg"}),
        tolerance=(1, 5),
    ),
    # fal lists FLUX.2 [flex] as fal-ai/flux-2-flex; the catalog names it fal-ai/flux-2/flex.
    "fal-ai/flux-2-flex": _FLUX_2_FLEX,
    "fal-ai/flux-2/flex": _FLUX_2_FLEX,
    "fal-ai/esrgan": FalModel(
        {"image": "image_url", "scale": "scale", "output_format": "output_format"},
        formats=frozenset({"png", "jpeg"}),
    ),
    "fal-ai/clarity-upscaler": FalModel(
        {
            "image": "image_url",
            "prompt": "prompt",
            "negative_prompt": "negative_prompt",
            "scale": "upscale_factor",
            "seed": "seed",
            "steps": "num_inference_steps",
            "guidance": "guidance_scale",
        }
    ),
    "fal-ai/birefnet": FalModel(
        {"image": "image_url", "output_format": "output_format"},
        formats=frozenset({"png", "webp"}),
    ),
}
GENERIC = FalModel(
    {
        "prompt": "prompt",
        "size": "image_size",
        "seed": "seed",
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "num_images": "num_images",
        "output_format": "output_format",
        "image": "image_url",
    },
    formats=frozenset({"png", "jpeg"}),
    max_images=4,
)


class FalAdapter(Adapter):
    """fal's queue API. `jwks_url` serves the keys completion webhooks are signed with.

    adapter = FalAdapter(ProviderConfig("fal", key, DEFAULT_BASE_URL), http)
    """

    name: ClassVar[str] = "fal"
    supports_cancel: ClassVar[bool] = True
    supports_webhook: ClassVar[bool] = True
    watches: ClassVar[bool] = True

    def __init__(
        self,
        config: ProviderConfig,
        http: httpx.AsyncClient,
        *,
        jwks_url: str = DEFAULT_JWKS_URL,
        stream_http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(config, http)
        self.jwks_url = jwks_url
        self.stream_http = stream_http or http  # status streams (see `watch`)
        self._keys: list[Ed25519PublicKey] = []
        self._keys_fetched = float("-inf")  # time.monotonic() of the last fetch

    # -- the protocol --------------------------------------------------------------------

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Job | Result:
        body = self.input(route, request)
        params = {"fal_webhook": webhook_url} if webhook_url else None
        response = await self._send("POST", self.url(route.model), body=body, params=params)
        if response.is_error:
            raise self._error(response)
        answer = self._object(response)
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise self._malformed(response, "no request_id")
        urls = {
            "status": self._url_in(response, answer, "status_url"),
            "response": self._url_in(response, answer, "response_url"),
            "cancel": self._url_in(response, answer, "cancel_url"),
        }
        return Job(provider=self.name, model=route.model, id=request_id, urls=urls)

    async def poll(self, job: Job) -> Pending | Result:
        response = await self._send("GET", self._job_url(job, "status"))
        if response.is_error:
            raise self._error(response)
        return await self._outcome(job, response, self._object(response))

    async def watch(self, job: Job, seconds: float) -> Pending | Result:
        """The job's status stream (server-sent events) until it completes or `seconds`
        pass; the last status seen if it does not complete in that time."""
        url = self._job_url(job, "status") + "/stream"
        response: httpx.Response | None = None
        status: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(seconds):
                async with self._stream("GET", url) as response:
                    if response.is_error:
                        await response.aread()
                        raise self._error(response)
                    lines = response.aiter_lines()
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue
                        try:
                            event = json.loads(line[5:])
                        except ValueError:
                            raise self._malformed(response, "an event that is not JSON") from None
                        if not isinstance(event, dict):
                            raise self._malformed(response, "an event that is not an object")
                        status = event
                        if status.get("status") == "COMPLETED":
                            # Let the stream end, so its connection goes back to the pool.
                            with contextlib.suppress(TimeoutError, httpx.HTTPError):
                                async with asyncio.timeout(DRAIN_SECONDS):
                                    async for _ in lines:
                                        pass
                            break
        except TimeoutError:
            pass
        if response is None or status is None:
            return Pending("IN_QUEUE")
        return await self._outcome(job, response, status)

    async def _outcome(
        self, job: Job, response: httpx.Response, status: dict[str, Any]
    ) -> Pending | Result:
        """What a status answer means: still running, failed, or done (then the output)."""
        state = status.get("status")
        if state in ("IN_QUEUE", "IN_PROGRESS"):
            return Pending(str(state))
        if state != "COMPLETED":
            raise self._malformed(response, f"unknown status {state!r}")
        if status.get("error") or status.get("error_type"):
            raise self._job_error(job, status)
        output = await self._send("GET", self._job_url(job, "response"))
        if output.is_error:
            raise self._error(output)
        return self._result(job, output, status)

    async def cancel(self, job: Job) -> None:
        response = await self._send("PUT", self._job_url(job, "cancel"))
        if response.is_success:
            return
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("status") in ("ALREADY_COMPLETED", "NOT_FOUND"):
            return  # nothing left to stop
        raise self._error(response)

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> str:
        lower = {key.lower(): value for key, value in headers.items()}
        request_id = lower.get("x-fal-webhook-request-id")
        user_id = lower.get("x-fal-webhook-user-id")
        timestamp = lower.get("x-fal-webhook-timestamp")
        signature = lower.get("x-fal-webhook-signature")
        if not (request_id and user_id and timestamp and signature):
            raise self._unauthorized("webhook lacks the X-Fal-Webhook-* signature headers")
        try:
            skew = abs(time.time() - int(timestamp))
            signed = bytes.fromhex(signature)
        except ValueError:
            raise self._unauthorized("webhook timestamp or signature is not readable") from None
        if skew > WEBHOOK_TOLERANCE:
            raise self._unauthorized(
                f"webhook timestamp is {skew:.0f} s off (more than {WEBHOOK_TOLERANCE:.0f} s)"
            )
        message = "\n".join(
            [request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]
        ).encode()
        if not await self._signed_by_fal(signed, message):
            raise self._unauthorized("webhook signature does not verify")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and payload.get("request_id") not in (None, request_id):
            raise self._unauthorized("webhook body is about another request than its headers")
        return request_id

    # -- our request in fal's terms ------------------------------------------------------

    def input(self, route: Route, request: Request) -> dict[str, Any]:
        """The JSON body fal's `route.model` takes for `request`; raises `bad_request`
        naming the first parameter the model does not take."""
        model = MODELS.get(route.model, GENERIC)
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
            sent[model.fields["size"]] = _image_size(route, request)
        take("seed", request.seed)
        take("steps", request.steps)
        take("guidance", request.guidance)
        if request.num_images != 1:
            if "num_images" not in model.fields:
                raise _unsupported("num_images", route.model)
            if not 1 <= request.num_images <= model.max_images:
                raise _bad_request(
                    f"num_images {request.num_images} is out of range for {route.model} "
                    f"(1 to {model.max_images})"
                )
            take("num_images", request.num_images)
        if request.output_format is not None:
            take("output_format", request.output_format)
            if request.output_format not in model.formats:
                raise _bad_request(
                    f"output_format {request.output_format!r} is not one {route.model} "
                    f"takes ({', '.join(sorted(model.formats))})"
                )
        if request.safety_tolerance is not None:
            take("safety_tolerance", str(request.safety_tolerance))
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

    # -- fal's answers in our terms ------------------------------------------------------

    def _result(self, job: Job, response: httpx.Response, status: Mapping[str, Any]) -> Result:
        output = self._object(response)
        entries = output.get("images")
        if entries is None and isinstance(output.get("image"), dict):
            entries = [output["image"]]
        if not isinstance(entries, list) or not entries:
            raise self._malformed(response, "no images in the output")
        images = [self._image(response, entry) for entry in entries]
        flags = output.get("has_nsfw_concepts")
        if isinstance(flags, list) and flags and all(flag is True for flag in flags):
            raise ProviderError(
                self.name,
                "content_blocked",
                "fal's safety checker flagged every image (has_nsfw_concepts)",
                status=response.status_code,
                provider_code="has_nsfw_concepts",
                request_id=job.id,
            )
        details: dict[str, Any] = {}
        if isinstance(output.get("timings"), dict):
            details["timings"] = output["timings"]
        if isinstance(status.get("metrics"), dict):
            details["metrics"] = status["metrics"]
        if isinstance(flags, list):
            details["has_nsfw_concepts"] = flags
        seed = output.get("seed")
        return Result(
            images=images,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            request_id=job.id,
            details=details,
        )

    def _image(self, response: httpx.Response, entry: Any) -> Image:
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise self._malformed(response, "an image without a url")
        url: str = entry["url"]
        mime = entry.get("content_type") if isinstance(entry.get("content_type"), str) else None
        if url.startswith("data:"):  # sync_mode answers carry the bytes
            header, _, data = url.partition(",")
            if not header.endswith(";base64"):
                raise self._malformed(response, "a data URI that is not base64")
            try:
                content = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise self._malformed(response, "a data URI that does not decode") from None
            return Image(data=content, mime_type=header[5:-7] or mime)
        if urlsplit(url).scheme not in ("http", "https"):
            raise self._malformed(response, "an image URL that is not http(s)")
        return Image(url=url, mime_type=mime)

    def _job_error(self, job: Job, status: Mapping[str, Any]) -> ProviderError:
        """The error of a job that COMPLETED with an `error`."""
        error_type = str(status.get("error_type") or "")
        message = str(status.get("error") or error_type)[:300]
        kind: ErrorKind = "failed"
        if error_type == "content_policy_violation":
            kind = "content_blocked"
        elif "cancel" in error_type.lower() or "cancel" in message.lower():
            kind = "cancelled"
        return ProviderError(
            self.name, kind, message, provider_code=error_type or None, request_id=job.id
        )

    def _error(self, response: httpx.Response) -> ProviderError:
        """The error of an HTTP error answer, moderation first."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        detail = body.get("detail")
        entries = (
            [entry for entry in detail if isinstance(entry, dict)]
            if isinstance(detail, list)
            else []
        )
        types = [str(entry["type"]) for entry in entries if entry.get("type")]
        error_type = (
            (types[0] if types else None)
            or (str(body["error_type"]) if body.get("error_type") else None)
            or response.headers.get("x-fal-error-type")
        )
        request_id = response.headers.get("x-fal-request-id")
        if "content_policy_violation" in types or error_type == "content_policy_violation":
            reason = next(
                (
                    str(entry.get("msg"))
                    for entry in entries
                    if entry.get("type") == "content_policy_violation" and entry.get("msg")
                ),
                "the content was flagged by a content checker",
            )
            return ProviderError(
                self.name,
                "content_blocked",
                f"content_policy_violation: {reason}"[:300],
                status=response.status_code,
                provider_code="content_policy_violation",
                request_id=request_id,
            )
        error = error_for_status(self.name, response)
        message = error.message
        if (
            response.status_code >= 500
            and response.headers.get("x-fal-retryable", "").lower() == "false"
        ):
            # Still `unavailable` (the runner's policy decides), but worth seeing in the log.
            message = f"{message} (fal says X-Fal-Retryable: false)"
        return ProviderError(
            self.name,
            error.kind,
            message,
            status=error.status,
            retry_after=error.retry_after,
            provider_code=error_type,
            request_id=error.request_id,
        )

    # -- HTTP ----------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> httpx.Response:
        """One exchange, its failures as `ProviderError`s; the key goes only to the
        configured host."""
        headers = self._auth(url) if auth else {}
        try:
            return await self.http.request(method, url, json=body, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderError(
                self.name, "timeout", f"{method} {_path(url)}: no answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(
                self.name, "unavailable", f"{method} {_path(url)} failed: {exc!r}"
            ) from exc

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, url: str) -> AsyncIterator[httpx.Response]:
        """A streamed exchange, its failures as `ProviderError`s, like `_send`."""
        try:
            async with self.stream_http.stream(method, url, headers=self._auth(url)) as response:
                yield response
        except httpx.TimeoutException as exc:
            raise ProviderError(
                self.name, "timeout", f"{method} {_path(url)}: no answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(
                self.name, "unavailable", f"{method} {_path(url)} failed: {exc!r}"
            ) from exc

    def _auth(self, url: str) -> dict[str, str]:
        """The key, for the configured host only."""
        if self.config.api_key and self.trusted(url):
            return {"Authorization": f"Key {self.config.api_key}"}
        return {}

    async def _signed_by_fal(self, signature: bytes, message: bytes) -> bool:
        if _verifies(await self._webhook_keys(), signature, message):
            return True
        # fal may have rotated its keys since we fetched them.
        if time.monotonic() - self._keys_fetched < JWKS_MIN_REFETCH:
            return False
        return _verifies(await self._webhook_keys(refetch=True), signature, message)

    async def _webhook_keys(self, *, refetch: bool = False) -> list[Ed25519PublicKey]:
        if not refetch and self._keys and time.monotonic() - self._keys_fetched < JWKS_TTL:
            return self._keys
        response = await self._send("GET", self.jwks_url, auth=False)
        if response.is_error:
            raise error_for_status(
                self.name, response, f"fetching webhook keys from {_path(self.jwks_url)}"
            )
        jwks = self._object(response)
        keys = []
        for jwk in jwks.get("keys") or []:
            if not isinstance(jwk, dict) or (jwk.get("kty"), jwk.get("crv")) != ("OKP", "Ed25519"):
                continue
            x = str(jwk.get("x"))
            try:
                raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
            except (binascii.Error, ValueError):
                continue  # not a key we can use; others may be
        if not keys:
            raise self._malformed(response, "no Ed25519 keys in the JWKS")
        self._keys, self._keys_fetched = keys, time.monotonic()
        return keys

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

    def _url_in(self, response: httpx.Response, body: Mapping[str, Any], key: str) -> str:
        value = body.get(key)
        if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
            raise self._malformed(response, f"no {key}")
        return value

    def _malformed(self, response: httpx.Response, what: str) -> ProviderError:
        return ProviderError(
            self.name,
            "malformed",
            f"answer to {response.request.method} {response.request.url.path}: {what}",
            status=response.status_code,
            request_id=response.headers.get("x-fal-request-id"),
        )

    def _unauthorized(self, message: str) -> ProviderError:
        return ProviderError(self.name, "unauthorized", message)


def _image_size(route: Route, request: Request) -> dict[str, int]:
    if request.width is None or request.height is None:
        raise _bad_request(f"{route.model} takes width and height together")
    mode = route.options.get("size", "image_size")
    if mode != "image_size":
        raise _bad_request(f"the fal adapter cannot send a size as {mode!r} ({route.model})")
    return {"width": request.width, "height": request.height}


def _verifies(keys: list[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


def _unsupported(param: str, model: str) -> ProviderError:
    return _bad_request(f"{model} does not take {param}")


def _bad_request(message: str) -> ProviderError:
    return ProviderError("fal", "bad_request", message)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"
