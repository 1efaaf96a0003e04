"""A fake of Stability AI's v2beta Stable Image API.

    with StabilityFake(content_filtered=True) as stability:
        ...                                     # point StabilityAdapter at stability.url

Endpoints (fault names in brackets): `POST /v2beta/stable-image/generate/{core,ultra}`
["generate"], `.../upscale/fast` and `.../upscale/creative` ["upscale"],
`.../edit/remove-background` ["remove_background"], and `GET /v2beta/results/{id}`
["result"]. Requests must be multipart/form-data (a JSON or urlencoded body is a 400, as at
Stability); fields are checked as the API checks them (aspect ratios, seed range, formats,
image sizes). Images come back as bytes (`accept: image/*`) or base64 JSON (`accept:
application/json`), with `finish-reason`, `seed` and `x-request-id` headers. A prompt
`moderate` flags gets 403 `content_moderation`, or with `content_filtered` a 200 with a
blurred image and `finish-reason: CONTENT_FILTERED` (charged, as Stability charges it).
Creative upscale answers `{"id"}`; its result is 202 `in-progress` until `latency` has
passed, then the image. Unknown fields are ignored (the API ignores the `none` field of
its own samples) but kept in `received` with everything else each request sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from typing import Any

from PIL import Image, ImageFilter, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph.testing.fakes.server import MIME, FakeProvider

# The output size of each aspect ratio (about a megapixel, as Stability makes them).
SIZES = {
    "21:9": (1536, 640),
    "16:9": (1344, 768),
    "3:2": (1216, 832),
    "5:4": (1152, 896),
    "1:1": (1024, 1024),
    "4:5": (896, 1152),
    "2:3": (832, 1216),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
STYLE_PRESETS = frozenset(
    {
        "3d-model",
        "analog-film",
        "anime",
        "cinematic",
        "comic-book",
        "digital-art",
        "enhance",
        "fantasy-art",
        "isometric",
        "line-art",
        "low-poly",
        "modeling-compound",
        "neon-punk",
        "origami",
        "photographic",
        "pixel-art",
        "tile-texture",
    }
)
MAX_SEED = 4294967294
UPSCALE_FACTOR = 4  # fast upscale is x4; the fake makes creative upscales x4 too


class StabilityError(Exception):
    """An error the fake answers (raised inside the handlers)."""

    def __init__(self, status: int, name: str, *errors: str) -> None:
        super().__init__(name)
        self.status = status
        self.name = name
        self.errors = list(errors)


class StabilityFake(FakeProvider):
    """Stability's Stable Image API on 127.0.0.1 (see the module docstring)."""

    name = "stability"

    def __init__(self, *, content_filtered: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Moderated prompts get a blurred 200 (CONTENT_FILTERED) instead of a 403.
        self.content_filtered = content_filtered

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v2beta/stable-image/generate/{model}", self._generate, methods=["POST"]),
            Route("/v2beta/stable-image/upscale/{mode}", self._upscale, methods=["POST"]),
            Route(
                "/v2beta/stable-image/edit/remove-background",
                self._remove_background,
                methods=["POST"],
            ),
            Route("/v2beta/results/{id}", self._result, methods=["GET"]),
        ]

    # -- endpoints -----------------------------------------------------------------------

    async def _generate(self, request: Request) -> Response:
        fault = await self.inject("generate")
        if fault is not None:
            return fault
        try:
            model = request.path_params["model"]
            if model not in ("core", "ultra"):
                raise StabilityError(404, "not_found", f"no such endpoint: generate/{model}")
            fields, files = await self._read(request, "generate")
            prompt = _prompt(fields, required=True)
            _text(fields, "negative_prompt")
            ratio = fields.get("aspect_ratio", "1:1")
            if ratio not in SIZES:
                raise StabilityError(
                    400, "bad_request", f"aspect_ratio: must be one of {', '.join(SIZES)}"
                )
            seed = _seed(fields)
            fmt = _format(fields, ("png", "jpeg", "webp"))
            style = fields.get("style_preset")
            if style is not None and style not in STYLE_PRESETS:
                raise StabilityError(400, "bad_request", "style_preset: unknown preset")
            width, height = SIZES[ratio]
            if "image" in files:
                if model != "ultra":
                    raise StabilityError(400, "bad_request", "image: not taken by this model")
                width, height = _image(files["image"])
                if "strength" not in fields:
                    raise StabilityError(
                        400, "bad_request", "strength: required when an image is given"
                    )
            return await self._answer(request, prompt, seed, width, height, fmt)
        except StabilityError as error:
            return self._error(error)

    async def _upscale(self, request: Request) -> Response:
        fault = await self.inject("upscale")
        if fault is not None:
            return fault
        try:
            mode = request.path_params["mode"]
            if mode not in ("fast", "creative"):
                raise StabilityError(404, "not_found", f"no such endpoint: upscale/{mode}")
            fields, files = await self._read(request, "upscale")
            if "image" not in files:
                raise StabilityError(400, "bad_request", "image: required")
            width, height = _image(files["image"])
            fmt = _format(fields, ("png", "jpeg", "webp"))
            if mode == "creative":
                return self._submit_creative(fields, width, height, fmt)
            if min(width, height) < 32 or max(width, height) > 1536:
                raise StabilityError(
                    400, "bad_request", "image: sides must be between 32 and 1536 pixels"
                )
            if not 1024 <= width * height <= 1048576:
                raise StabilityError(
                    400, "bad_request", "image: must have 1,024 to 1,048,576 pixels"
                )
            seed = secrets.randbelow(MAX_SEED)
            return await self._answer(
                request, "upscale", seed, width * UPSCALE_FACTOR, height * UPSCALE_FACTOR, fmt
            )
        except StabilityError as error:
            return self._error(error)

    def _submit_creative(
        self, fields: dict[str, str], width: int, height: int, fmt: str
    ) -> Response:
        """Accept a creative upscale: its result is ready `latency` seconds from now."""
        prompt = _prompt(fields, required=True)
        _text(fields, "negative_prompt")
        seed = _seed(fields)
        if min(width, height) < 64 or width * height > 1048576:
            raise StabilityError(400, "bad_request", "image: must be 64x64 to 1 megapixel")
        if self.moderate(prompt):
            raise _moderated()
        job_id = secrets.token_hex(32)
        with self._lock:
            self.jobs[job_id] = {
                "submitted": time.monotonic(),
                "prompt": prompt,
                "seed": seed,
                "size": (width * UPSCALE_FACTOR, height * UPSCALE_FACTOR),
                "format": fmt,
            }
        self.count_accepted()
        return JSONResponse({"id": job_id})

    async def _remove_background(self, request: Request) -> Response:
        fault = await self.inject("remove_background")
        if fault is not None:
            return fault
        try:
            fields, files = await self._read(request, "remove_background")
            if "image" not in files:
                raise StabilityError(400, "bad_request", "image: required")
            width, height = _image(files["image"])
            if not 4096 <= width * height <= 4194304:
                raise StabilityError(
                    400, "bad_request", "image: must have 4,096 to 4,194,304 pixels"
                )
            fmt = _format(fields, ("png", "webp"))
            return await self._answer(
                request, "cutout", secrets.randbelow(MAX_SEED), width, height, fmt, alpha=True
            )
        except StabilityError as error:
            return self._error(error)

    async def _result(self, request: Request) -> Response:
        fault = await self.inject("result")
        if fault is not None:
            return fault
        if not self.authorized(request, "authorization", "Bearer "):
            return self._error(_unauthorized())
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            return self._error(
                StabilityError(404, "not_found", "generation not found (or it expired)")
            )
        if not self.done(job):
            return JSONResponse({"id": request.path_params["id"], "status": "in-progress"}, 202)
        width, height = job["size"]
        picture, mime_type = await asyncio.to_thread(
            self.image, job["prompt"], job["seed"], width, height, job["format"]
        )
        return self._image_response(request, picture, mime_type, job["seed"], "SUCCESS")

    # -- the answer ----------------------------------------------------------------------

    async def _answer(
        self,
        request: Request,
        prompt: str,
        seed: int,
        width: int,
        height: int,
        fmt: str,
        *,
        alpha: bool = False,
    ) -> Response:
        await asyncio.sleep(self.latency)
        finish = "SUCCESS"
        if self.moderate(prompt):
            if not self.content_filtered:
                raise _moderated()
            finish = "CONTENT_FILTERED"
        picture, mime_type = await asyncio.to_thread(
            self._picture, prompt, seed, width, height, fmt, finish != "SUCCESS", alpha
        )
        self.count_accepted()
        return self._image_response(request, picture, mime_type, seed, finish)

    def _picture(
        self,
        prompt: str,
        seed: int,
        width: int,
        height: int,
        fmt: str,
        blurred: bool,
        alpha: bool,
    ) -> tuple[bytes, str]:
        data, mime_type = self.image(prompt, seed, width, height, fmt)
        if not (blurred or alpha):
            return data, mime_type
        with Image.open(io.BytesIO(data)) as opened:
            picture = opened.convert("RGBA" if alpha else "RGB")
        if blurred:
            picture = picture.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 20))
        if alpha:  # a cut-out: the border is transparent
            mask = Image.new("L", picture.size, 0)
            mask.paste(255, (width // 8, height // 8, width - width // 8, height - height // 8))
            picture.putalpha(mask)
        buffer = io.BytesIO()
        picture.save(buffer, {"webp": "WEBP", "jpeg": "JPEG"}.get(fmt, "PNG"))
        return buffer.getvalue(), MIME.get(fmt, "image/png")

    def _image_response(
        self, request: Request, picture: bytes, mime_type: str, seed: int, finish: str
    ) -> Response:
        headers = {"finish-reason": finish, "seed": str(seed), "x-request-id": self.new_id()}
        if request.headers.get("accept", "image/*").startswith("application/json"):
            body = {
                "image": base64.b64encode(picture).decode(),
                "seed": seed,
                "finish_reason": finish,
            }
            return JSONResponse(
                body, headers=headers, media_type=f"application/json; type={mime_type}"
            )
        return Response(picture, headers=headers, media_type=mime_type)

    # -- request reading and errors ------------------------------------------------------

    async def _read(
        self, request: Request, endpoint: str
    ) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
        """Check auth, the content type and `accept`; the form's fields and files."""
        if not self.authorized(request, "authorization", "Bearer "):
            raise _unauthorized()
        accept = request.headers.get("accept", "image/*")
        if not accept.startswith(("image/", "application/json", "*/*")):
            raise StabilityError(400, "bad_request", "accept: must be image/* or application/json")
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise StabilityError(400, "bad_request", "content-type: must be multipart/form-data")
        async with request.form() as form:
            fields, files = await _split(form)
        self.received.append(
            {
                "endpoint": endpoint,
                "path": request.url.path,
                "headers": dict(request.headers),
                "fields": dict(fields),
                "files": {key: [value] for key, value in files.items()},
            }
        )
        return fields, files

    def _error(self, error: StabilityError) -> Response:
        body = {"id": self.new_id(), "name": error.name, "errors": error.errors}
        return JSONResponse(body, error.status)


def _unauthorized() -> StabilityError:
    return StabilityError(401, "unauthorized", "authorization: invalid or missing header value")


def _moderated() -> StabilityError:
    return StabilityError(
        403,
        "content_moderation",
        "Your request was flagged by our content moderation system, as a result your request "
        "was denied and you were not charged.",
    )


async def _split(form: FormData) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[key] = (value.content_type or "", await value.read())
        else:
            fields[key] = value
    return fields, files


def _prompt(fields: dict[str, str], *, required: bool) -> str:
    prompt = fields.get("prompt", "")
    if required and not prompt:
        raise StabilityError(400, "bad_request", "prompt: cannot be empty")
    if len(prompt) > 10000:
        raise StabilityError(400, "bad_request", "prompt: at most 10000 characters")
    return prompt


def _text(fields: dict[str, str], key: str) -> None:
    if len(fields.get(key, "")) > 10000:
        raise StabilityError(400, "bad_request", f"{key}: at most 10000 characters")


def _seed(fields: dict[str, str]) -> int:
    """The seed asked for; a random one for none or 0, as at Stability."""
    text = fields.get("seed", "0")
    if not text.isdigit() or int(text) > MAX_SEED:
        raise StabilityError(400, "bad_request", f"seed: must be an integer 0 to {MAX_SEED}")
    return int(text) or secrets.randbelow(MAX_SEED) + 1


def _format(fields: dict[str, str], choices: tuple[str, ...]) -> str:
    fmt = fields.get("output_format", "png")
    if fmt not in choices:
        raise StabilityError(
            400, "bad_request", f"output_format: must be one of {', '.join(choices)}"
        )
    return fmt


def _image(file: tuple[str, bytes]) -> tuple[int, int]:
    """The size of an uploaded image (png, jpeg or webp)."""
    try:
        with Image.open(io.BytesIO(file[1])) as picture:
            if picture.format not in ("PNG", "JPEG", "WEBP"):
                raise StabilityError(400, "bad_request", "image: must be png, jpeg or webp")
            return picture.size
    except (UnidentifiedImageError, OSError):
        raise StabilityError(400, "bad_request", "image: not a valid image") from None
