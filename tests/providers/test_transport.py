"""`ShardedTransport`, and result downloads that keep their connections, against a real
local HTTP server that says which connection served each request (by the client's port)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph import netguard
from imagegraph.netguard import SafeFetcher
from imagegraph.providers.transport import ShardedTransport
from imagegraph.testing.fakes.server import FakeProvider


class PortEcho(FakeProvider):
    """GET /port answers the client's port, after `delay` seconds."""

    name = "port-echo"
    delay = 0.0

    def routes(self) -> list[BaseRoute]:
        return [Route("/port", self._answer)]

    async def _answer(self, request: Request) -> Response:
        await asyncio.sleep(self.delay)
        assert request.client is not None
        answer = JSONResponse({"port": request.client.port, "cookies": dict(request.cookies)})
        answer.set_cookie("visited", "yes")
        return answer


@pytest.fixture
def server() -> Iterator[PortEcho]:
    with PortEcho() as echo:
        yield echo


@pytest.fixture
async def transport() -> AsyncIterator[ShardedTransport]:
    sharded = ShardedTransport(4, max_connections=80, max_keepalive=40)
    yield sharded
    await sharded.aclose()


async def test_requests_one_after_another_reuse_one_connection(
    server: PortEcho, transport: ShardedTransport
) -> None:
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        ports = {(await client.get("/port")).json()["port"] for _ in range(6)}
        assert len(ports) == 1
        assert transport.busy == [0, 0, 0, 0]


async def test_concurrent_requests_fill_a_pool_before_the_next(
    server: PortEcho, transport: ShardedTransport
) -> None:
    server.delay = 0.3
    assert transport.room == 10
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        requests = [asyncio.create_task(client.get("/port")) for _ in range(25)]
        for _ in range(200):
            if sum(transport.busy) == 25:
                break
            await asyncio.sleep(0.01)
        assert transport.busy == [10, 10, 5, 0]
        answers = await asyncio.gather(*requests)
    assert len({a.json()["port"] for a in answers}) == 25  # each its own connection
    assert transport.busy == [0, 0, 0, 0]


async def test_beyond_every_pool_s_room_the_least_busy_pool_takes_the_request(
    server: PortEcho,
) -> None:
    server.delay = 0.3
    transport = ShardedTransport(2, max_connections=8, max_keepalive=4)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        requests = [asyncio.create_task(client.get("/port")) for _ in range(7)]
        for _ in range(200):
            if sum(transport.busy) == 7:
                break
            await asyncio.sleep(0.01)
        assert sorted(transport.busy) == [3, 4]
        await asyncio.gather(*requests)
    assert transport.busy == [0, 0]


async def test_a_streamed_body_holds_its_place_until_it_is_closed(
    server: PortEcho, transport: ShardedTransport
) -> None:
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        async with client.stream("GET", "/port") as response:
            assert transport.busy == [1, 0, 0, 0]
            await response.aread()
        assert transport.busy == [0, 0, 0, 0]


async def test_a_failed_request_holds_no_place(transport: ShardedTransport) -> None:
    with PortEcho() as gone:
        url = gone.url
    async with httpx.AsyncClient(transport=transport, base_url=url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/port")
    assert transport.busy == [0, 0, 0, 0]


def test_a_transport_needs_a_pool() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ShardedTransport(0, max_connections=10, max_keepalive=10)


# -- result downloads (SafeFetcher with keep_connections) ----------------------------------


async def _everything_is_local(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


def _fetcher(keep: bool) -> SafeFetcher:
    return SafeFetcher(
        allow_private=True,
        max_bytes=1 << 20,
        keep_connections=keep,
        resolver=_everything_is_local,
    )


async def _answer(fetcher: SafeFetcher, url: str) -> dict[str, object]:
    answer: dict[str, object] = json.loads(await fetcher.fetch(url))
    return answer


async def test_kept_connections_serve_the_next_downloads_from_the_same_host(
    server: PortEcho,
) -> None:
    fetcher = _fetcher(keep=True)
    url = f"http://a.example:{server.url.rsplit(':', 1)[1]}/port"
    try:
        answers = [await _answer(fetcher, url) for _ in range(4)]
    finally:
        await fetcher.aclose()
    assert len({a["port"] for a in answers}) == 1
    assert all(a["cookies"] == {} for a in answers)  # the cookie it set is never sent back


async def test_without_keeping_every_download_has_a_connection_of_its_own(
    server: PortEcho,
) -> None:
    fetcher = _fetcher(keep=False)
    url = f"{server.url}/port"
    ports = {(await _answer(fetcher, url))["port"] for _ in range(3)}
    assert len(ports) == 3


async def test_names_on_the_same_address_never_share_a_connection(
    server: PortEcho, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netguard, "KEPT_CLIENTS", 2)
    port = server.url.rsplit(":", 1)[1]
    fetcher = _fetcher(keep=True)
    try:
        first = [(await _answer(fetcher, f"http://{n}.example:{port}/port"))["port"] for n in "ab"]
        again = (await _answer(fetcher, f"http://a.example:{port}/port"))["port"]
        assert len(set(first)) == 2
        assert again == first[0]
        # A third name: only two clients are kept, so the least recently used one (b) goes.
        await _answer(fetcher, f"http://c.example:{port}/port")
        b_again = (await _answer(fetcher, f"http://b.example:{port}/port"))["port"]
        assert b_again != first[1]
    finally:
        await fetcher.aclose()
