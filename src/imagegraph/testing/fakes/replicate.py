"""A fake of Replicate's predictions API, as `ReplicateAdapter` and the `replicate` SDK
see it.

    POST /v1/models/{owner}/{name}/predictions   create (201), `Prefer: wait[=N]` honoured
    POST /v1/predictions                          create with `version`
    GET  /v1/predictions/{id}                     the prediction
    POST /v1/predictions/{id}/cancel              cancel; answers the prediction
    GET  /v1/webhooks/default/secret              {"key": "whsec_..."}

A prediction is `starting` for the first half of `latency`, `processing` for the second,
then `succeeded` (or `failed`: prompts `moderate` accepts fail with a "flagged as
sensitive" error, prompts `fail` accepts with a plain one). A `Cancel-After` deadline that
passes first makes it `aborted` (not started yet) or `canceled`. `Prefer: wait[=N]` holds
the create call until the prediction ends; if N seconds pass first, the prediction is
answered `starting`, as Replicate's blocking API answers it (the SDK's `run` counts on it).
Webhooks carry the prediction, signed per Standard Webhooks with `webhook_secret`.

    with ReplicateFake(latency=0.5) as replicate:
        client = replicate_sdk.Client(api_token=replicate.api_key, base_url=replicate.url)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph.testing.fakes.server import FakeProvider

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
MODERATED = (
    "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
)
FAILED = "Prediction failed: CUDA error: an illegal memory access was encountered"
# Models that answer a list of URLs; the others answer one URL.
LIST_OUTPUT = frozenset({"black-forest-labs/flux-dev", "black-forest-labs/flux-schnell"})
# Models whose bare version ids (`version_of`) the version endpoint knows from the start.
KNOWN_MODELS = (
    "black-forest-labs/flux-dev",
    "black-forest-labs/flux-schnell",
    "black-forest-labs/flux-1.1-pro",
    "black-forest-labs/flux-2-pro",
)
FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}  # Replicate's -> the fake's
WEBHOOK_ATTEMPTS = 3


class ReplicateFake(FakeProvider):
    """Replicate's predictions API on 127.0.0.1, with Standard Webhooks."""

    name = "replicate"

    def __init__(
        self,
        *,
        fail: Callable[[str], bool] | None = None,
        webhook_secret: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.fail = fail or (lambda prompt: "explode" in prompt.lower())
        self.webhook_secret = (
            webhook_secret or f"whsec_{base64.b64encode(secrets.token_bytes(24)).decode()}"
        )
        self.webhooks_sent = 0  # deliveries a receiver answered with 2xx
        self.versions = {version_of(model): model for model in KNOWN_MODELS}
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[BaseRoute]:
        return [
            Route(
                "/v1/models/{owner}/{name}/predictions", self._create_for_model, methods=["POST"]
            ),
            Route("/v1/predictions", self._create_for_version, methods=["POST"]),
            Route("/v1/predictions/{id}", self._get, methods=["GET"]),
            Route("/v1/predictions/{id}/cancel", self._cancel, methods=["POST"]),
            Route("/v1/webhooks/default/secret", self._secret, methods=["GET"]),
        ]

    def sign_webhook(
        self, body: bytes, *, msg_id: str | None = None, timestamp: float | None = None
    ) -> dict[str, str]:
        """The Standard Webhooks headers Replicate sends with `body` (now, unless
        `timestamp` says otherwise)."""
        msg_id = msg_id or f"msg_{secrets.token_hex(12)}"
        when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
        signature = Webhook(self.webhook_secret).sign(msg_id, when, body.decode())
        return {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(math.floor(when.timestamp())),
            "webhook-signature": signature,
        }

    # -- handlers ------------------------------------------------------------------------

    async def _create_for_model(self, request: Request) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        return await self._create(request, model)

    async def _create_for_version(self, request: Request) -> Response:
        return await self._create(request, None)

    async def _create(self, request: Request, model: str | None) -> Response:
        fault = await self.inject("submit")
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _unauthorized()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _problem(400, "Invalid JSON", "The request body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return _invalid("input is required")
        if model is None:  # `version`: owner/name, owner/name:id or a bare id
            version = str(body.get("version") or "")
            model = version.split(":")[0] if "/" in version else self.versions.get(version)
            if model is None:
                return _problem(
                    422,
                    "Invalid version or not permitted",
                    "The specified version does not exist (or perhaps you don't have "
                    "permission to use it?)",
                )
        self.versions.setdefault(version_of(model), model)
        arguments: dict[str, Any] = body["input"]
        if not isinstance(arguments.get("prompt"), str) or not arguments["prompt"]:
            return _invalid("prompt is required")
        prediction_id = _prediction_id()
        webhook = body.get("webhook")
        events = body.get("webhook_events_filter")
        self.jobs[prediction_id] = {
            "id": prediction_id,
            "model": model,
            "version": version_of(model),
            "input": arguments,
            "headers": dict(request.headers),
            "webhook": webhook if isinstance(webhook, str) else None,
            "events": events,
            "submitted": time.monotonic(),
            "created": time.time(),
            "cancel_after": _duration(request.headers.get("cancel-after")),
            "canceled_at": None,
            "notified": False,
        }
        self.count_accepted()
        job = self.jobs[prediction_id]
        if job["webhook"] and (events is None or "completed" in events):
            self._background(self._send_webhook_when_done(prediction_id))
        wait = _wait(request.headers.get("prefer"))
        status = None
        if wait:  # hold the answer until the prediction is done, or `wait` runs out
            await asyncio.sleep(min(wait, self._remaining(job)))
            if self._status(job) not in TERMINAL:
                status = "starting"
        return JSONResponse(self._prediction(job, status), 201)

    async def _get(self, request: Request) -> Response:
        fault = await self.inject("status")
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _unauthorized()
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        return JSONResponse(self._prediction(job))

    async def _cancel(self, request: Request) -> Response:
        fault = await self.inject("cancel")
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _unauthorized()
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        if self._status(job) not in TERMINAL:
            job["canceled_at"] = time.monotonic()
            with self._lock:
                self.cancelled += 1
            if job["webhook"]:
                self._background(self._deliver(job))
        return JSONResponse(self._prediction(job))

    async def _secret(self, request: Request) -> Response:
        fault = await self.inject("secret")
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _unauthorized()
        return JSONResponse({"key": self.webhook_secret})

    # -- predictions ---------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        return self.authorized(request, "authorization", "Bearer ")

    def _status(self, job: Mapping[str, Any]) -> str:
        now = time.monotonic()
        if job["canceled_at"] is not None:
            return "canceled"
        elapsed = now - float(job["submitted"])
        deadline = job["cancel_after"]
        if deadline is not None and elapsed >= deadline and deadline < self.latency:
            return "aborted" if deadline < self.latency / 2 else "canceled"
        if elapsed < self.latency / 2:
            return "starting"
        if elapsed < self.latency:
            return "processing"
        prompt = str(job["input"].get("prompt"))
        return "failed" if self.moderate(prompt) or self.fail(prompt) else "succeeded"

    def _remaining(self, job: Mapping[str, Any]) -> float:
        """Seconds until the prediction ends by itself (a little over: never early)."""
        ends = self.latency
        if job["cancel_after"] is not None:
            ends = min(ends, float(job["cancel_after"]))
        return max(0.0, float(job["submitted"]) + ends - time.monotonic()) + 0.01

    def _prediction(self, job: dict[str, Any], status: str | None = None) -> dict[str, Any]:
        """The prediction as the API answers it (in `status`, if given)."""
        status = status or self._status(job)
        seed = job["input"].get("seed")
        if not isinstance(seed, int):
            seed = job.setdefault("seed", secrets.randbelow(2**31))
        prompt = str(job["input"].get("prompt"))
        logs = "" if status == "starting" else f"Using seed: {seed}\n"
        output: Any = None
        error = None
        if status == "succeeded":
            logs += "100%|██████████| 28/28 [00:01<00:00, 18.20it/s]\n"
            output = self._output(job, seed)
        elif status == "failed":
            error = MODERATED if self.moderate(prompt) else FAILED
        base = f"{self.url}/v1/predictions/{job['id']}"
        terminal = status in TERMINAL
        return {
            "id": job["id"],
            "model": job["model"],
            "version": job["version"],
            "input": job["input"],
            "logs": logs,
            "output": output,
            "data_removed": False,
            "error": error,
            "status": status,
            "created_at": _iso(job["created"]),
            "started_at": _iso(job["created"] + self.latency / 2) if status != "starting" else None,
            "completed_at": _iso(job["created"] + self.latency) if terminal else None,
            "deadline": None,
            "metrics": (
                {"predict_time": self.latency / 2, "total_time": self.latency} if terminal else {}
            ),
            "urls": {
                "get": base,
                "cancel": f"{base}/cancel",
                "stream": f"{self.url}/v1/streams/{job['id']}",
                "web": f"https://replicate.com/p/{job['id']}",
            },
        }

    def _output(self, job: dict[str, Any], seed: int) -> Any:
        """The output URLs (made once): a list for FLUX.1 [dev] and friends, else one URL."""
        if "output" not in job:
            arguments = job["input"]
            width, height = _dimensions(arguments)
            fmt = FORMATS.get(str(arguments.get("output_format") or "webp"), "webp")
            urls = []
            for index in range(int(arguments.get("num_outputs") or 1)):
                data, mime = self.image(str(arguments["prompt"]), seed + index, width, height, fmt)
                urls.append(self.host_file(data, mime))
            job["output"] = urls if job["model"] in LIST_OUTPUT else urls[0]
        return job["output"]

    # -- webhooks ------------------------------------------------------------------------

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_webhook_when_done(self, prediction_id: str) -> None:
        job = self.jobs[prediction_id]
        await asyncio.sleep(self.latency + 0.05)
        if self._status(job) in TERMINAL:
            await self._deliver(job)

    async def _deliver(self, job: dict[str, Any]) -> None:
        if job["notified"]:
            return
        job["notified"] = True
        data = json.dumps(self._prediction(job)).encode()
        async with httpx.AsyncClient(timeout=5) as http:
            for attempt in range(WEBHOOK_ATTEMPTS):
                try:
                    headers = self.sign_webhook(data)
                    response = await http.post(job["webhook"], content=data, headers=headers)
                    if response.is_success:
                        with self._lock:
                            self.webhooks_sent += 1
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2 * (attempt + 1))


def version_of(model: str) -> str:
    """The fake's version id of a model: 64 hex digits, like Replicate's."""
    return hashlib.sha256(model.encode()).hexdigest()


def _dimensions(arguments: Mapping[str, Any]) -> tuple[int, int]:
    """The output size an input asks for: `custom` width/height, else its aspect ratio at
    `megapixels` (1 by default)."""
    ratio = str(arguments.get("aspect_ratio") or "1:1")
    if ratio == "custom" or ("width" in arguments and "aspect_ratio" not in arguments):
        return int(arguments.get("width") or 1024), int(arguments.get("height") or 1024)
    across, _, down = ratio.partition(":")
    try:
        shape = float(across) / float(down)
        area = float(arguments.get("megapixels") or 1) * 1_000_000
    except (ValueError, ZeroDivisionError):
        shape, area = 1.0, 1_000_000.0
    width = max(16, round(math.sqrt(area * shape) / 16) * 16)
    return width, max(16, round(width / shape / 16) * 16)


def _duration(value: str | None) -> float | None:
    """Seconds of a `Cancel-After` header: 90, 90s, 500ms, 5m, 1h."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value or "")
    if not found:
        return None
    unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[found.group(2) or "s"]
    return float(found.group(1)) * unit


def _wait(value: str | None) -> float:
    """Seconds a `Prefer: wait[=N]` header asks the create call to hold (at most 60)."""
    found = re.search(r"\bwait(?:=(\d+))?", value or "")
    if not found:
        return 0.0
    return float(min(int(found.group(1) or 60), 60))


def _prediction_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(26))


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")


def _problem(status: int, title: str, detail: str, **more: Any) -> JSONResponse:
    body = {"title": title, "detail": detail, "status": status, **more}
    return JSONResponse(body, status, media_type="application/problem+json")


def _invalid(description: str) -> JSONResponse:
    field = {"type": "required", "field": "input", "description": description}
    return _problem(
        422, "Input validation failed", f"- input: {description}\n", invalid_fields=[field]
    )


def _unauthorized() -> JSONResponse:
    return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")
