"""The HTTP transport of provider clients: several small connection pools.

httpcore's pool walks every connection it holds each time a request starts or ends, and
asks each idle one whether the server closed it (two system calls); an idle connection is
also compared with all the others. A busy provider keeps about as many connections as its
concurrency limit, so with one pool that walk becomes most of what a request costs, and
it grows when the event loop falls behind (more connections sit idle, waiting to be
reused), which makes the loop fall further behind. Pools of a few connections each keep
the walk short whatever the load.

A request goes to the first pool with room, so light traffic stays on one pool and keeps
reusing its connections (a new TLS connection costs a round trip or two); heavy traffic
spreads over the others.

    transport = ShardedTransport(shards=8, max_connections=200, max_keepalive=50)
    client = httpx.AsyncClient(transport=transport, timeout=...)
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import httpx

from imagegraph.netguard import tls_context


class ShardedTransport(httpx.AsyncBaseTransport):
    """`shards` pools sharing `max_connections` and `max_keepalive` between them."""

    def __init__(self, shards: int, *, max_connections: int, max_keepalive: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        self.room = math.ceil(max_keepalive / shards)  # requests a pool takes before the next
        limits = httpx.Limits(
            max_connections=math.ceil(max_connections / shards),
            max_keepalive_connections=self.room,
        )
        # One TLS context for all of them: loading the CA bundle costs about 20 ms of CPU.
        self._pools = [
            httpx.AsyncHTTPTransport(verify=tls_context(), limits=limits, trust_env=False)
            for _ in range(shards)
        ]
        self.busy = [0] * shards  # requests in flight per pool, until their body is closed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = self._pick()
        self.busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self.busy[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, lambda: self._release(index))
        return response

    def _pick(self) -> int:
        for index, busy in enumerate(self.busy):
            if busy < self.room:
                return index
        return min(range(len(self.busy)), key=self.busy.__getitem__)

    def _release(self, index: int) -> None:
        self.busy[index] -= 1

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that calls `release` once, when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
