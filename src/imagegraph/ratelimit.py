"""Rate limits per workspace plan, per public trigger, and for callers without a valid key.

Counters use the `limits` library's sliding-window counter (O(1) memory per partition, no
burst of twice the quota at a window boundary as a fixed window allows). They live in
memory for one process, or in Redis when `IMAGEGRAPH_RATE_LIMIT_STORAGE=redis://…` so that
several API processes enforce one quota.

Every limited response says where the caller stands, in the IETF draft's structured fields
(draft-ietf-httpapi-ratelimit-headers-10) and in the GitHub-style headers clients already
understand:

    RateLimit-Policy: "requests";q=10;w=60
    RateLimit: "requests";r=7;t=41
    X-RateLimit-Limit: 10, X-RateLimit-Remaining: 7, X-RateLimit-Used: 3,
    X-RateLimit-Reset: <epoch seconds>, X-RateLimit-Resource: requests

When a request counts against several policies (creating an execution counts against
`starts` and `daily` too), all are listed and the X- headers describe the tightest one.
Over a limit: 429 with `Retry-After` and a problem body naming the violated policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from imagegraph.errors import InvalidInput, RateLimited
from imagegraph.plans import Plan

STATE_KEY = "ratelimit"
# Callers presenting no valid key share this budget per client address.
UNAUTHENTICATED_PER_MINUTE = 60


@dataclass(frozen=True)
class Policy:
    name: str
    item: RateLimitItem

    @property
    def quota(self) -> int:
        return int(self.item.amount)

    @property
    def window(self) -> int:
        return int(self.item.get_expiry())


@dataclass(frozen=True)
class Standing:
    """Where a partition stands against one policy after a request."""

    policy: Policy
    remaining: int
    reset_at: float  # epoch seconds

    def reset_in(self, now: float) -> int:
        return max(0, math.ceil(self.reset_at - now))


def storage_uri(configured: str) -> str:
    """`memory://` or `redis://…` as the asyncio storage the limits library wants."""
    return configured if configured.startswith("async+") else f"async+{configured}"


class RateLimiter:
    def __init__(self, storage: str = "memory://") -> None:
        uri = storage_uri(storage)
        options: dict[str, Any] = {}
        self._pool: Any = None
        if "redis" in uri.split("://", 1)[0]:
            try:
                import redis.asyncio
            except ImportError:
                raise InvalidInput(
                    f"IMAGEGRAPH_RATE_LIMIT_STORAGE={storage} needs the redis client: "
                    "pip install 'imagegraph[redis]'"
                ) from None
            # Our own pool, so that closing the limiter closes its connections.
            self._pool = redis.asyncio.ConnectionPool.from_url(storage)
            options = {"implementation": "redispy", "connection_pool": self._pool}
        made = storage_from_string(uri, **options)
        assert isinstance(made, Storage)
        self.storage = made
        self._strategy = SlidingWindowCounterRateLimiter(self.storage)
        self._policies: dict[tuple[str, int], Policy] = {}

    def _policy(
        self, name: str, per_minute: int | None = None, per_day: int | None = None
    ) -> Policy:
        amount, seconds = (per_minute, 60) if per_minute is not None else (per_day, 86400)
        assert amount is not None
        key = (name, amount)
        policy = self._policies.get(key)
        if policy is None:
            item = (
                RateLimitItemPerMinute(amount, namespace=name)
                if seconds == 60
                else RateLimitItemPerDay(amount, namespace=name)
            )
            policy = self._policies[key] = Policy(name, item)
        return policy

    async def count_request(
        self, state: MutableMapping[str, Any], workspace: str, plan: Plan
    ) -> None:
        """Any authenticated request."""
        policies = []
        if plan.requests_per_minute is not None:
            policies.append(self._policy("requests", per_minute=plan.requests_per_minute))
        await self._hit(state, f"ws:{workspace}", policies)

    async def count_execution(
        self, state: MutableMapping[str, Any], workspace: str, plan: Plan
    ) -> None:
        """A new execution (not an idempotent replay)."""
        policies = []
        if plan.execution_starts_per_minute is not None:
            policies.append(self._policy("starts", per_minute=plan.execution_starts_per_minute))
        if plan.executions_per_day is not None:
            policies.append(self._policy("daily", per_day=plan.executions_per_day))
        await self._hit(state, f"ws:{workspace}", policies)

    async def count_trigger(
        self, state: MutableMapping[str, Any], trigger_id: str, per_minute: int
    ) -> None:
        await self._hit(state, f"trigger:{trigger_id}", [self._policy("trigger", per_minute)])

    async def count_unauthenticated(self, state: MutableMapping[str, Any], client: str) -> None:
        await self._hit(
            state, f"anon:{client}", [self._policy("unauthenticated", UNAUTHENTICATED_PER_MINUTE)]
        )

    async def _hit(
        self, state: MutableMapping[str, Any], partition: str, policies: Iterable[Policy]
    ) -> None:
        standings: list[Standing] = state.setdefault(STATE_KEY, [])
        for policy in policies:
            allowed = await self._strategy.hit(policy.item, partition)
            stats = await self._strategy.get_window_stats(policy.item, partition)
            standing = Standing(policy, stats.remaining, stats.reset_time)
            standings.append(standing)
            if not allowed:
                now = time.time()
                retry_after = max(1, standing.reset_in(now))
                raise RateLimited(
                    f"rate limit {policy.name!r} exceeded: {policy.quota} per "
                    f"{_window_text(policy.window)}; retry in {retry_after} s",
                    retry_after,
                    violatedPolicies=[policy.name],
                    limit=policy.quota,
                    windowSeconds=policy.window,
                )

    async def reset(self) -> None:
        await self.storage.reset()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()


def _window_text(seconds: int) -> str:
    return {60: "minute", 86400: "day"}.get(seconds, f"{seconds} s")


def headers(state: MutableMapping[str, Any], now: float | None = None) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers for what this request counted against (none if nothing)."""
    standings: list[Standing] = state.get(STATE_KEY) or []
    if not standings:
        return []
    now = time.time() if now is None else now
    # One entry per policy: the last standing seen (a request counts once per policy).
    latest = {s.policy.name: s for s in standings}
    policy_field = ", ".join(
        f'"{s.policy.name}";q={s.policy.quota};w={s.policy.window}' for s in latest.values()
    )
    limit_field = ", ".join(
        f'"{s.policy.name}";r={s.remaining};t={s.reset_in(now)}' for s in latest.values()
    )
    tightest = min(latest.values(), key=lambda s: (s.remaining, -s.reset_at))
    return [
        (b"ratelimit-policy", policy_field.encode()),
        (b"ratelimit", limit_field.encode()),
        (b"x-ratelimit-limit", str(tightest.policy.quota).encode()),
        (b"x-ratelimit-remaining", str(tightest.remaining).encode()),
        (b"x-ratelimit-used", str(tightest.policy.quota - tightest.remaining).encode()),
        (b"x-ratelimit-reset", str(math.ceil(tightest.reset_at)).encode()),
        (b"x-ratelimit-resource", tightest.policy.name.encode()),
    ]
