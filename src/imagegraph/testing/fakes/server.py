"""The common part of the provider fakes: a real HTTP server in a thread, fault injection,
counters of paid jobs, and images to hand back.

Each fake (`FalFake`, `ReplicateFake`, ...) is a Starlette app that speaks one provider's
protocol: the same paths, status values, URL shapes, error bodies and headers. Tests and
benchmarks point the adapters (or the provider's official SDK) at `fake.url`.

    with FalFake(latency=1.0) as fal:
        fal.faults.add("submit", Fault(status=429, headers={"Retry-After": "7"}))
        ...                                  # run executions against fal.url
        assert fal.accepted == 1             # jobs the provider would have charged for

Faults are queued per endpoint ("submit", "status", "result", "download", "cancel", or
"*") and each is used `times` times: an HTTP error with a body and headers, a slow answer
(`delay`), no answer at all until the client gives up (`hang`), or a malformed body.
`faults.add_random` answers a share of an endpoint's requests with faults instead, drawn
from a seeded generator. Moderation and expired result URLs are switches of their own
(`moderate`, `expire_after`).

Every accepted job's id is kept in `accepted_ids`, with when it was accepted and when the
client took its outcome (`job_taken`); `peak_in_flight()` is the most jobs the fake had in
flight at once, as a provider's concurrency limit counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import random
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph.drawing import render

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class Fault:
    """What one request gets instead of the normal answer."""

    status: int | None = None  # an error status (with `body` and `headers`)
    body: Any = None  # JSON-serializable, or bytes sent as they are
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # answer normally (or with `status`), this many seconds late
    hang: bool = False  # never answer (until the server stops)
    malformed: bool = False  # a 200 whose body is not what the protocol says
    times: int = 1


@dataclass
class _RandomFaults:
    probability: float
    faults: tuple[Fault, ...]
    rng: random.Random


class FaultPlan:
    """Faults waiting for the next requests to each endpoint (thread-safe).

    >>> plan = FaultPlan()
    >>> plan.add_random("submit", 0.5, [Fault(status=429), Fault(status=503)], seed=1)
    >>> taken = [plan.take("submit") for _ in range(1000)]
    >>> 400 < sum(f is not None for f in taken) < 600, plan.take("status") is None
    (True, True)
    >>> sorted(plan.injected) == [("submit", 429), ("submit", 503)]
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, list[Fault]] = {}
        self._random: dict[str, list[_RandomFaults]] = {}
        # (endpoint, status) of every fault handed out, queued or random (None: no status).
        self.injected: Counter[tuple[str, int | None]] = Counter()

    def add(self, endpoint: str, fault: Fault) -> None:
        with self._lock:
            self._queued.setdefault(endpoint, []).append(fault)

    def add_random(
        self,
        endpoint: str,
        probability: float,
        faults: Fault | Sequence[Fault],
        *,
        seed: int | None = None,
    ) -> None:
        """From now until `clear()`, answer each request to `endpoint` (or "*": every
        endpoint) with probability `probability` by one of `faults`, picked at random
        (their `times` is ignored). Queued faults come first. With a `seed`, the same
        sequence of requests gets the same faults."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability {probability} is not between 0 and 1")
        choices = (faults,) if isinstance(faults, Fault) else tuple(faults)
        if not choices:
            raise ValueError("add_random needs at least one fault")
        rule = _RandomFaults(probability, choices, random.Random(seed))
        with self._lock:
            self._random.setdefault(endpoint, []).append(rule)

    def clear(self) -> None:
        with self._lock:
            self._queued.clear()
            self._random.clear()

    def take(self, endpoint: str) -> Fault | None:
        with self._lock:
            fault = self._take(endpoint)
            if fault is not None:
                self.injected[(endpoint, fault.status)] += 1
            return fault

    def _take(self, endpoint: str) -> Fault | None:
        for key in (endpoint, "*"):
            queue = self._queued.get(key)
            if queue:
                fault = queue[0]
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
                return fault
        for key in (endpoint, "*"):
            for rule in self._random.get(key, ()):
                if rule.rng.random() < rule.probability:
                    return rule.rng.choice(rule.faults)
        return None


@dataclass
class StoredFile:
    data: bytes
    mime_type: str
    created: float


class FakeProvider:
    """A provider fake running on 127.0.0.1 in a thread. Subclasses add `routes()`."""

    name = "fake"

    def __init__(
        self,
        *,
        latency: float = 0.0,
        moderate: Callable[[str], bool] | None = None,
        expire_after: float | None = None,
        api_key: str = "test-key",
        port: int = 0,
    ) -> None:
        self.latency = latency  # seconds from submission to a finished job
        # Prompts this returns True for are refused the way the provider refuses them.
        self.moderate = moderate or (lambda prompt: "forbidden" in prompt.lower())
        self.expire_after = expire_after  # seconds a result URL keeps serving its image
        self.api_key = api_key
        self.faults = FaultPlan()
        self.requests: Counter[str] = Counter()  # requests per endpoint
        self.arrivals: dict[str, list[float]] = {}  # time.monotonic() of each, per endpoint
        self.accepted = 0  # jobs accepted: what the provider would charge for
        self.accepted_ids: list[str] = []  # their ids, when the fake says (count_accepted)
        # time.monotonic() each of those was accepted, and its outcome taken (job_taken).
        self.accepted_at: dict[str, float] = {}
        self.taken_at: dict[str, float] = {}
        self.cancelled = 0
        self.received: list[dict[str, Any]] = []  # requests as read, by fakes that keep them
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._port = port
        self._server: uvicorn.Server | None = None
        self.stopping = False  # set by stop(): held requests and streams let go
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> Self:
        if not self._port:
            self._port = _free_port()
        app = Starlette(routes=[*self.routes(), Route("/files/{token}", self._file)])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self._port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.stopping = False
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"fake-{self.name}")
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the {self.name} fake did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop answering (jobs and files are kept: `start()` again resumes them, on the
        same port, as a provider back from an outage)."""
        if self._server is None:
            return
        self.stopping = True
        self._server.should_exit = True
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None

    def reset(self) -> Self:
        """As new for the next test: no faults, no latency, no expiry, counters at zero
        (jobs and hosted files are kept)."""
        with self._lock:
            self.faults.clear()
            self.latency = 0.0
            self.expire_after = None
            self.requests.clear()
            self.arrivals.clear()
            self.accepted = self.cancelled = 0
            self.accepted_ids.clear()
            self.accepted_at.clear()
            self.taken_at.clear()
            self.received.clear()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    # -- for subclasses ------------------------------------------------------------------

    def authorized(self, request: Request, header: str, prefix: str = "") -> bool:
        return request.headers.get(header, "") == f"{prefix}{self.api_key}"

    async def inject(self, endpoint: str) -> Response | None:
        """Count the request; apply the next fault queued for `endpoint`, if any: returns
        the response to send instead of the normal one (None: answer normally)."""
        with self._lock:
            self.requests[endpoint] += 1
            self.arrivals.setdefault(endpoint, []).append(time.monotonic())
        fault = self.faults.take(endpoint)
        if fault is None:
            return None
        if fault.hang:
            # No answer until the server stops (set from another thread), then a dropped one.
            while not self.stopping:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            return Response(b"", 502)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.malformed:
            return Response(b"<html>502 bad gateway</html>", 200, media_type="text/html")
        if fault.status is not None:
            if isinstance(fault.body, bytes):
                return Response(fault.body, fault.status, headers=dict(fault.headers))
            return JSONResponse(fault.body, fault.status, headers=dict(fault.headers))
        return None

    def new_id(self) -> str:
        return secrets.token_hex(12)

    def count_accepted(self, job_id: str | None = None) -> None:
        """One more paid job (its id, if given, is remembered with the time)."""
        with self._lock:
            self.accepted += 1
            if job_id is not None:
                self.accepted_ids.append(job_id)
                self.accepted_at[job_id] = time.monotonic()

    def job_taken(self, job_id: str) -> None:
        """The client took the job's outcome (read its finished result, or cancelled it):
        from the provider's side the job is over. The first time counts."""
        with self._lock:
            self.taken_at.setdefault(job_id, time.monotonic())

    def peak_in_flight(self, since: float = -math.inf) -> int:
        """The most jobs in flight at once among those accepted at or after `since`
        (time.monotonic()): each from its acceptance until its outcome was taken, or, if
        nobody took it, until it finished (`latency` later)."""
        with self._lock:
            events = []
            for job_id, start in self.accepted_at.items():
                if start < since:
                    continue
                end = self.taken_at.get(job_id, start + self.latency)
                events += [(start, 1), (end, -1)]
        peak = current = 0
        for _, change in sorted(events):  # at a tie an end (-1) sorts before a start
            current += change
            peak = max(peak, current)
        return peak

    def done(self, job: Mapping[str, Any]) -> bool:
        """Whether a job submitted at `job["submitted"]` has finished by now."""
        return time.monotonic() - float(job["submitted"]) >= self.latency

    def image(
        self, prompt: str, seed: int, width: int, height: int, fmt: str = "png"
    ) -> tuple[bytes, str]:
        """A deterministic picture of the prompt (the sandbox's) as `fmt` bytes."""
        picture = render(prompt, "", seed, width, height, 8, 7.5)
        buffer = io.BytesIO()
        pil_format = {"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG")
        picture.save(buffer, pil_format)
        return buffer.getvalue(), MIME.get(fmt, "image/png")

    def host_file(self, data: bytes, mime_type: str) -> str:
        """Serve bytes at a URL of this fake (until `expire_after` passes)."""
        token = secrets.token_urlsafe(12)
        with self._lock:
            self.files[token] = StoredFile(data, mime_type, time.monotonic())
        return f"{self.url}/files/{token}"

    async def _file(self, request: Request) -> Response:
        fault = await self.inject("download")
        if fault is not None:
            return fault
        stored = self.files.get(request.path_params["token"])
        if stored is None or (
            self.expire_after is not None and time.monotonic() - stored.created > self.expire_after
        ):
            return Response(b"<Error><Code>AccessDenied</Code></Error>", 403)
        return Response(stored.data, media_type=stored.mime_type)


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
