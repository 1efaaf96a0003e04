"""Keeping going when providers fail: circuit breakers, retry budgets, and an adaptive
limit on each provider's jobs in flight.

- `CircuitBreaker` (one per provider and model): opens after `failures` failures in a row,
  or when at least `ratio` of the last calls within `window_seconds` failed (once there are
  `window_calls` of them); stays open `open_seconds`, then lets one call through (half
  open): its success closes the circuit, its failure opens it again. While a route's
  circuit is open, nodes go to the catalog's next route. A 429 is not a failure here (the
  provider is up, just busy).
- `RetryBudget` (one per provider): a token bucket that gains `ratio` per first attempt and
  loses 1 per retry, so retries stay within that share of traffic. An outage then fails
  nodes fast instead of multiplying the load on a provider that is down.
- `AdaptiveLimiter` (one per provider credential): at most `limit` jobs in flight and
  `per_second` submissions; a 429 pauses every submission to that provider for its
  Retry-After and halves the limit, which then grows back by one for every `limit` jobs
  that succeed (additive increase, multiplicative decrease).

All in memory, for the processes of one server; every clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

Clock = Callable[[], float]
State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5
    ratio: float = 0.5
    window_calls: int = 20
    window_seconds: float = 30.0
    open_seconds: float = 30.0


class CircuitBreaker:
    """
    >>> now = [0.0]
    >>> breaker = CircuitBreaker(BreakerConfig(failures=2, open_seconds=10), clock=lambda: now[0])
    >>> breaker.failure(); breaker.failure(); breaker.state
    'open'
    >>> breaker.allows(), breaker.retry_in()
    (False, 10.0)
    >>> now[0] = 10.0; breaker.allows(), breaker.state   # one probe
    (True, 'half_open')
    >>> breaker.allows()                                  # while the probe is out
    False
    >>> breaker.success(); breaker.state
    'closed'
    """

    def __init__(self, config: BreakerConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._state: State = "closed"
        self._consecutive = 0
        self._calls: deque[tuple[float, bool]] = deque()
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        return self._state

    def allows(self) -> bool:
        """Whether a call may go through now (an open circuit lets one probe through once
        `open_seconds` have passed)."""
        if self._state == "closed":
            return True
        if self._state == "open" and self._clock() - self._opened_at >= self.config.open_seconds:
            self._state = "half_open"
            self._probing = False
        if self._state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self.config.open_seconds - (self._clock() - self._opened_at))

    def success(self) -> None:
        self._record(True)
        self._consecutive = 0
        if self._state != "closed":
            self._state = "closed"
            self._calls.clear()
        self._probing = False

    def failure(self) -> None:
        self._record(False)
        self._consecutive += 1
        if self._state == "half_open" or self._tripped():
            self._state = "open"
            self._opened_at = self._clock()
        self._probing = False

    def _record(self, ok: bool) -> None:
        now = self._clock()
        self._calls.append((now, ok))
        horizon = now - self.config.window_seconds
        while self._calls and (
            self._calls[0][0] < horizon or len(self._calls) > self.config.window_calls
        ):
            self._calls.popleft()

    def _tripped(self) -> bool:
        if self._consecutive >= self.config.failures:
            return True
        if len(self._calls) < self.config.window_calls:
            return False
        failed = sum(1 for _, ok in self._calls if not ok)
        return failed / len(self._calls) >= self.config.ratio


class RetryBudget:
    """
    >>> budget = RetryBudget(ratio=0.1, initial=1.0)
    >>> budget.allow_retry(), budget.allow_retry()
    (True, False)
    >>> for _ in range(10): budget.first_attempt()
    >>> budget.allow_retry()
    True
    """

    def __init__(self, ratio: float = 0.1, initial: float = 10.0, cap: float = 10.0) -> None:
        self.ratio = ratio
        self.cap = cap
        self._tokens = min(initial, cap)

    @property
    def tokens(self) -> float:
        return self._tokens

    def first_attempt(self) -> None:
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def allow_retry(self) -> bool:
        """Spend a token for a retry; False (and nothing spent) when the budget is empty."""
        if self._tokens < 1.0 - 1e-9:
            return False
        self._tokens -= 1.0
        return True


class AdaptiveLimiter:
    """Admission to one provider: `async with limiter.slot(): ...` around a job's lifetime.

    A 429 pauses every submission for its Retry-After and halves the limit, once per
    pause: the other 429s of the same burst were sent before the provider could see the
    first one. Each job that goes through adds one back, up to the configured limit.

    >>> async def demo():
    ...     limiter = AdaptiveLimiter(limit=8)
    ...     async with limiter.slot():
    ...         limiter.throttled(retry_after=None)   # a 429: halve, pause
    ...         limiter.throttled(retry_after=None)   # the same burst: no second halving
    ...     halved = limiter.limit
    ...     limiter.succeeded()
    ...     return halved, limiter.limit
    >>> asyncio.run(demo())
    (4, 5)
    """

    def __init__(
        self,
        limit: int,
        per_second: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.max_limit = max(1, limit)
        self._limit = float(self.max_limit)
        self.per_second = per_second
        self._clock = clock
        self._sleep = sleep
        self.in_flight = 0
        self.paused_until = 0.0
        self._next_start = 0.0
        self._changed = asyncio.Condition()
        self._halved_until = 0.0  # 429s before this belong to the burst already answered
        self.throttles = 0  # 429s seen

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            await self.release()

    async def acquire(self) -> None:
        async with self._changed:
            while True:
                now = self._clock()
                wait = max(self.paused_until - now, 0.0)
                if wait == 0.0 and self.in_flight < self.limit:
                    break
                if wait > 0.0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._changed.wait()
                else:
                    await self._changed.wait()
            self.in_flight += 1
        await self.pace()

    async def pace(self) -> None:
        """Wait for the next submission slot of the request rate (and any pause)."""
        while True:
            now = self._clock()
            start = max(now, self._next_start, self.paused_until)
            if self.per_second:
                self._next_start = start + 1.0 / self.per_second
            if start <= now:
                return
            await self._sleep(start - now)
            if self._clock() >= self.paused_until:
                return

    async def release(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            # Wake as many waiters as there are free slots (the limit may have grown), not
            # every one of them: hundreds of nodes can be waiting.
            self._changed.notify(max(1, self.limit - self.in_flight))

    def throttled(self, retry_after: float | None) -> float:
        """The provider answered 429: pause submissions and halve the limit. Returns how
        long submissions pause."""
        self.throttles += 1
        pause = retry_after if retry_after is not None else 1.0
        now = self._clock()
        self.paused_until = max(self.paused_until, now + pause)
        if now >= self._halved_until:
            self._limit = max(1.0, self._limit / 2)
            self._halved_until = now + max(pause, 1.0)
        return pause

    def succeeded(self) -> None:
        """A job went through: grow the limit back by one, up to its maximum."""
        self._limit = min(float(self.max_limit), self._limit + 1.0)
