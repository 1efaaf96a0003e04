"""Black Forest Labs' API (FLUX models).

    POST {base}/v1/{model}    the model input -> {id, polling_url, cost, input_mp, output_mp}
    GET  {polling_url}        -> {id, status, result, progress, details}; status is Pending,
                                 Ready (result.sample: a signed URL, 10 minutes), Request
                                 Moderated, Content Moderated, Error or Task not found

Auth is `x-key: <key>`. The polling URL must be the one returned (often a regional host,
api.us1.bfl.ai for api.bfl.ai). `cost` (credits) comes with the submit answer only, so it
is kept in `Job.state` for the `Result`. There is no cancel, and webhook signing is
unconfirmed, so jobs are always polled.

Models not listed in `MODELS` get prompt, width, height, seed, steps, guidance,
safety_tolerance and output_format.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

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

DEFAULT_BASE_URL = "https://api.bfl.ai"
MODERATED = frozenset({"Request Moderated", "Content Moderated"})
MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class BflModel:
    """What one model takes: our `Request` field -> its input field, and the values."""

    fields: Mapping[str, str]
    tolerance: tuple[int, int] = (0, 6)  # the safety_tolerance range it takes


_FLUX_2 = {
    "prompt": "prompt",
    "size": "size",
    "seed": "seed",
    "output_format": "output_format",
    "safety_tolerance": "safety_tolerance",
    "image": "input_image",
}
MODELS: Mapping[str, BflModel] = {
    "flux-pro-1.1": BflModel(
        {
            "prompt": "prompt",
            "size": "size",
            "seed": "seed",
            "output_format": "output_format",
            "safety_tolerance": "safety_tolerance",
        }
    ),
    "flux-dev": BflModel(
        {
            "prompt": "prompt",
            "size": "size",
            "seed": "seed",
            "steps": "steps",
            "guidance": "guidance",
            "output_format": "output_format",
            "safety_tolerance": "safety_tolerance",
        }
    ),
    "flux-2-pro": BflModel(_FLUX_2, tolerance=(0, 5)),
    "flux-2-max": BflModel(_FLUX_2, tolerance=(0, 5)),
    "flux-2-flex": BflModel(
        {**_FLUX_2, "steps": "steps", "guidance": "guidance"}, tolerance=(0, 5)
    ),
}
GENERIC = BflModel(
    {
        "prompt": "prompt",
        "size": "size",
        "seed": "seed",
        "steps": "steps",
        "guidance": "guidance",
        "output_format": "output_format",
        "safety_tolerance": "safety_tolerance",
    }
)


class BflAdapter(Adapter):
    """Black Forest Labs' API: submit, then poll the returned `polling_url`.

    adapter = BflAdapter(ProviderConfig("bfl", key, DEFAULT_BASE_URL), http)
    """

    name: ClassVar[str] = "bfl"
    supports_cancel: ClassVar[bool] = False
    # BFL can call a `webhook_url`, but how it signs the call is unconfirmed (only its
    # agent guide mentions an X-BFL-Signature HMAC), so we never ask it to: we poll.
    supports_webhook: ClassVar[bool] = False

    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Job | Result:
        # `webhook_url` is not sent (see `supports_webhook`); the runner polls instead.
        body = self.input(route, request)
        response = await self._send("POST", self.url(f"/v1/{route.model}"), body=body)
        if response.is_error:
            raise self.error(response)
        answer = self._object(response)
        task_id = answer.get("id")
        polling_url = answer.get("polling_url")
        if not isinstance(task_id, str) or not task_id:
            raise self._malformed(response, "no id")
        if not isinstance(polling_url, str) or urlsplit(polling_url).scheme not in (
            "http",
            "https",
        ):
            raise self._malformed(response, "no polling_url")
        state = {
            key: answer[key]
            for key in ("cost", "input_mp", "output_mp")
            if isinstance(answer.get(key), int | float) and not isinstance(answer[key], bool)
        }
        return Job(
            provider=self.name,
            model=route.model,
            id=task_id,
            urls={"polling": polling_url},
            state=state,
        )

    async def poll(self, job: Job) -> Pending | Result:
        url = job.urls.get("polling")
        if not url:
            raise ProviderError(self.name, "bad_request", f"job {job.id} has no polling URL")
        response = await self._send("GET", url)
        body: Any = None
        if response.status_code == 404:
            body = _json_or_none(response)
        if response.is_error and not (isinstance(body, dict) and "status" in body):
            raise self.error(response)
        answer = self._object(response)
        status = answer.get("status")
        if status == "Pending":
            return Pending("Pending", _progress(answer.get("progress")))
        if status == "Ready":
            return self._result(job, response, answer)
        if status in MODERATED:
            raise ProviderError(
                self.name,
                "content_blocked",
                f"{status}{_reasons(answer.get('details'))}",
                provider_code=str(status),
                request_id=job.id,
            )
        if status == "Error":
            raise ProviderError(
                self.name,
                "failed",
                f"Error{_reasons(answer.get('details'))}",
                provider_code="Error",
                request_id=job.id,
            )
        if status == "Task not found":
            raise ProviderError(
                self.name, "not_found", f"task {job.id} not found", request_id=job.id
            )
        raise self._malformed(response, f"unknown status {status!r}")

    def trusted(self, url: str) -> bool:
        """The configured host, or any host under its registrable domain: BFL answers
        polling URLs on regional hosts (api.us1.bfl.ai, api.eu.bfl.ai for api.bfl.ai) that
        need the key too. Never over http when the base URL is https. The "registrable
        domain" is the last two labels, right for bfl.ai and bfl.ml (not for the likes of
        co.uk, which BFL does not use)."""
        base, target = urlsplit(self.config.base_url), urlsplit(url)
        if base.scheme == "https" and target.scheme != "https":
            return False
        if super().trusted(url):
            return True
        domain = _registrable_domain(base.hostname)
        host = target.hostname
        return bool(domain and host and (host == domain or host.endswith(f".{domain}")))

    def error(self, response: httpx.Response, message: str | None = None) -> ProviderError:
        """The `ProviderError` for an HTTP error status; a 422 names the fields BFL
        refused ("width: Input should be a multiple of 32")."""
        return super().error(response, message or _refused_fields(response))

    # -- our request in BFL's terms ------------------------------------------------------

    def input(self, route: Route, request: Request) -> dict[str, Any]:
        """The JSON body BFL's `route.model` takes for `request`; raises `bad_request`
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
            mode = route.options.get("size", "width_height")
            if mode != "width_height":
                raise _bad_request(f"the bfl adapter cannot send a size as {mode!r}")
            size = {"width": request.width, "height": request.height}
            sent.update({key: value for key, value in size.items() if value is not None})
        take("seed", request.seed)
        take("steps", request.steps)
        take("guidance", request.guidance)
        if request.num_images != 1:
            raise _unsupported("num_images", route.model)  # one image per task
        take("output_format", request.output_format)
        if request.safety_tolerance is not None:
            take("safety_tolerance", request.safety_tolerance)
            low, high = model.tolerance
            if not low <= request.safety_tolerance <= high:
                raise _bad_request(
                    f"safety_tolerance {request.safety_tolerance} is out of range for "
                    f"{route.model} ({low} to {high})"
                )
        # BFL takes input images as raw base64 (or a URL), not as data URIs.
        take("image", request.image.data_uri().partition(",")[2] if request.image else None)
        take("mask", request.mask.data_uri().partition(",")[2] if request.mask else None)
        take("scale", request.scale)
        fixed = route.options.get("fixed") or {}
        return {**fixed, **sent, **request.extra}

    # -- BFL's answers in our terms ------------------------------------------------------

    def _result(self, job: Job, response: httpx.Response, answer: Mapping[str, Any]) -> Result:
        result = answer.get("result")
        if not isinstance(result, dict):
            result = {}
        sample = result.get("sample")
        if not isinstance(sample, str) or urlsplit(sample).scheme not in ("http", "https"):
            raise self._malformed(response, "a Ready task without result.sample")
        seed = result.get("seed")
        fmt = urlsplit(sample).path.rpartition(".")[2].lower()
        cost = job.state.get("cost")
        details = {
            key: value
            for key, value in {
                "duration": result.get("duration"),
                "input_mp": job.state.get("input_mp"),
                "output_mp": job.state.get("output_mp"),
            }.items()
            if isinstance(value, int | float)
        }
        return Result(
            images=[Image(url=sample, mime_type=MIME.get(fmt))],
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            request_id=job.id,
            cost=float(cost) if isinstance(cost, int | float) else None,
            cost_unit="credits" if isinstance(cost, int | float) else None,
            details=details,
        )

    # -- HTTP ----------------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, body: Any = None) -> httpx.Response:
        """One exchange, its failures as `ProviderError`s; the key goes only to `trusted`
        hosts."""
        headers = {}
        if self.config.api_key and self.trusted(url):
            headers["x-key"] = self.config.api_key
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

    def _object(self, response: httpx.Response) -> dict[str, Any]:
        body = self.json(response)
        if not isinstance(body, dict):
            raise self._malformed(response, "not a JSON object")
        return body

    def _malformed(self, response: httpx.Response, what: str) -> ProviderError:
        return ProviderError(
            self.name,
            "malformed",
            f"answer to {response.request.method} {response.request.url.path}: {what}",
            status=response.status_code,
        )


def _registrable_domain(host: str | None) -> str | None:
    """bfl.ai for api.bfl.ai; None for an IP address or a single label."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        return ".".join(labels[-2:]) if len(labels) >= 2 else None
    return None


def _progress(value: Any) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return max(0.0, min(1.0, value / 100 if value > 1 else float(value)))


def _reasons(details: Any) -> str:
    """ ": <what `details` says>" when it says anything (moderation reasons, the error)."""
    if isinstance(details, dict) and details:
        return ": " + "; ".join(f"{key}: {value}" for key, value in details.items())[:300]
    if isinstance(details, str) and details:
        return f": {details[:300]}"
    return ""


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _refused_fields(response: httpx.Response) -> str | None:
    """What a FastAPI `detail` list says, each message after its field; None for any other
    body."""
    body = _json_or_none(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, list):
        return None
    messages = []
    for entry in detail:
        if not isinstance(entry, dict) or not isinstance(entry.get("msg"), str):
            continue
        loc = entry.get("loc")
        names = [str(part) for part in loc if part != "body"] if isinstance(loc, list) else []
        messages.append(f"{'.'.join(names)}: {entry['msg']}" if names else entry["msg"])
    return "; ".join(messages)[:300] or None


def _unsupported(param: str, model: str) -> ProviderError:
    return _bad_request(f"{model} does not take {param}")


def _bad_request(message: str) -> ProviderError:
    return ProviderError("bfl", "bad_request", message)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"
