"""Outbound HTTP that cannot be turned against the server's own network.

Every URL a user gives us (an image to fetch, later a webhook to call) goes through here:
- only http and https;
- the host is resolved once and every address must be public (no private, loopback,
  link-local, shared, multicast or reserved ranges, including IPv4-mapped IPv6 forms);
- the connection goes to the address that was checked, with the name sent as Host and TLS
  SNI, so a DNS answer that changes between check and use (rebinding) cannot redirect it;
- redirects are followed by hand, at most three, each one checked again;
- the body is capped and read as a stream, so a huge response is cut off early.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from imagegraph.errors import NodeError, PayloadTooLarge, TransientNodeError, UnsafeURL
from imagegraph.transport import AiohttpTransport

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the host's addresses as strings; raises `UnsafeURL` if it cannot resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# With `keep_connections`: clients kept (one per host name and address). Each opens at
# most `CONNECTIONS_PER_CLIENT` connections at once and keeps them open while they serve.
KEPT_CLIENTS = 16
CONNECTIONS_PER_CLIENT = 100


def address_problem(address: IPAddress) -> str | None:
    """Why an address may not be contacted, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = (
            address.ipv4_mapped
            or address.sixtofour
            or (address.teredo[1] if address.teredo else None)
        )
        if embedded is not None:
            return address_problem(embedded)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved or non-public address"
    return None


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    address: str


@dataclass
class _Kept:
    client: httpx.AsyncClient
    users: int = 0  # requests using it now


class SafeFetcher:
    """Fetch URLs under the rules above.

    >>> fetcher = SafeFetcher(allow_private=False, max_bytes=1 << 20)
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        max_bytes: int,
        connect_timeout: float = 5.0,
        total_timeout: float = 30.0,
        max_redirects: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
        private_setting: str = "IMAGEGRAPH_ALLOW_PRIVATE_URLS",
        keep_connections: bool = False,
    ) -> None:
        """`keep_connections` keeps a client (and its open connections) per host name and
        checked address for the next requests to them, without cookies; for hosts many
        requests go to, such as a provider's result URLs. Otherwise every request gets a
        client of its own."""
        self.allow_private = allow_private
        self.keep_connections = keep_connections
        # (scheme, host name, address, port) -> its client, the most recently used last.
        self._kept: dict[tuple[str, str, str, int | None], _Kept] = {}
        self.private_setting = private_setting
        self._resolver = resolver or system_resolve
        self.max_bytes = max_bytes
        self.total_timeout = total_timeout
        self.max_redirects = max_redirects
        self._timeout = httpx.Timeout(total_timeout, connect=connect_timeout)
        self._transport = transport

    async def aclose(self) -> None:
        """Close the clients kept for reuse (see `keep_connections`)."""
        kept, self._kept = self._kept, {}
        for each in kept.values():
            await each.client.aclose()

    async def check(self, url: str) -> Target:
        """Resolve and vet a URL; raises `UnsafeURL` naming what is wrong."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise UnsafeURL(f"not a valid URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise UnsafeURL(
                f"URL scheme {parsed.scheme or '(none)'!r} is not allowed; use http or https"
            )
        host = parsed.raw_host.decode("ascii")  # what DNS and the wire see (IDNA)
        if not host:
            raise UnsafeURL("URL has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = await self._resolve(host, port)
        if not self.allow_private:
            for address in addresses:
                problem = address_problem(address)
                if problem is not None:
                    raise UnsafeURL(
                        f"URL host {host!r} resolves to {address}, {problem}; such addresses are "
                        f"refused unless {self.private_setting}=true"
                    )
        return Target(parsed, str(addresses[0]))

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        addresses: list[IPAddress] = []
        for found in await self._resolver(host, port):
            try:
                address = ipaddress.ip_address(found.split("%", 1)[0])
            except ValueError:
                raise UnsafeURL(
                    f"URL host {host!r} resolved to {found!r}, not an address"
                ) from None
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise UnsafeURL(f"URL host {host!r} has no addresses")
        return addresses

    async def fetch(self, url: str) -> bytes:
        """GET a URL and return its body, following at most `max_redirects` checked redirects."""
        try:
            async with asyncio.timeout(self.total_timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise TransientNodeError(
                f"fetching {url} took longer than {self.total_timeout:g} s", code="timeout"
            ) from None

    async def _fetch(self, url: str) -> bytes:
        current = url
        for _ in range(self.max_redirects + 1):
            target = await self.check(current)
            # A client per request (so a new connection pool and an empty cookie jar), or
            # one kept for this name and address: a TLS connection verified for one name is
            # never reused for another name on the same address, and no cookie set by one
            # site is ever sent to another.
            async with self._client(target) as client:
                try:
                    response = await client.send(pinned_request(target), stream=True)
                except httpx.TimeoutException:
                    raise TransientNodeError(
                        f"timed out fetching {current}", code="timeout"
                    ) from None
                except httpx.TransportError as exc:
                    raise TransientNodeError(
                        f"could not fetch {current}: {exc}", code="fetch_failed"
                    ) from None
                try:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        current = str(target.url.join(response.headers["location"]))
                        continue
                    if response.status_code >= 400:
                        raise _http_error(current, response)
                    return await self._read_capped(current, response)
                finally:
                    await response.aclose()
        raise UnsafeURL(f"too many redirects fetching {url} (at most {self.max_redirects})")

    @contextlib.asynccontextmanager
    async def _client(self, target: Target) -> AsyncIterator[httpx.AsyncClient]:
        if not self.keep_connections:
            async with self._new_client() as client:
                yield client
            return
        url = target.url
        key = (url.scheme, url.raw_host.decode("ascii"), target.address, url.port)
        kept = self._kept.pop(key, None) or _Kept(self._new_client())
        self._kept[key] = kept  # the most recently used last
        kept.users += 1
        try:
            yield kept.client
        finally:
            kept.users -= 1
            kept.client.cookies.clear()
            await self._evict()

    async def _evict(self) -> None:
        """Close the least recently used clients beyond `KEPT_CLIENTS` that nobody uses."""
        excess = len(self._kept) - KEPT_CLIENTS
        idle = [key for key, kept in self._kept.items() if kept.users == 0][: max(excess, 0)]
        # Out of the table before the first await, so no request can take one up meanwhile.
        evicted = [self._kept.pop(key) for key in idle]
        for kept in evicted:
            await kept.client.aclose()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self._timeout,
            transport=self._transport or AiohttpTransport(max_connections=CONNECTIONS_PER_CLIENT),
            follow_redirects=False,
            trust_env=False,
        )

    async def _read_capped(self, url: str, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(
                f"{url} is {int(declared)} bytes; the download limit is {self.max_bytes} bytes"
            )
        chunks = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise PayloadTooLarge(
                    f"{url} is larger than the download limit of {self.max_bytes} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)


async def system_resolve(host: str, port: int) -> list[str]:
    """The default resolver: the system's `getaddrinfo`."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"URL host {host!r} could not be resolved: {exc.strerror}") from None
    return [str(info[4][0]) for info in infos]


def pinned_request(
    target: Target,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Request:
    """A request to the checked address that still names the host (Host header, TLS SNI)."""
    url = target.url
    host = url.raw_host.decode("ascii")  # IDNA-encoded, as the wire wants it
    is_ip = _is_ip(host)
    authority = f"[{host}]" if ":" in host else host
    if url.port is not None:
        authority = f"{authority}:{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" and not is_ip else {}
    return httpx.Request(
        method,
        url.copy_with(host=target.address),
        headers={"Host": authority, "User-Agent": "imagegraph", "Accept": "image/*"}
        if headers is None
        else {"Host": authority, "User-Agent": "imagegraph", **headers},
        content=content,
        extensions=extensions,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _http_error(url: str, response: httpx.Response) -> Exception:
    status = response.status_code
    message = f"fetching {url} failed with HTTP {status}"
    if status in (408, 429) or status >= 500:
        delay = parse_retry_after(response.headers.get("retry-after"))
        return TransientNodeError(message, code="fetch_failed", retry_after=delay)
    return NodeError(message, code="fetch_failed")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
