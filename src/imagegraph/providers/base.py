"""The provider adapter interface: what a node asks of a model, and what comes back.

An adapter translates between our terms and one provider's HTTP protocol, and nothing else:
no retries, no rate limiting, no polling loop, no storage. Those are the runner's
(`providers.runner`), the same for every provider, so one policy applies everywhere.

    adapter = FalAdapter(config, http)            # one per provider, shared by every node
    started = await adapter.start(route, request, webhook_url=None)
    if isinstance(started, Job):                  # an asynchronous provider accepted a job
        save(started.to_json())                   # the runner persists it at once
        outcome = await adapter.poll(started)     # Pending until done, then a Result
    else:
        outcome = started                         # a synchronous provider answered

Adapters raise `ProviderError` (with a `kind` the runner acts on) for every failure, and
map a parameter the model does not take to `ProviderError(kind="bad_request")` naming it,
never silently dropping it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx

from imagegraph.netguard import parse_retry_after

ErrorKind = Literal[
    "content_blocked",  # the provider refused the prompt or the image (moderation)
    "rate_limited",  # 429: wait `retry_after`, then try again
    "unavailable",  # 5xx, connection refused: try again later
    "timeout",  # no answer in time
    "bad_request",  # 400/422: the request is wrong; another try would fail the same way
    "unauthorized",  # 401/403: the key is missing, wrong or lacks access
    "payment_required",  # 402: the provider account is out of credit
    "malformed",  # the answer does not parse as the protocol says
    "not_found",  # the job is unknown (expired, or never existed)
    "result_expired",  # the result's URL no longer serves the image
    "failed",  # the provider says the job failed, for no reason we can classify
    "cancelled",  # the job was cancelled
]
RETRYABLE: frozenset[ErrorKind] = frozenset({"rate_limited", "unavailable", "timeout", "malformed"})


class ProviderError(Exception):
    """A provider call failed. `kind` decides what the runner does next."""

    def __init__(
        self,
        provider: str,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        provider_code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.kind: ErrorKind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.provider_code = provider_code
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


@dataclass(frozen=True)
class SourceImage:
    """An image sent to a provider (the image to edit, upscale or cut out; a mask)."""

    data: bytes
    mime_type: str
    width: int
    height: int

    def data_uri(self) -> str:
        import base64

        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode()}"


@dataclass(frozen=True)
class Request:
    """What a node asks of a model, in our terms. None means "the model's default"."""

    prompt: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    num_images: int = 1
    output_format: Literal["png", "jpeg", "webp"] | None = None
    # 0 (strictest) to 6 (most permissive), the scale BFL and fal use; adapters of
    # providers with other scales map it onto theirs.
    safety_tolerance: int | None = None
    image: SourceImage | None = None
    mask: SourceImage | None = None
    scale: int | None = None  # upscale factor
    # Model-specific fields from the catalog route, sent as they are.
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """One way to serve a catalog model: a provider and its model id."""

    provider: str
    model: str  # the provider's id: "fal-ai/flux-2-pro", "flux-2-pro", "gpt-image-1.5"
    version: str | None = None  # recorded on every asset it makes
    # Hints for the adapter from the catalog: how the model takes its size
    # ("size": "image_size" | "aspect_ratio" | "width_height" | "openai_size"), which
    # endpoint family ("operation": "generate" | "edit" | "upscale" | "remove_background").
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.model}"


@dataclass(frozen=True)
class Job:
    """A job an asynchronous provider accepted. Persisted (as `to_json()`) the moment it is
    accepted, so that a node resumed after a crash polls it instead of paying again."""

    provider: str
    model: str
    id: str
    # URLs the provider returned for this job (status, result, cancel, polling): use these,
    # never build them, as the protocols ask.
    urls: Mapping[str, str] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    # Anything else the adapter needs to poll it (small, JSON-serializable).
    state: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "id": self.id,
            "urls": dict(self.urls),
            "submittedAt": self.submitted_at,
            "state": dict(self.state),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        return cls(
            provider=str(data["provider"]),
            model=str(data["model"]),
            id=str(data["id"]),
            urls=dict(data.get("urls") or {}),
            submitted_at=float(data.get("submittedAt") or 0.0),
            state=dict(data.get("state") or {}),
        )


@dataclass(frozen=True)
class Image:
    """One image of a result: its bytes, or a URL to download them from (soon: provider URLs
    expire within minutes)."""

    data: bytes | None = None
    url: str | None = None
    mime_type: str | None = None


@dataclass(frozen=True)
class Result:
    images: Sequence[Image]
    seed: int | None = None  # the seed the provider actually used, when it says
    request_id: str | None = None  # the provider's id of the request or job
    model_version: str | None = None
    cost: float | None = None  # what the provider says it charged, in `cost_unit`
    cost_unit: str | None = None
    # Small facts worth keeping (timings, usage, finish reason); JSON-serializable.
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pending:
    status: str  # the provider's word for it: IN_QUEUE, processing, Pending
    progress: float | None = None


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    api_key: str | None
    base_url: str
    timeout_seconds: float = 120.0


class Adapter(ABC):
    """One provider's protocol. Instances are shared by every node run; they hold no state
    per job (that is in `Job`)."""

    name: ClassVar[str]
    supports_cancel: ClassVar[bool] = False
    # Whether `start` can ask the provider to call us back when the job ends.
    supports_webhook: ClassVar[bool] = False
    # Whether `watch` holds a connection open until the job changes (else it is `poll`).
    watches: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http

    @abstractmethod
    async def start(
        self, route: Route, request: Request, *, webhook_url: str | None = None
    ) -> Job | Result:
        """Submit the request: a `Job` from an asynchronous provider, the `Result` from a
        synchronous one."""

    async def poll(self, job: Job) -> Pending | Result:
        """Where a job stands; its `Result` once done. Raises `ProviderError` if it failed."""
        raise ProviderError(self.name, "bad_request", "this provider answers synchronously")

    async def watch(self, job: Job, seconds: float) -> Pending | Result:
        """Like `poll`, but may wait up to `seconds` for the job to end, on a connection the
        provider holds open (a status stream), so the end is seen the moment it comes."""
        return await self.poll(job)

    async def cancel(self, job: Job) -> None:  # noqa: B027 (most providers cannot cancel)
        """Ask the provider to stop a job (best effort; providers without cancel do
        nothing)."""

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> str:
        """Check the signature of a completion webhook the provider sent us; returns the
        id of the job it is about. Raises `ProviderError(kind="unauthorized")` if the
        signature does not verify (or is too old). Header names are lower-case."""
        raise ProviderError(self.name, "bad_request", "this provider sends no webhooks")

    # -- helpers for adapters ------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.config.base_url.rstrip('/')}/{path.lstrip('/')}"

    def trusted(self, url: str) -> bool:
        """Whether `url` is on the configured host, so it may be sent our API key. A URL a
        response names on any other host gets no credentials."""
        return urlsplit(url).netloc == urlsplit(self.config.base_url).netloc

    def error(self, response: httpx.Response, message: str | None = None) -> ProviderError:
        """The `ProviderError` for an HTTP error status (adapters refine moderation first)."""
        return error_for_status(self.name, response, message)

    def json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ProviderError(
                self.name,
                "malformed",
                f"answer to {response.request.method} {response.request.url.path} is not "
                f"JSON (HTTP {response.status_code}, {len(response.content)} bytes)",
                status=response.status_code,
            ) from None


def retry_after_of(response: httpx.Response) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After`."""
    millis = response.headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    return parse_retry_after(response.headers.get("retry-after"))


def error_for_status(
    provider: str, response: httpx.Response, message: str | None = None
) -> ProviderError:
    status = response.status_code
    detail = message or _detail(response) or f"HTTP {status}"
    request_id = response.headers.get("x-request-id") or response.headers.get("x-fal-request-id")
    kind: ErrorKind
    if status in (401, 403):
        kind = "unauthorized"
    elif status == 402:
        kind = "payment_required"
    elif status in (408, 504):
        kind = "timeout"
    elif status == 429:
        kind = "rate_limited"
    elif status >= 500:
        kind = "unavailable"
    elif status == 404:
        kind = "not_found"
    else:
        kind = "bad_request"
    return ProviderError(
        provider,
        kind,
        detail,
        status=status,
        retry_after=retry_after_of(response),
        request_id=request_id,
    )


def _detail(response: httpx.Response) -> str | None:
    """The human part of a provider's error body, whatever its shape."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] or None
    if isinstance(body, dict):
        for key in ("detail", "message", "error", "errors", "title"):
            value = body.get(key)
            if isinstance(value, str):
                return value[:300]
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])[:300]
            if isinstance(value, list) and value:
                first = value[0]
                if isinstance(first, dict) and isinstance(first.get("msg"), str):
                    return str(first["msg"])[:300]
                if isinstance(first, str):
                    return first[:300]
    return None
