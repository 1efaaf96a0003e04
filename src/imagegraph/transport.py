"""The transport of outbound httpx clients: requests sent by aiohttp.

Provider adapters and result downloads speak httpx (requests, responses, streams, timeouts,
errors); only the wire work is aiohttp's, whose connection pool and C response parser cost
about a fifth of the CPU time of httpx's own transport (httpcore and h11, pure Python) per
request. A server talking to a provider at its concurrency limit makes thousands of these
requests a minute, on the event loop every execution shares.

Errors keep the distinction the adapters rely on. A request that never reached the server
raises `httpx.ConnectError` or `httpx.ConnectTimeout` (refused, unresolvable, TLS
handshake failed, no connection in time); one that may have reached it raises a read
timeout or a protocol or network error. (httpx-aiohttp, the library made for this, reports
a refused connection as a connect *timeout*, which would mark a submit that never left as
one whose fate is in doubt.)

No cookie is ever stored or sent back, whatever a server sets.

    client = httpx.AsyncClient(transport=AiohttpTransport(max_connections=200))
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
import yarl

# Headers aiohttp works out itself from the body it is given (which is always whole bytes).
_BODY_HEADERS = frozenset({"transfer-encoding"})


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings outbound clients verify with (httpx's defaults), made once: loading
    the CA bundle takes about 20 ms of CPU, too much for each request. It holds no
    connection or session, so sharing it keeps requests apart."""
    return httpx.create_ssl_context(trust_env=False)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """At most `max_connections` connections at once; idle ones are kept for
    `keepalive_seconds`. The aiohttp session is made on the first request, in the event
    loop that sends it, and closed by `aclose` (the client's)."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_seconds: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.max_connections = max_connections
        self.keepalive_seconds = keepalive_seconds
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this transport was closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                keepalive_timeout=self.keepalive_seconds,
                ssl=self._tls or tls_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,  # httpx decodes Content-Encoding itself
                timeout=aiohttp.ClientTimeout(total=None),  # per request, from httpx
                trust_env=False,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open_session()
        timeout = request.extensions.get("timeout", {})
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw
            if name.lower().decode("latin-1") not in _BODY_HEADERS
        ]
        body = await request.aread()
        with _as_httpx_errors():
            response = await session.request(
                request.method,
                # Already encoded by httpx: sent as it is, not quoted again.
                yarl.URL(str(request.url), encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),  # a connection from the pool, or a new one
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1"),
            },
        )

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp reads it; closing it gives the connection back (or
    closes it, if the body was not read to its end)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientError as exc:
        raise _httpx_error(exc) from exc


def _httpx_error(exc: aiohttp.ClientError) -> httpx.TransportError:
    """The httpx error that says the same as an aiohttp one (most specific first)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS: never sent
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientResponseError):  # not an HTTP answer
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message)
    if isinstance(exc, aiohttp.ClientOSError):  # reset or broken while talking
        return httpx.ReadError(message)
    return httpx.NetworkError(message)
