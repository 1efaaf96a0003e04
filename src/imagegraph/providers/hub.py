"""Everything provider nodes share in one process: adapters and their HTTP clients, the
route each node takes, circuit breakers, retry budgets, admission limits, webhook
wake-ups, result downloads and the prompt policy.

The runtime builds one `ProviderHub` from settings; nodes reach it as `ctx.providers`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from imagegraph.netguard import SafeFetcher
from imagegraph.providers.base import Adapter, ProviderConfig, Route
from imagegraph.providers.resilience import (
    AdaptiveLimiter,
    BreakerConfig,
    CircuitBreaker,
    RetryBudget,
)
from imagegraph.settings import Settings
from imagegraph.transport import AiohttpTransport

# Provider name -> where its adapter lives. Imported on first use.
ADAPTERS: Mapping[str, str] = {
    "fal": "imagegraph.providers.fal:FalAdapter",
    "replicate": "imagegraph.providers.replicate:ReplicateAdapter",
    "bfl": "imagegraph.providers.bfl:BflAdapter",
    "openai": "imagegraph.providers.openai:OpenAIAdapter",
    "stability": "imagegraph.providers.stability:StabilityAdapter",
    "gemini": "imagegraph.providers.gemini:GeminiAdapter",
}
# The variables that configure each provider's key, as people will look for them.
KEY_VARIABLES: Mapping[str, tuple[str, str]] = {
    "fal": ("IMAGEGRAPH_FAL_API_KEY", "FAL_KEY"),
    "replicate": ("IMAGEGRAPH_REPLICATE_API_KEY", "REPLICATE_API_TOKEN"),
    "bfl": ("IMAGEGRAPH_BFL_API_KEY", "BFL_API_KEY"),
    "openai": ("IMAGEGRAPH_OPENAI_API_KEY", "OPENAI_API_KEY"),
    "stability": ("IMAGEGRAPH_STABILITY_API_KEY", "STABILITY_API_KEY"),
    "gemini": ("IMAGEGRAPH_GEMINI_API_KEY", "GEMINI_API_KEY"),
}
MAX_RESULT_BYTES = 64 * 1024 * 1024
# Connections a provider client opens at most at once (well above any concurrency limit:
# the limiter, not the pool, decides how many jobs run).
MAX_CONNECTIONS = 200


class NoRoute(Exception):
    """No route of a model can serve now: none is configured, or every circuit is open."""

    def __init__(self, message: str, retry_in: float | None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_in = retry_in  # None: nothing is configured, waiting will not help


@dataclass(frozen=True)
class Chosen:
    index: int  # position in the catalog's routes (0: the preferred one)
    route: Route
    # Routes passed over, and why ("not configured", "circuit open").
    skipped: tuple[tuple[str, str], ...] = ()


class PromptPolicy:
    """Terms and patterns this server refuses in prompts, checked before any paid call.

    >>> PromptPolicy(["gore"], [r"\\bcelebrity\\b"]).violation("A Gore-y scene")
    "the prompt contains the blocked term 'gore'"
    >>> PromptPolicy([], []).violation("anything") is None
    True
    """

    def __init__(self, terms: Sequence[str], patterns: Sequence[str]) -> None:
        self._terms = [
            (term, re.compile(rf"\b{re.escape(term)}\b", re.IGNORECASE)) for term in terms if term
        ]
        self._patterns = [(pattern, re.compile(pattern, re.IGNORECASE)) for pattern in patterns]

    def violation(self, text: str | None) -> str | None:
        if not text:
            return None
        for term, regex in self._terms:
            if regex.search(text):
                return f"the prompt contains the blocked term {term!r}"
        for pattern, regex in self._patterns:
            if regex.search(text):
                return f"the prompt matches the blocked pattern {pattern!r}"
        return None


class ProviderHub:
    def __init__(
        self,
        settings: Settings,
        *,
        adapters: Mapping[str, str] = ADAPTERS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self._adapter_paths = dict(adapters)
        self._transport = transport
        self._adapters: dict[str, Adapter] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._limiters: dict[str, AdaptiveLimiter] = {}
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}
        self.breaker_config = BreakerConfig(
            failures=settings.breaker_failures,
            ratio=settings.breaker_failure_ratio,
            window_calls=settings.breaker_window_calls,
            window_seconds=settings.breaker_window_seconds,
            open_seconds=settings.breaker_open_seconds,
        )
        self.policy = PromptPolicy(settings.blocked_prompt_terms, settings.blocked_prompt_patterns)
        self._downloads: dict[bool, SafeFetcher] = {}

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        for fetcher in self._downloads.values():
            await fetcher.aclose()
        self._clients.clear()
        self._downloads.clear()
        self._adapters.clear()

    # -- configuration -------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        return sorted(self._adapter_paths)

    def configured(self, provider: str) -> bool:
        return provider in self._adapter_paths and bool(self.settings.provider_key(provider))

    def key_hint(self, provider: str) -> str:
        """How to configure a provider, for messages: 'IMAGEGRAPH_FAL_API_KEY (or FAL_KEY)'."""
        ours, theirs = KEY_VARIABLES.get(provider, (f"IMAGEGRAPH_{provider.upper()}_API_KEY", ""))
        return f"{ours} (or {theirs})" if theirs else ours

    def adapter(self, provider: str) -> Adapter:
        adapter = self._adapters.get(provider)
        if adapter is None:
            module_name, _, class_name = self._adapter_paths[provider].partition(":")
            cls: type[Adapter] = getattr(importlib.import_module(module_name), class_name)
            config = ProviderConfig(
                name=provider,
                api_key=self.settings.provider_key(provider),
                base_url=self.settings.provider_base_url(provider),
                timeout_seconds=self.settings.provider_timeout_seconds,
            )
            adapter = self._make_adapter(cls, config, self._client(provider))
            self._adapters[provider] = adapter
        return adapter

    def _make_adapter(
        self, cls: type[Adapter], config: ProviderConfig, http: httpx.AsyncClient
    ) -> Adapter:
        # Settings only some adapters take (fal's key set, Replicate's webhook secret), and
        # a pool of its own for status streams: held open for a job's whole life, they
        # would otherwise take the connections that submits and results need.
        accepted = inspect.signature(cls.__init__).parameters
        offered: dict[str, object] = {"jwks_url": self.settings.fal_jwks_url}
        if "stream_http" in accepted:
            offered["stream_http"] = self._client(f"{config.name}:streams")
        if self.settings.replicate_webhook_secret is not None:
            secret = self.settings.replicate_webhook_secret.get_secret_value()
            offered["webhook_secret"] = secret
        return cls(config, http, **{k: v for k, v in offered.items() if k in accepted})

    def _client(self, provider: str) -> httpx.AsyncClient:
        client = self._clients.get(provider)
        if client is None:
            timeout = httpx.Timeout(self.settings.provider_timeout_seconds, connect=10.0)
            transport = self._transport or AiohttpTransport(max_connections=MAX_CONNECTIONS)
            client = httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False)
            self._clients[provider] = client
        return client

    def webhook_url(self, provider: str) -> str | None:
        """Where the provider should announce finished jobs (None: poll only)."""
        public = self.settings.public_url
        if not public or not self.adapter(provider).supports_webhook:
            return None
        return f"{public.rstrip('/')}/api/v1/providers/{provider}/webhook"

    # -- routing and resilience ----------------------------------------------------------

    def breaker(self, route: Route) -> CircuitBreaker:
        key = (route.provider, route.model)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(self.breaker_config)
        return breaker

    def budget(self, provider: str) -> RetryBudget:
        budget = self._budgets.get(provider)
        if budget is None:
            budget = self._budgets[provider] = RetryBudget(self.settings.provider_retry_budget)
        return budget

    def limiter(self, provider: str) -> AdaptiveLimiter:
        limiter = self._limiters.get(provider)
        if limiter is None:
            limiter = self._limiters[provider] = AdaptiveLimiter(
                self.settings.provider_concurrency.get(provider, 8),
                self.settings.provider_requests_per_second.get(provider),
            )
        return limiter

    def choose(self, model: str, routes: Sequence[Route]) -> Chosen:
        """The first route that is configured and whose circuit lets a call through."""
        skipped: list[tuple[str, str]] = []
        soonest: float | None = None
        for index, route in enumerate(routes):
            if not self.configured(route.provider):
                skipped.append((route.label, "not configured"))
                continue
            breaker = self.breaker(route)
            if breaker.allows():
                return Chosen(index, route, tuple(skipped))
            skipped.append((route.label, "circuit open"))
            wait = breaker.retry_in()
            soonest = wait if soonest is None else min(soonest, wait)
        if soonest is None:
            raise NoRoute(self.unconfigured_message(model, routes), None)
        failing = ", ".join(label for label, why in skipped if why == "circuit open")
        raise NoRoute(
            f"every configured route of {model} is failing ({failing}); the first may be "
            f"tried again in {max(soonest, 1.0):.0f} s",
            soonest,
        )

    def unconfigured_message(self, model: str, routes: Sequence[Route]) -> str:
        providers = list(dict.fromkeys(route.provider for route in routes))
        keys = " or ".join(self.key_hint(p) for p in providers)
        return f"no provider of {model} is configured: set {keys}"

    # -- webhooks ------------------------------------------------------------------------

    def waiter(self, provider: str, job_id: str) -> asyncio.Event:
        """An event set when the provider's webhook announces the job (this process only)."""
        return self._waiters.setdefault((provider, job_id), asyncio.Event())

    def forget_waiter(self, provider: str, job_id: str) -> None:
        self._waiters.pop((provider, job_id), None)

    def notify(self, provider: str, job_id: str) -> bool:
        """A webhook said the job ended; wake whoever polls it here. False if nobody does."""
        event = self._waiters.get((provider, job_id))
        if event is None:
            return False
        event.set()
        return True

    # -- results -------------------------------------------------------------------------

    async def download(self, provider: str, url: str) -> bytes:
        """The bytes of a result URL, under the outbound rules (a provider configured on a
        private address, such as a test fake, may hand back private URLs)."""
        trusted_private = _is_private_host(self.settings.provider_base_url(provider))
        allow = self.settings.allow_private_urls or trusted_private
        fetcher = self._downloads.get(allow)
        if fetcher is None:
            # Results come from a few hosts (the provider's storage): keep connections to
            # them instead of opening one (TLS included) for every image.
            fetcher = self._downloads[allow] = SafeFetcher(
                allow_private=allow, max_bytes=MAX_RESULT_BYTES, keep_connections=True
            )
        return await fetcher.fetch(url)


def _is_private_host(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not address.is_global
