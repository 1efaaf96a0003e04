"""Outbound webhooks, signed per Standard Webhooks and delivered from the outbox.

A delivery row is written in the transaction that ends an execution. The dispatcher claims
due rows under a lease (so a dispatcher killed mid-delivery loses nothing: the lease runs
out and the row is sent again, with the same `webhook-id`), POSTs them and records the
outcome:

- 2xx: delivered.
- 410 Gone: the endpoint asked to be forgotten; it is disabled and its queue failed.
- anything else (3xx included: redirects are never followed), a timeout or a refused
  connection: retried after `IMAGEGRAPH_WEBHOOK_RETRY_SECONDS` (5 s, 5 min, 30 min, 2 h,
  5 h, 10 h, 10 h by default), each wait jittered by ±20 % so failing receivers are not hit
  in lockstep; a `Retry-After` on 429/503 is honoured when it asks for longer.
- after the last retry: failed; it can be replayed through the API.

Each attempt gets a fresh `webhook-timestamp` and signature; `webhook-id` stays the same, so
receivers de-duplicate on it. URLs must pass the same outbound rules as image fetches
(public addresses only, unless `IMAGEGRAPH_ALLOW_PRIVATE_WEBHOOKS=true`), checked when an
endpoint is registered and again, with the address pinned, on every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

import httpx
from standardwebhooks.webhooks import Webhook

from imagegraph import __version__
from imagegraph.errors import ImagegraphError, InvalidInput, Issue
from imagegraph.netguard import (
    Resolver,
    SafeFetcher,
    parse_retry_after,
    pinned_request,
)
from imagegraph.settings import Settings
from imagegraph.store import webhooks as store
from imagegraph.store.db import Database
from imagegraph.transport import tls_context

log = logging.getLogger("imagegraph.webhooks")

EventType = Literal[
    "execution.completed",
    "execution.failed",
    "execution.cancelled",
    "batch.completed",
    "batch.cancelled",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
JITTER = 0.2
# The shortest time between two looks for due deliveries.
WAKE_PAUSE_SECONDS = 0.1
CLAIM_BATCH = 20
# Longest a receiver's Retry-After can push a retry out.
MAX_RETRY_AFTER = 24 * 3600.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def sign(secret: str, message_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, timestamp, body),
    }


def retry_delay(schedule: Sequence[float], attempt: int, retry_after: float | None) -> float | None:
    """Seconds before the attempt after `attempt` (1-based), or None when none is left."""
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


class Webhooks:
    """The dispatcher of one process (any number may run against one database)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self._guard = SafeFetcher(
            allow_private=settings.allow_private_webhooks,
            max_bytes=64 * 1024,
            total_timeout=settings.webhook_timeout_seconds,
            max_redirects=0,
            transport=transport,
            resolver=resolver,
            private_setting="IMAGEGRAPH_ALLOW_PRIVATE_WEBHOOKS",
        )
        self._transport = transport
        self._timeout = httpx.Timeout(settings.webhook_timeout_seconds, connect=5.0)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def check_url(self, url: str, *, field: str = "url") -> None:
        """Refuse a URL that deliveries could not be sent to (422 naming `field`)."""
        try:
            await self._guard.check(url)
        except ImagegraphError as exc:
            raise InvalidInput(
                f"{field}: {exc.message}", [Issue(exc.code, exc.message, field=field)]
            ) from None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="imagegraph-webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)

    def wake(self) -> None:
        """Deliveries may be due now (an execution ended in this process)."""
        self._wake.set()

    async def _loop(self) -> None:
        lease = self.settings.webhook_timeout_seconds + 30
        while True:
            self._wake.clear()
            due: list[store.Delivery] = []
            try:
                # Most wakes (an execution ended) find nothing to send: ask with a read
                # before claiming with a write.
                if await self.db.run(store.anything_due, self.db, utcnow()):
                    due = await self.db.run(store.claim_due, self.db, utcnow(), CLAIM_BATCH, lease)
            except Exception:
                log.exception("claiming webhook deliveries failed; retrying shortly")
            for delivery in due:
                task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.id}")
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            if len(due) == CLAIM_BATCH:
                continue
            # Executions that end together wake this once: deliveries wait a moment at
            # most, and a busy server asks once per pause instead of once per end.
            await asyncio.sleep(WAKE_PAUSE_SECONDS)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_seconds):
                    await self._wake.wait()

    async def _deliver(self, delivery: store.Delivery) -> None:
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        if not delivery.endpoint_enabled:
            await self._record(delivery, None, "endpoint is disabled", 0.0, final=True)
            return
        try:
            response = await self._post(delivery)
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
                if 300 <= status < 400:
                    error += " (redirects are not followed)"
                if status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except ImagegraphError as exc:
            error = exc.message
        except httpx.TimeoutException:
            error = f"no answer within {self.settings.webhook_timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            log.exception("webhook delivery %s failed unexpectedly", delivery.id)
            error = f"internal error: {type(exc).__name__}"
        duration = (time.perf_counter() - started) * 1000
        if status == 410:
            await self._record(
                delivery,
                status,
                error,
                duration,
                final=True,
                disable="the endpoint answered 410 Gone",
            )
            return
        await self._record(delivery, status, error, duration, retry_after=retry_after)

    async def _post(self, delivery: store.Delivery) -> httpx.Response:
        target = await self._guard.check(delivery.url)
        body = json.dumps(delivery.payload, separators=(",", ":"), default=str)
        headers = {
            **sign(delivery.secret, delivery.id, utcnow(), body),
            "Content-Type": "application/json",
            "User-Agent": f"imagegraph-webhooks/{__version__}",
        }
        request = pinned_request(target, "POST", headers, body.encode())
        async with httpx.AsyncClient(
            timeout=self._timeout,
            verify=tls_context(),
            transport=self._transport,
            follow_redirects=False,
            trust_env=False,
        ) as client:
            response = await client.send(request, stream=True)
            try:
                # Read a little of the answer (for keep-alive hygiene), never all of it.
                async for _ in response.aiter_bytes(4096):
                    break
            finally:
                await response.aclose()
            return response

    async def _record(
        self,
        delivery: store.Delivery,
        status: int | None,
        error: str | None,
        duration_ms: float,
        *,
        final: bool = False,
        retry_after: float | None = None,
        disable: str | None = None,
    ) -> None:
        now = utcnow()
        next_at = None
        delivered = status is not None and 200 <= status < 300
        if not delivered and not final:
            delay = retry_delay(self.settings.webhook_retry_seconds, delivery.attempts, retry_after)
            next_at = now + timedelta(seconds=delay) if delay is not None else None
        try:
            moved = await self.db.run(
                store.record_attempt,
                self.db,
                delivery,
                now=now,
                status_code=status,
                error=error,
                duration_ms=duration_ms,
                next_attempt_at=next_at,
                disable_endpoint=disable,
            )
        except Exception:
            log.exception("recording webhook delivery %s failed", delivery.id)
            return  # its lease runs out and it is sent again
        if not moved:
            log.info("webhook delivery %s was taken over by another sender", delivery.id)
        elif not delivered:
            log.info(
                "webhook delivery %s attempt %d failed: %s",
                delivery.id,
                delivery.attempts,
                error,
            )
