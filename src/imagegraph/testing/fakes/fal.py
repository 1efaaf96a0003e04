"""A fake of fal's queue API, as `FalAdapter` and fal's clients see it.

    POST /{owner}/{app}[/{path}][?fal_webhook=URL]   submit -> IN_QUEUE + the job's URLs
    GET  /{owner}/{app}/requests/{id}/status         202 IN_QUEUE | IN_PROGRESS, 200 COMPLETED
    GET  /{owner}/{app}/requests/{id}/status/stream  the same as server-sent events, until done
    GET  /{owner}/{app}/requests/{id}                the output (400 while it runs)
    PUT  /{owner}/{app}/requests/{id}/cancel         202 CANCELLATION_REQUESTED, 400, 404
    GET  /.well-known/jwks.json                      the key webhooks are signed with

A job is IN_QUEUE for the first half of `latency`, IN_PROGRESS for the second. Prompts
`moderate` accepts end in a 422 `content_policy_violation` from the result endpoint;
prompts `flag_nsfw` accepts succeed with black images and `has_nsfw_concepts: [true]`;
prompts `fail` accepts end COMPLETED with an `internal_server_error`.

    with FalFake(latency=0.5) as fal:
        adapter = FalAdapter(ProviderConfig("fal", fal.api_key, fal.url), http,
                             jwks_url=fal.jwks_url)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image as PILImage
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from imagegraph.testing.fakes.server import MIME, FakeProvider

# fal's named sizes (the default is landscape_4_3).
IMAGE_SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
UPSCALERS = {"fal-ai/esrgan": "scale", "fal-ai/clarity-upscaler": "upscale_factor"}
CUTOUT = "fal-ai/birefnet"
# Models that answer with has_nsfw_concepts (FLUX.1); FLUX.2 answers only images and seed.
NSFW_CHECKED = ("fal-ai/flux/", "fal-ai/flux-pro")
WEBHOOK_ATTEMPTS = 3


class FalFake(FakeProvider):
    """fal's queue API on 127.0.0.1, with Ed25519-signed webhooks."""

    name = "fal"

    def __init__(
        self,
        *,
        flag_nsfw: Callable[[str], bool] | None = None,
        fail: Callable[[str], bool] | None = None,
        user_id: str = "fake-user",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.flag_nsfw = flag_nsfw or (lambda prompt: "nsfw" in prompt.lower())
        self.fail = fail or (lambda prompt: "explode" in prompt.lower())
        self.user_id = user_id
        self.signing_key = Ed25519PrivateKey.generate()
        self.key_id = f"fake-{secrets.token_hex(4)}"
        self.webhooks_sent = 0  # deliveries a receiver answered with 2xx
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/.well-known/jwks.json"

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/.well-known/jwks.json", self._jwks, methods=["GET"]),
            Route("/{owner}/{app}/requests/{request_id}/status", self._status, methods=["GET"]),
            Route(
                "/{owner}/{app}/requests/{request_id}/status/stream",
                self._status_stream,
                methods=["GET"],
            ),
            Route("/{owner}/{app}/requests/{request_id}/cancel", self._cancel, methods=["PUT"]),
            Route("/{owner}/{app}/requests/{request_id}", self._result, methods=["GET"]),
            Route("/{model:path}", self._submit, methods=["POST"]),
        ]

    # -- signing -------------------------------------------------------------------------

    def sign_webhook(
        self,
        request_id: str,
        body: bytes,
        *,
        timestamp: int | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> dict[str, str]:
        """The headers fal sends with a webhook `body` (signed with this fake's key, or
        `key`; `timestamp` defaults to now)."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        message = "\n".join(
            [request_id, self.user_id, stamp, hashlib.sha256(body).hexdigest()]
        ).encode()
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": stamp,
            "X-Fal-Webhook-Signature": (key or self.signing_key).sign(message).hex(),
        }

    def jwks(self) -> dict[str, Any]:
        raw = self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        key = {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "use": "sig"}
        return {"keys": [key]}

    # -- handlers ------------------------------------------------------------------------

    async def _jwks(self, request: Request) -> Response:
        return await self.inject("jwks") or JSONResponse(self.jwks())

    async def _submit(self, request: Request) -> Response:
        fault = await self.inject("submit")
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _unauthorized()
        try:
            arguments = json.loads(await request.body())
        except ValueError:
            return _detail(422, ["body"], "Input should be a valid JSON object", "json_invalid")
        if not isinstance(arguments, dict):
            return _detail(422, ["body"], "Input should be a valid dictionary", "dict_type")
        model = request.path_params["model"].strip("/")
        owner_app = "/".join(model.split("/")[:2])
        request_id = secrets.token_hex(16)
        base = f"{self.url}/{owner_app}/requests/{request_id}"
        webhook = request.query_params.get("fal_webhook")
        self.jobs[request_id] = {
            "model": model,
            "app": owner_app,
            "input": arguments,
            "headers": dict(request.headers),
            "webhook": webhook,
            "submitted": time.monotonic(),
            "cancelled": False,
        }
        self.count_accepted(request_id)
        if webhook:
            self._background(self._send_webhook_when_done(request_id))
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                "request_id": request_id,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": 0,
            },
            headers={"x-fal-request-id": request_id},
        )

    async def _status(self, request: Request) -> Response:
        job = await self._admitted(request, "status")
        if isinstance(job, Response):
            return job
        headers = {"x-fal-request-id": request.path_params["request_id"]}
        code, body = self._status_of(job, logs=request.query_params.get("logs") == "1")
        return JSONResponse(body, code, headers=headers)

    async def _status_stream(self, request: Request) -> Response:
        job = await self._admitted(request, "status")
        if isinstance(job, Response):
            return job
        logs = request.query_params.get("logs") == "1"

        async def events() -> AsyncIterator[str]:
            sent = None
            while True:
                _, body = self._status_of(job, logs=logs)
                if body != sent:
                    sent = body
                    yield f"data: {json.dumps(body)}\n\n"
                if body["status"] == "COMPLETED" or self.stopping:
                    return
                # Sleep until the status changes (in queue for the first half of the latency,
                # then in progress), looking in now and then for a cancellation.
                elapsed = time.monotonic() - float(job["submitted"])
                change = self.latency / 2 if elapsed < self.latency / 2 else self.latency
                await asyncio.sleep(min(max(change - elapsed, 0.001), 0.25))

        headers = {"x-fal-request-id": request.path_params["request_id"]}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _status_of(self, job: Mapping[str, Any], *, logs: bool) -> tuple[int, dict[str, Any]]:
        """The status endpoint's code and body for `job` now."""
        elapsed = time.monotonic() - float(job["submitted"])
        body: dict[str, Any]
        if job["cancelled"]:
            body = {
                "status": "COMPLETED",
                "error": "Request was cancelled",
                "error_type": "request_cancelled",
            }
            return 200, body
        if not self.done(job):
            in_queue = elapsed < self.latency / 2
            body = {"status": "IN_QUEUE" if in_queue else "IN_PROGRESS"}
            if in_queue:
                body["queue_position"] = 0
            if logs:
                body["logs"] = [] if in_queue else [_log("Generating")]
            return 202, body
        body = {"status": "COMPLETED", "metrics": {"inference_time": self.latency}}
        if logs:
            body["logs"] = [_log("Generating"), _log("Done")]
        if self.fail(_prompt(job)):
            body |= {"error": "Internal server error", "error_type": "internal_server_error"}
        return 200, body

    async def _result(self, request: Request) -> Response:
        job = await self._admitted(request, "result")
        if isinstance(job, Response):
            return job
        if job["cancelled"]:
            return JSONResponse({"detail": "Request was cancelled"}, 400)
        if not self.done(job):
            return JSONResponse({"detail": "Request is still in progress"}, 400)
        status, body = self._outcome(job)
        self.job_taken(request.path_params["request_id"])
        headers = {"x-fal-request-id": request.path_params["request_id"]}
        if status >= 500:
            headers["X-Fal-Retryable"] = "false"
        return JSONResponse(body, status, headers=headers)

    async def _cancel(self, request: Request) -> Response:
        job = await self._admitted(
            request, "cancel", missing=JSONResponse({"status": "NOT_FOUND"}, 404)
        )
        if isinstance(job, Response):
            return job
        if job["cancelled"] or self.done(job):
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
        job["cancelled"] = True
        self.job_taken(request.path_params["request_id"])
        with self._lock:
            self.cancelled += 1
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    # -- jobs ----------------------------------------------------------------------------

    async def _admitted(
        self, request: Request, endpoint: str, missing: Response | None = None
    ) -> dict[str, Any] | Response:
        """The job a request is about, or what to answer instead: a queued fault, 401 for
        a wrong key, 404 (or `missing`) for an unknown job."""
        fault = await self.inject(endpoint)
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _unauthorized()
        job = self._job(request)
        if job is None:
            return missing or JSONResponse({"detail": "Request not found"}, 404)
        return job

    def _authorized(self, request: Request) -> bool:
        return self.authorized(request, "authorization", "Key ")

    def _job(self, request: Request) -> dict[str, Any] | None:
        job = self.jobs.get(request.path_params["request_id"])
        owner_app = f"{request.path_params['owner']}/{request.path_params['app']}"
        return job if job is not None and job["app"] == owner_app else None

    def _outcome(self, job: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The result endpoint's status and body for a finished job (made once)."""
        if "outcome" not in job:
            job["outcome"] = self._run(job)
        outcome: tuple[int, dict[str, Any]] = job["outcome"]
        return outcome

    def _run(self, job: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        arguments: Mapping[str, Any] = job["input"]
        model: str = job["model"]
        prompt = _prompt(job)
        if model in UPSCALERS or model == CUTOUT:
            return self._edit(model, arguments)
        if not isinstance(arguments.get("prompt"), str) or not arguments["prompt"]:
            return 422, _errors(["body", "prompt"], "Field required", "missing")
        if self.moderate(prompt):
            return 422, _errors(
                ["body", "prompt"],
                "The content could not be processed because it contained material flagged "
                "by a content checker.",
                "content_policy_violation",
                prompt,
            )
        if self.fail(prompt):
            return 500, _errors(["body"], "Internal server error", "internal_server_error")
        width, height = _size(arguments.get("image_size"))
        seed = arguments.get("seed")
        if not isinstance(seed, int):
            seed = secrets.randbelow(2**31)
        fmt = str(arguments.get("output_format") or "jpeg")
        flagged = self.flag_nsfw(prompt)
        images = []
        for index in range(int(arguments.get("num_images") or 1)):
            if flagged:  # fal blacks out what its safety checker flags
                data = _encode(PILImage.new("RGB", (width, height)), fmt)
            else:
                data, _ = self.image(prompt, seed + index, width, height, fmt)
            images.append(
                self._output_image(data, fmt, width, height, bool(arguments.get("sync_mode")))
            )
        output: dict[str, Any] = {
            "images": images,
            "seed": seed,
            "prompt": prompt,
            "timings": {"inference": self.latency},
        }
        if model.startswith(NSFW_CHECKED):
            output["has_nsfw_concepts"] = [flagged] * len(images)
        return 200, output

    def _edit(self, model: str, arguments: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        source = self._source(arguments.get("image_url"))
        if source is None:
            return 422, _errors(["body", "image_url"], "File download error", "file_download_error")
        fmt = str(arguments.get("output_format") or "png")
        if model == CUTOUT:
            picture = source.convert("RGBA")
        else:
            factor = int(arguments.get(UPSCALERS[model]) or 2)
            picture = source.resize((source.width * factor, source.height * factor))
        data = _encode(picture, fmt)
        image = self._output_image(data, fmt, picture.width, picture.height, False)
        output: dict[str, Any] = {"image": image}
        if model == "fal-ai/clarity-upscaler":
            output |= {"seed": arguments.get("seed", 0), "timings": {"inference": self.latency}}
        return 200, output

    def _source(self, url: Any) -> PILImage.Image | None:
        """The image an input URL names: a data URI or a file this fake serves."""
        if not isinstance(url, str):
            return None
        if url.startswith("data:"):
            try:
                data = base64.b64decode(url.partition(",")[2], validate=True)
            except (binascii.Error, ValueError):
                return None
        else:
            stored = self.files.get(url.rsplit("/", 1)[-1])
            if stored is None:
                return None
            data = stored.data
        try:
            picture = PILImage.open(io.BytesIO(data))
            picture.load()
        except OSError:
            return None
        return picture

    def _output_image(
        self, data: bytes, fmt: str, width: int, height: int, inline: bool
    ) -> dict[str, Any]:
        mime = MIME.get(fmt, "image/png")
        url = (
            f"data:{mime};base64,{base64.b64encode(data).decode()}"
            if inline
            else self.host_file(data, mime)
        )
        return {"url": url, "width": width, "height": height, "content_type": mime}

    # -- webhooks ------------------------------------------------------------------------

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_webhook_when_done(self, request_id: str) -> None:
        job = self.jobs[request_id]
        await asyncio.sleep(self.latency + 0.05)
        if job["cancelled"]:
            return
        status, output = self._outcome(job)
        body: dict[str, Any] = {
            "request_id": request_id,
            "gateway_request_id": request_id,
            "status": "OK" if status < 400 else "ERROR",
            "payload": output,
        }
        if status >= 400:
            body["error"] = f"Invalid status code: {status}"
        data = json.dumps(body).encode()
        async with httpx.AsyncClient(timeout=5) as http:
            for attempt in range(WEBHOOK_ATTEMPTS):
                try:
                    headers = self.sign_webhook(request_id, data)
                    response = await http.post(job["webhook"], content=data, headers=headers)
                    if response.is_success:
                        with self._lock:
                            self.webhooks_sent += 1
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2 * (attempt + 1))


def _prompt(job: Mapping[str, Any]) -> str:
    prompt = job["input"].get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value.get("width") or 1024), int(value.get("height") or 768)
    return IMAGE_SIZES.get(str(value), IMAGE_SIZES["landscape_4_3"])


def _encode(picture: PILImage.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    pil_format = {"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG")
    if pil_format == "JPEG":
        picture = picture.convert("RGB")
    picture.save(buffer, pil_format)
    return buffer.getvalue()


def _errors(loc: list[str], msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    entry = {"loc": loc, "msg": msg, "type": kind, "url": f"https://docs.fal.ai/errors/#{kind}"}
    if value is not None:
        entry["input"] = value
    return {"detail": [entry]}


def _detail(status: int, loc: list[str], msg: str, kind: str) -> JSONResponse:
    return JSONResponse(_errors(loc, msg, kind), status)


def _unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "No user found for Key ID and Secret"}, 401)


def _log(message: str) -> dict[str, str]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    return {"message": message, "level": "INFO", "source": "USER", "timestamp": stamp}
