"""When to send a call again, and how long to wait first; how `wait()` spaces its polls.

Pure decisions, no I/O: the clients do the sending and the sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import httpx

from imagegraph.client._calls import Call
from imagegraph.netguard import parse_retry_after

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Failures before the request reached the server: sending again cannot do anything twice.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Failures after it may have: the server may have acted on it.
_LOST = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

WAIT_FIRST = 1.0
WAIT_FACTOR = 1.5
WAIT_CAP = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one call: on connection failures and 429/502/503/504, honouring
    `Retry-After`, else exponential backoff with full jitter.

    Only calls that are harmless to repeat are retried after the server may have acted:
    GET and DELETE, and POSTs that carry an `Idempotency-Key`. A 429 is retried for any
    call (the server refuses those before doing anything), and so is a 409 with
    `Retry-After`, which the server sends while a twin with the same key is in flight.
    A `Retry-After` longer than `max_retry_after` is not waited out: the error is raised.
    """

    max_retries: int = 3
    base: float = 0.5
    cap: float = 8.0
    max_retry_after: float = 60.0

    def backoff(self, retry: int) -> float:
        """Full jitter: anywhere between 0 and base * 2^retry, capped."""
        return random.uniform(0.0, min(self.cap, self.base * 2**retry))

    def after_error(self, call: Call[Any], error: httpx.TransportError, retry: int) -> float | None:
        """Seconds to wait before retry number `retry` + 1, or None to give up."""
        if retry >= self.max_retries:
            return None
        if isinstance(error, _NOT_SENT) or (call.repeatable and isinstance(error, _LOST)):
            return self.backoff(retry)
        return None

    def after_response(self, call: Call[Any], response: httpx.Response, retry: int) -> float | None:
        """Seconds to wait before retry number `retry` + 1, or None to raise the error."""
        if retry >= self.max_retries:
            return None
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 409:
            if call.idempotency_key is None or retry_after is None:
                return None
        elif status not in RETRY_STATUSES or (status != 429 and not call.repeatable):
            return None
        if retry_after is None:
            return self.backoff(retry)
        return retry_after if retry_after <= self.max_retry_after else None


def next_wait_delay(delay: float | None) -> float:
    """The pause between polls of `wait()` after `delay`: 1 s, then x1.5 up to 10 s."""
    return WAIT_FIRST if delay is None else min(delay * WAIT_FACTOR, WAIT_CAP)
