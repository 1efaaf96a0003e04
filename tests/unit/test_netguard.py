"""SafeFetcher: which addresses are refused, and how fetches are pinned, capped and retried.

No test here touches the network: names go through a fake resolver (or the system resolver
for `localhost` and numeric hosts, which need no DNS) and requests through
`httpx.MockTransport`, which records what would have been sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from imagegraph.errors import NodeError, PayloadTooLarge, TransientNodeError, UnsafeURL
from imagegraph.netguard import Resolver, SafeFetcher, address_problem, parse_retry_after

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700:4700::1111"
CAP = 1024

DNS = {
    "images.example": [PUBLIC_V4],
    "v6.example": [PUBLIC_V6],
    "other.example": ["8.8.8.8"],
    "internal.example": ["10.1.2.3"],
    # One public and one private answer: the private one must be enough to refuse.
    "mixed.example": [PUBLIC_V4, "192.168.7.7"],
    "mixed-v6.example": [PUBLIC_V6, "::ffff:127.0.0.1"],
}


@dataclass
class FakeDNS:
    """A resolver over a fixed table that records what it was asked."""

    table: dict[str, list[str]]
    asked: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.table:
            raise UnsafeURL(f"URL host {host!r} could not be resolved")
        return list(self.table[host])


@dataclass
class Harness:
    fetcher: SafeFetcher
    dns: FakeDNS
    requests: list[httpx.Request]


FetcherFactory = Callable[..., Harness]


@pytest.fixture
async def make_fetcher() -> AsyncIterator[FetcherFactory]:
    """Builds SafeFetchers on a recording MockTransport and the fake resolver; closes them."""
    built: list[SafeFetcher] = []

    def build(
        handler: Handler | None = None,
        *,
        allow_private: bool = False,
        max_bytes: int = CAP,
        total_timeout: float = 30.0,
        resolver: Resolver | None = None,
        dns: dict[str, list[str]] | None = None,
        system_dns: bool = False,
    ) -> Harness:
        requests: list[httpx.Request] = []

        async def record(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            if handler is None:
                return httpx.Response(200, content=b"ok")
            return await handler(request)

        fake = FakeDNS(dict(DNS if dns is None else dns))
        fetcher = SafeFetcher(
            allow_private=allow_private,
            max_bytes=max_bytes,
            total_timeout=total_timeout,
            transport=httpx.MockTransport(record),
            resolver=None if system_dns else (resolver or fake),
        )
        built.append(fetcher)
        return Harness(fetcher, fake, requests)

    yield build
    for fetcher in built:
        await fetcher.aclose()


# -- address_problem --------------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "non-public"),  # shared address space (carrier-grade NAT)
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("2002:7f00:0001::1", "loopback"),  # 6to4 of 127.0.0.1
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_non_public_addresses_are_refused_with_a_reason(address: str, kind: str) -> None:
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None
    assert kind in problem


@pytest.mark.parametrize("address", ["8.8.8.8", PUBLIC_V4, PUBLIC_V6])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def spelled(address: str) -> str:
    """An address as messages print it (Python versions differ for IPv4-mapped IPv6)."""
    return str(ipaddress.ip_address(address))


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1/", "127.0.0.1"),
        ("http://2130706433/", "127.0.0.1"),  # the decimal form of 127.0.0.1
        ("http://0x7f000001/", "127.0.0.1"),  # the hexadecimal form
        ("http://[::1]/", "::1"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("https://10.0.0.1:8443/x.png", "10.0.0.1"),
    ],
)
async def test_check_refuses_private_hosts_spelled_any_way(
    make_fetcher: FetcherFactory, url: str, address: str
) -> None:
    # The system resolver: numeric hosts need no DNS.
    harness = make_fetcher(system_dns=True)
    with pytest.raises(UnsafeURL) as caught:
        await harness.fetcher.check(url)
    assert spelled(address) in caught.value.message
    assert "IMAGEGRAPH_ALLOW_PRIVATE_URLS" in caught.value.message
    with pytest.raises(UnsafeURL):
        await harness.fetcher.fetch(url)
    assert harness.requests == []


async def test_check_refuses_localhost_with_the_system_resolver(
    make_fetcher: FetcherFactory,
) -> None:
    harness = make_fetcher(system_dns=True)
    with pytest.raises(UnsafeURL) as caught:
        await harness.fetcher.check("http://localhost:8000/")
    message = caught.value.message
    assert "'localhost'" in message
    assert "loopback" in message
    assert "127.0.0.1" in message or "::1" in message
    assert "IMAGEGRAPH_ALLOW_PRIVATE_URLS" in message


@pytest.mark.parametrize(
    "url", ["ftp://images.example/a.png", "file:///etc/passwd", "gopher://images.example/"]
)
async def test_check_refuses_other_schemes(make_fetcher: FetcherFactory, url: str) -> None:
    harness = make_fetcher()
    with pytest.raises(UnsafeURL, match="scheme") as caught:
        await harness.fetcher.check(url)
    assert caught.value.code == "unsafe_url"
    assert caught.value.status == 422
    assert harness.dns.asked == []


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("internal.example", "10.1.2.3"),
        ("mixed.example", "192.168.7.7"),
        ("mixed-v6.example", "::ffff:127.0.0.1"),
    ],
)
async def test_check_refuses_a_name_with_any_private_address(
    make_fetcher: FetcherFactory, host: str, address: str
) -> None:
    harness = make_fetcher()
    with pytest.raises(UnsafeURL) as caught:
        await harness.fetcher.check(f"https://{host}/cat.png")
    message = caught.value.message
    assert host in message
    assert spelled(address) in message
    assert "IMAGEGRAPH_ALLOW_PRIVATE_URLS" in message
    assert harness.dns.asked == [(host, 443)]


async def test_check_of_a_public_name_pins_its_address(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher()
    target = await harness.fetcher.check("http://images.example:8080/cat.png")
    assert target.address == PUBLIC_V4
    assert target.url.host == "images.example"
    assert harness.dns.asked == [("images.example", 8080)]


async def test_ip_literals_skip_the_resolver(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher()
    assert (await harness.fetcher.check("http://8.8.8.8/")).address == "8.8.8.8"
    assert (await harness.fetcher.check(f"https://[{PUBLIC_V6}]/")).address == PUBLIC_V6
    assert harness.dns.asked == []


async def test_an_unresolvable_name_is_refused(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher()
    with pytest.raises(UnsafeURL, match="could not be resolved"):
        await harness.fetcher.check("http://nowhere.example/")


async def test_a_resolver_answering_nothing_is_refused(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher(dns={"empty.example": []})
    with pytest.raises(UnsafeURL, match="no addresses"):
        await harness.fetcher.check("http://empty.example/")


async def test_allow_private_lets_loopback_through(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher(allow_private=True, dns={"internal.example": ["10.1.2.3"]})
    assert (await harness.fetcher.check("http://127.0.0.1/")).address == "127.0.0.1"
    assert (await harness.fetcher.check("http://internal.example/")).address == "10.1.2.3"
    body = await harness.fetcher.fetch("http://127.0.0.1:9000/x.png")
    assert body == b"ok"
    assert str(harness.requests[0].url) == "http://127.0.0.1:9000/x.png"


# -- fetch: pinning ---------------------------------------------------------------------------


async def test_http_request_goes_to_the_checked_address_with_the_name_as_host(
    make_fetcher: FetcherFactory,
) -> None:
    harness = make_fetcher()
    assert await harness.fetcher.fetch("http://images.example/cat.png?size=2") == b"ok"
    [request] = harness.requests
    assert request.url.host == PUBLIC_V4
    assert request.url.scheme == "http"
    assert request.url.raw_path == b"/cat.png?size=2"
    assert request.headers["host"] == "images.example"
    assert "sni_hostname" not in request.extensions


async def test_https_request_sends_the_name_as_host_and_sni(
    make_fetcher: FetcherFactory,
) -> None:
    harness = make_fetcher()
    await harness.fetcher.fetch("https://images.example:8443/cat.png")
    [request] = harness.requests
    assert request.url.scheme == "https"
    assert request.url.host == PUBLIC_V4
    assert request.url.port == 8443
    assert request.headers["host"] == "images.example:8443"
    assert request.extensions["sni_hostname"] == "images.example"


async def test_ipv6_address_is_pinned_in_brackets(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher()
    await harness.fetcher.fetch("https://v6.example/cat.png")
    [request] = harness.requests
    assert request.url.host == PUBLIC_V6
    assert str(request.url) == f"https://[{PUBLIC_V6}]/cat.png"
    assert request.headers["host"] == "v6.example"
    assert request.extensions["sni_hostname"] == "v6.example"


async def test_fetch_resolves_again_instead_of_trusting_an_earlier_check(
    make_fetcher: FetcherFactory,
) -> None:
    """A name that answers public at preflight and loopback later (DNS rebinding)."""
    answers = [[PUBLIC_V4], ["127.0.0.1"]]

    async def rebinding(host: str, port: int) -> list[str]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    harness = make_fetcher(resolver=rebinding)
    assert (await harness.fetcher.check("http://rebind.example/")).address == PUBLIC_V4
    with pytest.raises(UnsafeURL, match=r"127\.0\.0\.1"):
        await harness.fetcher.fetch("http://rebind.example/")
    assert harness.requests == []


# -- fetch: redirects -------------------------------------------------------------------------


def redirect_to(location: str, status: int = 302) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"Location": location})

    return handler


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1/x",
        "http://internal.example/x",
        "http://[::ffff:10.0.0.1]/x",
        "file:///etc/passwd",
    ],
)
async def test_redirect_to_a_refused_url_is_refused(
    make_fetcher: FetcherFactory, location: str
) -> None:
    harness = make_fetcher(redirect_to(location))
    with pytest.raises(UnsafeURL):
        await harness.fetcher.fetch("http://images.example/start")
    assert len(harness.requests) == 1  # the refused target was never contacted


async def test_redirects_are_followed_and_pinned_each_time(make_fetcher: FetcherFactory) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(301, headers={"Location": "https://other.example/moved"})
        if request.url.path == "/moved":
            return httpx.Response(307, headers={"Location": "/final.png"})
        return httpx.Response(200, content=b"image bytes")

    harness = make_fetcher(handler)
    assert await harness.fetcher.fetch("http://images.example/start") == b"image bytes"
    seen = [(r.url.scheme, r.url.host, r.url.path, r.headers["host"]) for r in harness.requests]
    assert seen == [
        ("http", PUBLIC_V4, "/start", "images.example"),
        ("https", "8.8.8.8", "/moved", "other.example"),
        ("https", "8.8.8.8", "/final.png", "other.example"),
    ]
    assert harness.requests[2].extensions["sni_hostname"] == "other.example"


def hops(count: int) -> Handler:
    """Redirects /0 -> /1 -> ... -> /count, which answers 200."""

    async def handler(request: httpx.Request) -> httpx.Response:
        step = int(request.url.path.strip("/"))
        if step < count:
            return httpx.Response(302, headers={"Location": f"/{step + 1}"})
        return httpx.Response(200, content=b"arrived")

    return handler


async def test_three_redirects_are_followed(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher(hops(3))
    assert await harness.fetcher.fetch("http://images.example/0") == b"arrived"
    assert len(harness.requests) == 4


async def test_more_than_three_redirects_are_refused(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher(hops(4))
    with pytest.raises(UnsafeURL, match="too many redirects"):
        await harness.fetcher.fetch("http://images.example/0")
    assert [r.url.path for r in harness.requests] == ["/0", "/1", "/2", "/3"]


# -- fetch: size caps -------------------------------------------------------------------------


async def test_a_body_at_the_cap_is_returned(make_fetcher: FetcherFactory) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * CAP)

    harness = make_fetcher(handler)
    assert await harness.fetcher.fetch("http://images.example/a") == b"x" * CAP


async def test_a_declared_length_over_the_cap_is_refused_before_reading(
    make_fetcher: FetcherFactory,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        # The declared length alone must be enough: the body itself is small.
        return httpx.Response(200, headers={"Content-Length": str(CAP + 1)}, content=b"tiny")

    harness = make_fetcher(handler)
    with pytest.raises(PayloadTooLarge) as caught:
        await harness.fetcher.fetch("http://images.example/big")
    assert caught.value.status == 413
    assert str(CAP + 1) in caught.value.message


async def test_a_streamed_body_over_the_cap_is_cut_off(make_fetcher: FetcherFactory) -> None:
    sent: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        for index in range(100):
            sent.append(index)
            yield b"y" * 512

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    harness = make_fetcher(handler)
    with pytest.raises(PayloadTooLarge, match=str(CAP)):
        await harness.fetcher.fetch("http://images.example/stream")
    assert "content-length" not in harness.requests[0].headers
    assert len(sent) < 100  # reading stopped at the cap, not at the end of the body


# -- fetch: HTTP errors and timeouts ----------------------------------------------------------


async def test_503_with_retry_after_is_transient(make_fetcher: FetcherFactory) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "7"})

    harness = make_fetcher(handler)
    with pytest.raises(TransientNodeError) as caught:
        await harness.fetcher.fetch("http://images.example/busy")
    assert caught.value.retryable
    assert caught.value.retry_after == 7.0
    assert caught.value.code == "fetch_failed"
    assert "503" in caught.value.message


async def test_404_is_a_permanent_node_error(make_fetcher: FetcherFactory) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404)

    harness = make_fetcher(handler)
    with pytest.raises(NodeError) as caught:
        await harness.fetcher.fetch("http://images.example/missing")
    assert not isinstance(caught.value, TransientNodeError)
    assert not caught.value.retryable
    assert caught.value.code == "fetch_failed"
    assert "404" in caught.value.message


async def test_a_transport_timeout_is_transient(make_fetcher: FetcherFactory) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("connect timed out", request=request)

    harness = make_fetcher(handler)
    with pytest.raises(TransientNodeError) as caught:
        await harness.fetcher.fetch("http://images.example/slow")
    assert caught.value.code == "timeout"
    assert caught.value.retryable


async def test_a_connection_error_is_transient(make_fetcher: FetcherFactory) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    harness = make_fetcher(handler)
    with pytest.raises(TransientNodeError) as caught:
        await harness.fetcher.fetch("http://images.example/down")
    assert caught.value.code == "fetch_failed"


async def test_the_total_timeout_covers_a_server_that_never_answers(
    make_fetcher: FetcherFactory,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()  # never set
        raise AssertionError("unreachable")

    harness = make_fetcher(handler, total_timeout=0.05)
    with pytest.raises(TransientNodeError) as caught:
        await harness.fetcher.fetch("http://images.example/hang")
    assert caught.value.code == "timeout"


# -- isolation between fetches and hosts ----------------------------------------------------


async def test_cookies_set_by_one_site_are_never_sent_anywhere(
    make_fetcher: FetcherFactory,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ok", headers={"Set-Cookie": "session=secret"})

    harness = make_fetcher(handler, dns={"a.example": [PUBLIC_V4], "b.example": [PUBLIC_V4]})
    await harness.fetcher.fetch("http://a.example/one.png")
    await harness.fetcher.fetch("http://b.example/two.png")
    await harness.fetcher.fetch("http://a.example/three.png")
    assert [r.headers.get("cookie") for r in harness.requests] == [None, None, None]


async def test_cookies_do_not_follow_a_redirect_to_another_host(
    make_fetcher: FetcherFactory,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["host"] == "a.example":
            return httpx.Response(
                302, headers={"Location": "http://b.example/x", "Set-Cookie": "session=secret"}
            )
        return httpx.Response(200, content=b"ok")

    harness = make_fetcher(handler, dns={"a.example": [PUBLIC_V4], "b.example": [PUBLIC_V4]})
    assert await harness.fetcher.fetch("http://a.example/") == b"ok"
    assert [r.headers.get("host") for r in harness.requests] == ["a.example", "b.example"]
    assert harness.requests[1].headers.get("cookie") is None


async def test_international_names_go_out_idna_encoded(make_fetcher: FetcherFactory) -> None:
    harness = make_fetcher(dns={"xn--bcher-kva.example": [PUBLIC_V4]})
    assert await harness.fetcher.fetch("https://bücher.example/cover.png") == b"ok"
    [request] = harness.requests
    assert request.headers["host"] == "xn--bcher-kva.example"
    assert request.extensions["sni_hostname"] == "xn--bcher-kva.example"


async def test_an_ipv6_literal_url_keeps_its_brackets_in_host(
    make_fetcher: FetcherFactory,
) -> None:
    harness = make_fetcher()
    await harness.fetcher.fetch(f"https://[{PUBLIC_V6}]:8443/cat.png")
    [request] = harness.requests
    assert request.headers["host"] == f"[{PUBLIC_V6}]:8443"
    assert "sni_hostname" not in request.extensions  # SNI never carries an IP address


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_retry_after_as_seconds_or_a_date(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_retry_after_date_in_the_future_counts_down() -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)
    seconds = parse_retry_after(format_datetime(later, usegmt=True))
    assert seconds is not None
    assert 100 < seconds <= 120
