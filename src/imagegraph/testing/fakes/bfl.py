"""A fake of Black Forest Labs' API, as `BflAdapter` and BFL's own clients see it.

    POST /v1/{model}                       submit -> {id, polling_url, cost, input_mp, output_mp}
    GET  /{region}/v1/get_result?id={id}   the task (the `polling_url`; /v1/get_result too)
    GET  /delivery/{token}/sample.{ext}    the image (`result.sample`, signed: se, sig)

Submits need `x-key` (missing or wrong: 403 with a `detail`). The input is checked against
the model's schema in BFL's OpenAPI description, as its FastAPI server checks it (422 with
a `detail` list of `{loc, msg, type, input}`; fields a model does not define are ignored,
as BFL ignores them); a model the fake does not know is a 404. Polling needs no key, as in
BFL's schema. Polling URLs point at `/{region}/v1/get_result`, as BFL's point at a
regional host: a client has to use the URL it was given.

A task is `Pending` (with `progress` from 0 to 1) until `latency` has passed, then `Ready`
with `result.sample`: a signed URL serving the image for `expire_after` seconds (403
afterwards, or with a wrong signature; BFL's last 10 minutes). Prompts `moderate` accepts
are `Request Moderated` from the first poll, prompts `flag` accepts end `Content
Moderated`, prompts `fail` accepts (and input images that do not decode) end in `Error`.
An unknown id answers 404 with a body whose status is `Task not found`. `cost` follows a
price list like BFL's: credits per image for FLUX.1, per megapixel for FLUX.2.
`webhook_url` is accepted but never called (how BFL signs webhooks is unconfirmed). There
is no cancel. Fault endpoints: "submit", "status", "download". `received` keeps the
endpoint, path, query, headers and body of each request.

    with BflFake(latency=0.5) as bfl:
        adapter = BflAdapter(ProviderConfig("bfl", bfl.api_key, bfl.url), http)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph.testing.fakes.server import FakeProvider

OutputFormat = Literal["jpeg", "png", "webp"]
DELIVERY_SECONDS = 600.0  # how long BFL's signed result URLs last


class TaskInputs(BaseModel):
    """The fields every model takes (BFL's schemas, without their descriptions)."""

    seed: int | None = None
    output_format: OutputFormat | None = "jpeg"
    webhook_url: str | None = Field(None, min_length=1, max_length=2083)
    webhook_secret: str | None = None


class FluxPro11Inputs(TaskInputs):
    prompt: str | None = ""
    image_prompt: str | None = None
    width: int = Field(1024, ge=256, le=1440, multiple_of=32)
    height: int = Field(768, ge=256, le=1440, multiple_of=32)
    prompt_upsampling: bool = False
    safety_tolerance: int = Field(2, ge=0, le=6)


class FluxDevInputs(FluxPro11Inputs):
    steps: int | None = Field(28, ge=1, le=50)
    guidance: float | None = Field(3.0, ge=1.5, le=5.0)


class Flux2KleinInputs(TaskInputs):
    prompt: str
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    width: int | None = Field(0, ge=64)  # 0: the first input image's, else 1024
    height: int | None = Field(0, ge=64)
    safety_tolerance: int = Field(2, ge=0, le=5)


class Flux2Inputs(Flux2KleinInputs):
    input_image_5: str | None = None
    input_image_6: str | None = None
    input_image_7: str | None = None
    input_image_8: str | None = None


class Flux2FlexInputs(Flux2Inputs):
    prompt_upsampling: bool | None = True
    guidance: float | None = Field(5.0, ge=1.5, le=10.0)
    steps: int | None = Field(50, ge=1, le=50)


MODELS: Mapping[str, type[TaskInputs]] = {
    "flux-pro-1.1": FluxPro11Inputs,
    "flux-dev": FluxDevInputs,
    "flux-2-pro": Flux2Inputs,
    "flux-2-max": Flux2Inputs,
    "flux-2-flex": Flux2FlexInputs,
    "flux-2-klein-4b": Flux2KleinInputs,
    "flux-2-klein-9b": Flux2KleinInputs,
}
PER_IMAGE = {"flux-pro-1.1": 4.0, "flux-dev": 2.5}
# FLUX.2: credits for the first megapixel of output, and for each further megapixel of
# output or input (megapixels of 2**20 pixels, rounded up).
PER_MEGAPIXEL = {
    "flux-2-pro": (3.0, 1.5),
    "flux-2-max": (7.0, 3.0),
    "flux-2-flex": (6.0, 6.0),
    "flux-2-klein-4b": (1.4, 0.1),
    "flux-2-klein-9b": (1.5, 0.2),
}


class BflFake(FakeProvider):
    """Black Forest Labs' API on 127.0.0.1 (see the module docstring)."""

    name = "bfl"

    def __init__(
        self,
        *,
        flag: Callable[[str], bool] | None = None,
        fail: Callable[[str], bool] | None = None,
        region: str = "us1",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.flag = flag or (lambda prompt: "nsfw" in prompt.lower())
        self.fail = fail or (lambda prompt: "explode" in prompt.lower())
        self.region = region  # polling URLs are /{region}/v1/get_result
        self._delivery_key = secrets.token_bytes(16)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/get_result", self._get_result, methods=["GET"]),
            Route("/{region}/v1/get_result", self._get_result, methods=["GET"]),
            Route("/delivery/{token}/sample.{ext}", self._delivery, methods=["GET"]),
            Route("/v1/{model:path}", self._submit, methods=["POST"]),
        ]

    def polling_url(self, task_id: str) -> str:
        """Where a task is polled (what the submit answer names)."""
        return f"{self.url}/{self.region}/v1/get_result?{urlencode({'id': task_id})}"

    # -- handlers ------------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        fault = await self.inject("submit")
        if fault is not None:
            return fault
        raw = await self._receive("submit", request)
        model = request.path_params["model"]
        schema = MODELS.get(model)
        if schema is None:
            return JSONResponse({"detail": "Not Found"}, 404)
        key = request.headers.get("x-key")
        if not key:
            return JSONResponse({"detail": "Not authenticated"}, 403)
        if key != self.api_key:
            return JSONResponse({"detail": "Not authenticated - Invalid Authentication"}, 403)
        if not raw:
            return _invalid([{"type": "missing", "loc": ["body"], "msg": "Field required"}])
        try:
            arguments = json.loads(raw)
        except ValueError as exc:
            error = {"type": "json_invalid", "loc": ["body", getattr(exc, "pos", 0)]}
            return _invalid([{**error, "msg": "JSON decode error", "input": {}}])
        try:
            inputs = schema.model_validate(arguments)
        except ValidationError as exc:
            return _invalid(
                [
                    {**error, "loc": ["body", *error["loc"]]}
                    for error in json.loads(exc.json(include_url=False))
                ]
            )
        task_id = str(uuid.uuid4())
        references = _references(inputs)
        pictures = {name: self._picture(value) for name, value in references.items()}
        width, height = _size(inputs, [p for p in pictures.values() if p is not None])
        input_pixels = sum(p.width * p.height for p in pictures.values() if p is not None)
        prompt = getattr(inputs, "prompt", None) or ""
        self.jobs[task_id] = {
            "id": task_id,
            "model": model,
            "input": arguments,
            "headers": dict(request.headers),
            "submitted": time.monotonic(),
            "started": time.time(),
            "prompt": prompt,
            "seed": inputs.seed if inputs.seed is not None else secrets.randbelow(2**31),
            "format": inputs.output_format or "jpeg",
            "size": (width, height),
            "unreadable": [name for name, picture in pictures.items() if picture is None],
        }
        self.count_accepted()
        return JSONResponse(
            {
                "id": task_id,
                "polling_url": self.polling_url(task_id),
                "cost": _cost(model, width * height, input_pixels),
                "input_mp": round(input_pixels / 1_000_000, 2),
                "output_mp": round(width * height / 1_000_000, 2),
            }
        )

    async def _get_result(self, request: Request) -> Response:
        fault = await self.inject("status")
        if fault is not None:
            return fault
        await self._receive("status", request)
        task_id = request.query_params.get("id")
        if task_id is None:
            return _invalid([{"type": "missing", "loc": ["query", "id"], "msg": "Field required"}])
        job = self.jobs.get(task_id)
        if job is None:
            return JSONResponse(_task(task_id, "Task not found"), 404)
        return JSONResponse(self._task(job))

    async def _delivery(self, request: Request) -> Response:
        token = request.path_params["token"]
        expected = self._signature(token, request.query_params.get("se", ""))
        if not hmac.compare_digest(request.query_params.get("sig", "").encode(), expected.encode()):
            body = b"<Error><Code>AuthenticationFailed</Code></Error>"
            return Response(body, 403, media_type="application/xml")
        return await self._file(request)

    # -- tasks ---------------------------------------------------------------------------

    async def _receive(self, endpoint: str, request: Request) -> bytes:
        raw = await request.body()
        with self._lock:
            self.received.append(
                {
                    "endpoint": endpoint,
                    "path": request.url.path,
                    "query": dict(request.query_params),
                    "headers": dict(request.headers),
                    "body": raw,
                }
            )
        return raw

    def _task(self, job: dict[str, Any]) -> dict[str, Any]:
        """Where a task stands now, as get_result answers it."""
        prompt: str = job["prompt"]
        if self.moderate(prompt):
            reasons = {"Moderation Reasons": ["Content Policy"]}
            return _task(job["id"], "Request Moderated", details=reasons)
        if not self.done(job):
            elapsed = time.monotonic() - float(job["submitted"])
            return _task(job["id"], "Pending", progress=round(elapsed / self.latency, 2))
        if job["unreadable"]:
            error = {"error": f"could not load {job['unreadable'][0]}"}
            return _task(job["id"], "Error", details=error)
        if self.fail(prompt):
            return _task(job["id"], "Error", details={"error": "Internal error"})
        if self.flag(prompt):
            return _task(job["id"], "Content Moderated", details={"Moderation Reasons": ["NSFW"]})
        result = {
            "sample": self._sample(job),
            "prompt": prompt,
            "seed": job["seed"],
            "start_time": job["started"],
            "end_time": job["started"] + self.latency,
            "duration": self.latency,
        }
        return _task(job["id"], "Ready", result=result)

    def _sample(self, job: dict[str, Any]) -> str:
        """The task's signed result URL (the image is made once)."""
        if "sample" not in job:
            width, height = job["size"]
            fmt = job["format"]
            data, mime = self.image(job["prompt"], job["seed"], width, height, fmt)
            token = self.host_file(data, mime).rsplit("/", 1)[-1]
            lasts = DELIVERY_SECONDS if self.expire_after is None else self.expire_after
            expiry = datetime.fromtimestamp(time.time() + lasts, UTC)
            se = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
            query = urlencode({"se": se, "sp": "r", "sig": self._signature(token, se)})
            job["sample"] = f"{self.url}/delivery/{token}/sample.{fmt}?{query}"
        sample: str = job["sample"]
        return sample

    def _signature(self, token: str, se: str) -> str:
        digest = hmac.new(self._delivery_key, f"{token}\n{se}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")

    def _picture(self, value: str) -> Image.Image | None:
        """An input image: base64 (or a data URI), or a URL of a file this fake serves."""
        if value.startswith(("http://", "https://")):
            parts = urlsplit(value).path.split("/")  # /files/{token}, /delivery/{token}/...
            served = len(parts) > 2 and parts[1] in ("files", "delivery")
            stored = self.files.get(parts[2]) if served else None
            data = stored.data if stored is not None else b""
        else:
            try:
                data = base64.b64decode(value.partition(",")[2] or value, validate=True)
            except (binascii.Error, ValueError):
                return None
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
        except (OSError, UnidentifiedImageError):
            return None
        return picture


def _references(inputs: TaskInputs) -> dict[str, str]:
    """The input images a task was given, by field."""
    return {
        name: value
        for name in type(inputs).model_fields
        if name.startswith("input_image") and isinstance(value := getattr(inputs, name), str)
    }


def _size(inputs: TaskInputs, pictures: list[Image.Image]) -> tuple[int, int]:
    width = getattr(inputs, "width", None) or (pictures[0].width if pictures else 1024)
    height = getattr(inputs, "height", None) or (pictures[0].height if pictures else 1024)
    return int(width), int(height)


def _cost(model: str, output_pixels: int, input_pixels: int) -> float:
    if model in PER_IMAGE:
        return PER_IMAGE[model]
    first, further = PER_MEGAPIXEL[model]
    output_mp = max(1, math.ceil(output_pixels / 2**20))
    input_mp = math.ceil(input_pixels / 2**20)
    return round(first + further * (output_mp - 1 + input_mp), 2)


def _task(
    task_id: str,
    status: str,
    *,
    result: Mapping[str, Any] | None = None,
    progress: float | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": task_id,
        "status": status,
        "result": result,
        "progress": progress,
        "details": details,
        "preview": None,
    }


def _invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    """FastAPI's 422: `{"detail": [{type, loc, msg, input, ...}]}`."""
    return JSONResponse(
        {"detail": [{**error, "input": error.get("input")} for error in errors]}, 422
    )
