"""`AiohttpTransport` (the transport of provider clients and downloads), and result
downloads that keep their connections, against real local HTTP servers: one that says
which connection served each request (by the client's port), and bare sockets that answer
badly."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imagegraph import netguard
from imagegraph.netguard import SafeFetcher
from imagegraph.testing.fakes.server import FakeProvider
from imagegraph.transport import AiohttpTransport


class PortEcho(FakeProvider):
    """GET /port answers the client's port, after `delay` seconds; POST /echo answers what
    it was sent; GET /gzip answers a gzip-encoded body."""

    name = "port-echo"
    delay = 0.0

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/port", self._answer),
            Route("/echo", self._echo, methods=["POST"]),
            Route("/gzip", self._gzip),
        ]

    async def _answer(self, request: Request) -> Response:
        await asyncio.sleep(self.delay)
        assert request.client is not None
        answer = JSONResponse({"port": request.client.port, "cookies": dict(request.cookies)})
        answer.set_cookie("visited", "yes")
        return answer

    async def _echo(self, request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {
                "host": request.headers.get("host"),
                "type": request.headers.get("content-type"),
                "length": request.headers.get("content-length"),
                "body": body.decode("latin-1"),
                "query": str(request.query_params),
            }
        )

    async def _gzip(self, request: Request) -> Response:
        return Response(gzip.compress(b"x" * 10_000), headers={"Content-Encoding": "gzip"})


@pytest.fixture
def server() -> Iterator[PortEcho]:
    with PortEcho() as echo:
        yield echo


@pytest.fixture
async def client(server: PortEcho) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=AiohttpTransport(max_connections=3), base_url=server.url, timeout=5
    ) as http:
        yield http


async def test_requests_one_after_another_reuse_one_connection(
    client: httpx.AsyncClient,
) -> None:
    ports = {(await client.get("/port")).json()["port"] for _ in range(6)}
    assert len(ports) == 1


async def test_concurrent_requests_open_at_most_max_connections(
    server: PortEcho, client: httpx.AsyncClient
) -> None:
    server.delay = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    answers = await asyncio.gather(*(client.get("/port") for _ in range(6)))
    assert len({a.json()["port"] for a in answers}) == 3
    assert loop.time() - started >= 0.4  # two rounds of three


async def test_no_cookie_is_kept_or_sent_back(client: httpx.AsyncClient) -> None:
    first = await client.get("/port")
    assert first.headers["set-cookie"].startswith("visited=yes")
    client.cookies.clear()  # httpx's own jar; the transport must keep none either
    again = await client.get("/port")
    assert again.json()["cookies"] == {}


async def test_bodies_headers_and_query_arrive_as_sent(client: httpx.AsyncClient) -> None:
    posted = (await client.post("/echo", json={"prompt": "a fox"}, params={"q": "a b"})).json()
    assert json.loads(posted["body"]) == {"prompt": "a fox"}
    assert posted["type"] == "application/json"
    assert posted["query"] == "q=a+b"
    # A streamed multipart body (how image edits are uploaded) is sent whole.
    files = {"image": ("in.png", b"\x89PNG" + bytes(range(256)) * 40, "image/png")}
    uploaded = (await client.post("/echo", files=files, data={"prompt": "x"})).json()
    assert uploaded["type"].startswith("multipart/form-data; boundary=")
    assert int(uploaded["length"]) == len(uploaded["body"].encode("latin-1"))
    assert (bytes(range(256)) * 40).decode("latin-1") in uploaded["body"]
    # A Host header given by the caller is the one sent (requests pinned to an address).
    named = (await client.post("/echo", content=b"", headers={"Host": "a.example"})).json()
    assert named["host"] == "a.example"


async def test_an_encoded_body_is_decoded_by_httpx(client: httpx.AsyncClient) -> None:
    response = await client.get("/gzip")
    assert response.content == b"x" * 10_000


async def test_a_streamed_body_is_read_as_it_arrives(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/gzip") as response:
        assert response.status_code == 200
        assert b"".join([chunk async for chunk in response.aiter_bytes()]) == b"x" * 10_000
    # Closed early, the connection is not handed to the next request half-read.
    async with client.stream("GET", "/gzip"):
        pass
    assert (await client.get("/port")).status_code == 200


# -- errors: whether the request may have reached the server -----------------------------


async def test_a_refused_connection_is_a_connect_error_not_a_timeout() -> None:
    with PortEcho() as gone:
        url = gone.url
    async with httpx.AsyncClient(transport=AiohttpTransport(), base_url=url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/port")


async def test_no_answer_in_time_is_a_read_timeout(
    server: PortEcho, client: httpx.AsyncClient
) -> None:
    server.delay = 1.0
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/port", timeout=httpx.Timeout(5, read=0.2))


RawServer = Callable[[bytes], Awaitable[str]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    """A socket server that reads a request and answers `reply` (raw bytes), then closes."""
    servers: list[asyncio.Server] = []

    async def start(reply: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
            writer.close()

        raw = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(raw)
        port = raw.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for raw in servers:
        raw.close()
        await raw.wait_closed()


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closed without a word
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short",
        b"this is not HTTP\r\n\r\n",
    ],
    ids=["disconnected", "body-cut-short", "not-http"],
)
async def test_a_bad_answer_is_a_protocol_error(raw_server: RawServer, reply: bytes) -> None:
    url = await raw_server(reply)
    async with httpx.AsyncClient(transport=AiohttpTransport(), base_url=url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")


async def test_a_closed_transport_sends_nothing(server: PortEcho) -> None:
    transport = AiohttpTransport()
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        await client.get("/port")
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", f"{server.url}/port"))


def test_a_transport_needs_a_connection() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AiohttpTransport(max_connections=0)


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
