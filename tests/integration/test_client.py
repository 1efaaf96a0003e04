"""The Python client, `imagegraph.client`: `AsyncClient` against the app in-process (ASGI),
`Client` against a real server process; retries, idempotency and `wait()` through transports
that drop connections or answer 429, and a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import imagegraph.client
from imagegraph import __version__
from imagegraph.api.app import create_app
from imagegraph.client import (
    Asset,
    AsyncClient,
    Client,
    Conflict,
    Event,
    Forbidden,
    ImagegraphAPIError,
    NotFound,
    PaymentRequired,
    Poll,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
    default_api_key,
    fire_trigger,
)
from imagegraph.client._sse import SSEDecoder
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from tests.builders import edge, linear, node, workflow
from tests.e2e.server import ServerProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


class Sleeps:
    """An async sleep that records what it was asked to wait and waits a twentieth of it."""

    def __init__(self, scale: float = 0.05) -> None:
        self.delays: list[float] = []
        self.scale = scale

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(seconds * self.scale)


class Intercept(httpx.AsyncBaseTransport):
    """Sends requests on to `inner`, except that `hook` may answer (or break) a request first.
    Records every request it sees."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        hook: Callable[[httpx.Request, Handler], Awaitable[httpx.Response]],
    ) -> None:
        self.inner = inner
        self.hook = hook
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.hook(request, self.inner.handle_async_request)

    def seen(self, method: str, path_end: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(path_end)]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Webhooks may go to this machine (the receiver in the webhook test)."""
    return settings.model_copy(update={"allow_private_webhooks": True})


@pytest.fixture
def asgi(runtime: Runtime) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(runtime=runtime))


@contextlib.asynccontextmanager
async def connect(
    transport: httpx.AsyncBaseTransport, key: str, sleeps: Sleeps | None = None, **kw: Any
) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(
        "http://testserver", key, transport=transport, sleep=sleeps or Sleeps(), **kw
    ) as client:
        yield client


@pytest.fixture
async def api(asgi: httpx.ASGITransport, admin_key: str) -> AsyncIterator[AsyncClient]:
    """An AsyncClient of the app with the admin key; its waits last a twentieth of their
    schedule (the schedule itself is tested with a fake clock below)."""
    async with connect(asgi, admin_key) as client:
        yield client


# -- workflows -------------------------------------------------------------------------------


async def test_create_get_list_update_delete_and_validate_workflows(api: AsyncClient) -> None:
    created = [await api.create_workflow(linear(f"subject {i}")) for i in range(3)]
    first = created[0]
    assert (first.version, first.latest_version, first.name) == (1, 1, "linear")
    assert [n["id"] for n in first.nodes] == ["prompt", "gen", "out"]
    assert first.edges[0]["sourceHandle"] == "text"

    fetched = await api.get_workflow(first.id)
    assert fetched == first

    page = await api.list_workflows(limit=2)
    assert [w.id for w in page.items] == [created[2].id, created[1].id]
    assert page.next_cursor is not None
    rest = await api.list_workflows(limit=2, cursor=page.next_cursor)
    assert [w.id for w in rest.items] == [first.id]
    assert rest.next_cursor is None
    assert [w.id async for w in api.iter_workflows(page_size=1)] == [w.id for w in created[::-1]]
    assert page.items[0].node_count == 3

    document = first.document()
    document["name"] = "renamed"
    updated = await api.update_workflow(first.id, document)
    assert (updated.version, updated.name) == (2, "renamed")
    assert (await api.get_workflow(first.id, version=1)).name == "linear"
    assert (await api.get_workflow(first.id)).latest_version == 2
    assert (await api.update_workflow(first.id, updated)).version == 3  # a Workflow saves too

    await api.delete_workflow(first.id)
    with pytest.raises(NotFound):
        await api.get_workflow(first.id)

    valid = await api.validate_workflow(linear())
    assert valid.valid
    assert valid.errors == []
    broken = linear()
    broken["edges"] = []
    invalid = await api.validate_workflow(broken)
    assert not invalid.valid
    assert {e["code"] for e in invalid.errors} >= {"missing_input"}


async def test_workflow_files_json_and_yaml(api: AsyncClient) -> None:
    from_json = await api.create_workflow(EXAMPLES / "linear.json")
    assert from_json.name == "Product shot (linear)"
    from_yaml = await api.create_workflow(str(EXAMPLES / "fan-out.yaml"))
    assert len(from_yaml.nodes) > 3
    assert (await api.validate_workflow(EXAMPLES / "fan-out.yaml")).valid
    assert (await api.get_workflow(from_yaml.id)).nodes == from_yaml.nodes


# -- executions ------------------------------------------------------------------------------


async def test_execute_wait_record_and_download(api: AsyncClient, tmp_path: Path) -> None:
    wf = await api.create_workflow(linear(size=96, out_format="png"))
    handle = await api.execute(wf.id, {"Prompt": "a lighthouse"})
    assert (handle.status, handle.replayed) == ("QUEUED", False)

    result = await api.wait(handle.execution_id, timeout=30)
    assert isinstance(result, Poll)
    assert (result.status, result.error, result.done) == ("COMPLETED", None, True)
    [output] = result.outputs
    assert (output.node_id, output.width, output.height, output.format) == ("out", 96, 96, "png")
    assert output.mime_type == "image/png"

    data = await api.download(output.url)
    assert data.startswith(PNG_MAGIC)
    assert len(data) == output.size_bytes
    target = tmp_path / "out.png"
    assert await api.download(output.asset_id, target) == data
    assert target.read_bytes() == data
    assert await api.download(output) == data

    record = await api.get_execution(handle.execution_id)
    assert record.status == "COMPLETED"
    assert record.workflow_id == wf.id
    assert record.inputs == {"Prompt": "a lighthouse"}
    assert record.totals.succeeded == 3
    assert record.totals.outputs == 1
    assert record.node("gen").node_type == "generate:sandbox"
    assert record.node("gen").status == "SUCCEEDED"
    assert record.outputs == [output]

    listed = await api.list_executions(workflow_id=wf.id, status="COMPLETED")
    assert [e.execution_id for e in listed.items] == [handle.execution_id]
    assert [e.execution_id async for e in api.iter_executions(wf.id)] == [handle.execution_id]


async def test_run_the_example_and_download_webp(api: AsyncClient) -> None:
    wf = await api.create_workflow(EXAMPLES / "linear.json")
    result = await api.run(wf.id, {"Product": "a ceramic teapot"}, timeout=30)
    assert result.status == "COMPLETED"
    [output] = result.outputs
    assert (output.format, output.width, output.height) == ("webp", 384, 384)
    assert is_webp(await api.download(output.url))


async def test_long_poll_and_events_stream_to_the_end(api: AsyncClient) -> None:
    wf = await api.create_workflow(linear(size=64))
    handle = await api.execute(wf.id)
    polled = await api.poll(handle.execution_id, wait=30)
    assert polled.status == "COMPLETED"

    events = [e async for e in api.events(handle.execution_id)]
    assert all(isinstance(e, Event) for e in events)
    assert [e.type for e in events[:2]] == ["execution.queued", "execution.started"]
    assert events[-1].type == "execution.completed"
    assert events[-1].data["executionId"] == handle.execution_id
    assert {"node.started", "node.succeeded"} <= {e.type for e in events}
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)

    resumed = [e async for e in api.events(handle.execution_id, after=ids[-2])]
    assert [(e.id, e.type) for e in resumed] == [(events[-1].id, "execution.completed")]


async def test_cancel(api: AsyncClient) -> None:
    wf = await api.create_workflow(linear(delay_ms=10_000))
    handle = await api.execute(wf.id)
    cancelled = await api.cancel(handle.execution_id)
    assert (cancelled.execution_id, cancelled.status) == (handle.execution_id, "CANCELLED")
    assert (await api.wait(handle.execution_id, timeout=10)).status == "CANCELLED"
    with pytest.raises(Conflict) as raised:
        await api.cancel(handle.execution_id)
    assert raised.value.status == 409


# -- assets ----------------------------------------------------------------------------------


async def test_upload_use_and_lineage(api: AsyncClient, tmp_path: Path) -> None:
    uploaded = await api.upload_asset(png_bytes(64, 48))
    assert isinstance(uploaded, Asset)
    assert (uploaded.kind, uploaded.format, uploaded.width, uploaded.height) == (
        "upload",
        "png",
        64,
        48,
    )
    assert uploaded.filename == "upload.png"
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(20, 10))
    from_file = await api.upload_asset(path)
    assert (from_file.filename, from_file.width) == ("photo.png", 20)
    assert await api.get_asset(uploaded.id) == uploaded

    document = workflow(
        [
            node("img", "input:image", "Image", image=from_file.id),
            node("resize", "image:resize", width=32, height=16, mode="exact"),
            node("out", "output:image"),
        ],
        [edge("img", "image", "resize", "image"), edge("resize", "image", "out", "image")],
    )
    wf = await api.create_workflow(document)
    result = await api.run(wf.id, {"Image": uploaded.id}, timeout=30)
    assert result.status == "COMPLETED", result.error
    chain = await api.lineage(result.outputs[0].asset_id)
    assert chain[0].id == result.outputs[0].asset_id
    assert [a.node_id for a in chain[:2]] == ["out", "resize"]
    assert chain[-1].id == uploaded.id
    with pytest.raises(NotFound):
        await api.lineage("asset_nope")


# -- workspace, credits, usage, keys ---------------------------------------------------------


# The server's /usage query calls SQLAlchemy's deprecated `Result.tuples()`; under this suite's
# warnings-as-errors that would be a 500, so that one warning is let through here.
async def test_workspace_credits_and_usage(api: AsyncClient) -> None:
    workspace = await api.workspace()
    assert workspace.credits.available == 1000
    assert workspace.mode == "live"
    assert "admin" in workspace.scopes
    after = await api.add_credits(250, note="top-up")
    assert after.credits.balance == 1250

    wf = await api.create_workflow(linear(size=64))
    await api.run(wf.id, timeout=30)
    today = datetime.now(UTC).date()
    usage = await api.usage(start=today - timedelta(days=2), end=today)
    assert (usage.start, usage.end) == (today - timedelta(days=2), today)
    assert usage.totals.executions == 1
    assert usage.totals.images == 1
    assert [d.date for d in usage.by_day if d.executions] == [today]
    assert isinstance((await api.usage()).end, date)


async def test_keys_create_list_revoke(
    api: AsyncClient, asgi: httpx.ASGITransport, admin_key: str
) -> None:
    created = await api.create_key("reader", ["workflows:read"])
    assert created.key is not None
    assert created.key.startswith("sk-live-")
    assert created.key.endswith(created.last4)
    assert created.id in {k.id for k in await api.list_keys()}

    async with connect(asgi, created.key) as reader:
        assert (await reader.workspace()).scopes == ["workflows:read"]
        with pytest.raises(Forbidden) as forbidden:
            await reader.create_workflow(linear())
        assert forbidden.value.problem["requiredScope"] == "workflows:write"

        revoked = await api.revoke_key(created.id)
        assert revoked.revoked_at is not None
        with pytest.raises(Unauthorized) as unauthorized:
            await reader.workspace()
        assert unauthorized.value.status == 401
        assert unauthorized.value.code == "unauthorized"


# -- typed errors ----------------------------------------------------------------------------


async def test_not_found_carries_the_problem_and_request_id(api: AsyncClient) -> None:
    with pytest.raises(NotFound) as raised:
        await api.get_workflow("wf_nope")
    error = raised.value
    assert isinstance(error, ImagegraphAPIError)
    assert (error.status, error.code) == (404, "not_found")
    assert error.problem["status"] == 404
    assert error.problem["type"] == "urn:imagegraph:problem:not_found"
    assert error.detail == error.problem["detail"]
    assert "wf_nope" in error.detail
    assert error.request_id
    assert error.request_id == error.problem["requestId"]
    assert error.request_id in str(error)


async def test_invalid_workflow_is_validation_failed_with_every_error(api: AsyncClient) -> None:
    broken = workflow(
        [node("g", "generate:sandbox", width=9000)], [], name="broken"
    )  # too wide, no prompt, no output
    with pytest.raises(ValidationFailed) as raised:
        await api.create_workflow(broken)
    error = raised.value
    assert (error.status, error.code) == (422, "workflow_invalid")
    by_code = {e["code"]: e for e in error.errors}
    assert by_code["invalid_param"]["nodeId"] == "g"
    assert by_code["invalid_param"]["field"] == "params.width"
    assert {"missing_input", "no_output"} <= set(by_code)


async def test_too_expensive_is_payment_required_with_the_price(api: AsyncClient) -> None:
    wf = await api.create_workflow(linear())
    with pytest.raises(PaymentRequired) as raised:
        await api.execute(wf.id, nodes=[{"id": "gen", "data": {"params": {"credits": 5000}}}])
    error = raised.value
    assert (error.status, error.code) == (402, "insufficient_credits")
    assert (error.required_credits, error.available_credits) == (5000, 1000)
    assert error.nodes == [{"nodeId": "gen", "nodeType": "generate:sandbox", "credits": 5000}]
    assert (await api.list_executions()).items == []


# -- retries and idempotency -----------------------------------------------------------------


async def test_execute_retried_after_a_dropped_connection_runs_once(
    asgi: httpx.ASGITransport, admin_key: str
) -> None:
    dropped = False

    async def drop_first_execute(request: httpx.Request, forward: Handler) -> httpx.Response:
        nonlocal dropped
        response = await forward(request)
        if request.url.path.endswith("/execute") and not dropped:
            dropped = True
            await response.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    transport = Intercept(asgi, drop_first_execute)
    sleeps = Sleeps()
    async with connect(transport, admin_key, sleeps) as client:
        wf = await client.create_workflow(linear(size=64))
        handle = await client.execute(wf.id, {"Prompt": "once"})
        assert handle.replayed
        attempts = transport.seen("POST", "/execute")
        keys = {r.headers["Idempotency-Key"] for r in attempts}
        assert len(attempts) == 2
        assert len(keys) == 1
        assert len(sleeps.delays) == 1
        assert 0 <= sleeps.delays[0] <= 0.5
        executions = await client.list_executions(workflow_id=wf.id)
        assert [e.execution_id for e in executions.items] == [handle.execution_id]

        # Each logical call has its own key; a caller may choose it to de-duplicate calls.
        again = await client.execute(wf.id, {"Prompt": "once"})
        assert again.execution_id != handle.execution_id
        assert not again.replayed
        chosen = await client.execute(wf.id, {"Prompt": "x"}, idempotency_key="order-17")
        twin = await client.execute(wf.id, {"Prompt": "x"}, idempotency_key="order-17")
        assert (twin.execution_id, twin.replayed) == (chosen.execution_id, True)
        assert transport.seen("POST", "/execute")[-1].headers["Idempotency-Key"] == "order-17"
        creates = transport.seen("POST", "/workflows")
        assert len(creates) == 1
        assert creates[0].headers["Idempotency-Key"]


async def test_429_waits_exactly_retry_after(asgi: httpx.ASGITransport, admin_key: str) -> None:
    limited = 0

    async def limit_first(request: httpx.Request, forward: Handler) -> httpx.Response:
        nonlocal limited
        if request.url.path.endswith("/execute") and limited < 1:
            limited += 1
            problem = {"status": 429, "code": "rate_limited", "detail": "slow down"}
            return httpx.Response(429, headers={"Retry-After": "1"}, json=problem, request=request)
        return await forward(request)

    transport = Intercept(asgi, limit_first)
    sleeps = Sleeps()
    async with connect(transport, admin_key, sleeps) as client:
        wf = await client.create_workflow(linear(size=64))
        handle = await client.execute(wf.id)
        assert sleeps.delays == [1.0]
        assert handle.status == "QUEUED"
        assert not handle.replayed
        attempts = transport.seen("POST", "/execute")
        assert len(attempts) == 2
        assert attempts[0].headers["Idempotency-Key"] == attempts[1].headers["Idempotency-Key"]

    limited = 0
    async with connect(transport, admin_key, max_retries=0) as impatient:
        with pytest.raises(RateLimited) as raised:
            await impatient.execute(wf.id)
    assert raised.value.retry_after == 1.0


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], **kw: Any
) -> tuple[Client, list[float]]:
    """A Client of a fake server; returns it and the list its sleeps are recorded in."""
    delays: list[float] = []
    client = Client(
        "http://fake",
        "sk-test-fake",
        transport=httpx.MockTransport(handler),
        sleep=delays.append,
        **kw,
    )
    return client, delays


def problem(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"type": f"urn:imagegraph:problem:{code}", "status": status, "code": code}
    return httpx.Response(
        status, json=body, headers={"Content-Type": "application/problem+json", **(headers or {})}
    )


def test_what_is_retried_and_what_is_not() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    client, delays = mock_client(handler, max_retries=2)
    workflow_json = {**linear(), "id": "wf_1", "version": 1, "latestVersion": 1}
    workflow_json |= {"createdAt": "2024-01-01T00:00:00Z", "updatedAt": "2024-01-01T00:00:00Z"}
    with client:
        # A creating POST is retried on 503 and on an in-flight 409, with the same key.
        answers[:] = [
            problem(503, "not_ready"),
            problem(409, "conflict", {"Retry-After": "2"}),
            httpx.Response(201, json={**workflow_json, "futureField": 1}),
        ]
        assert client.create_workflow(linear()).id == "wf_1"
        assert len({r.headers["Idempotency-Key"] for r in seen}) == 1
        assert len(seen) == 3
        assert delays[1] == 2.0
        assert 0 <= delays[0] <= 0.5

        # After max_retries, the last error is raised.
        seen.clear()
        answers[:] = [problem(502, "bad_gateway")] * 3
        with pytest.raises(ServerError) as raised:
            client.get_workflow("wf_1")
        assert len(seen) == 3
        assert raised.value.status == 502

        # A PUT has no key: a 503 is not retried (it may have saved a version).
        seen.clear()
        answers[:] = [problem(503, "not_ready")]
        with pytest.raises(ServerError):
            client.update_workflow("wf_1", linear())
        assert len(seen) == 1
        assert "Idempotency-Key" not in seen[0].headers

        # Other 4xx are never retried; a 409 without Retry-After neither.
        for status, code in [(400, "bad"), (404, "not_found"), (409, "conflict")]:
            seen.clear()
            answers[:] = [problem(status, code)]
            with pytest.raises(ImagegraphAPIError) as failed:
                client.create_workflow(linear())
            assert len(seen) == 1
            assert failed.value.status == status

        # A Retry-After too long to wait out is raised, not slept through.
        seen.clear()
        answers[:] = [problem(429, "rate_limited", {"Retry-After": "3600"})]
        with pytest.raises(RateLimited) as limited:
            client.get_workflow("wf_1")
        assert limited.value.retry_after == 3600
        assert len(seen) == 1

        # A body that is not a problem still gives a typed error.
        answers[:] = [httpx.Response(500, text="<html>oops</html>")]
        with pytest.raises(ServerError) as html:
            client.delete_workflow("wf_1")
        assert html.value.code == "http_error"
        assert "oops" in html.value.detail


def test_connection_failures_become_transport_error_after_retries() -> None:
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    client, delays = mock_client(refuse, max_retries=3)
    with client, pytest.raises(TransportError):
        client.workspace()
    assert len(calls) == 4
    assert len(delays) == 3
    # full jitter: each delay anywhere up to 0.5 s * 2^retry
    assert all(0 <= d <= 0.5 * 2**i for i, d in enumerate(delays))

    def reset(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadError("reset", request=request)

    calls.clear()
    client, _ = mock_client(reset)
    with client, pytest.raises(TransportError):
        client.rotate_trigger("wf_1", "wh_1")  # a POST without a key: not sent again
    assert len(calls) == 1


class BrokenStream(httpx.SyncByteStream):
    """A response body that breaks off after its chunks, like a dropped connection."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.ReadError("connection reset by peer")


def test_a_broken_event_stream_resumes_from_the_last_event() -> None:
    resumed_from: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept"] == "text/event-stream"
        resumed_from.append(request.headers.get("Last-Event-ID"))
        if len(resumed_from) == 1:
            body = BrokenStream(
                b"id: 1\nevent: execution.started\ndata: {}\n\n",
                b'id: 2\nevent: node.started\ndata: {"nodeId": "gen"}\n\nid: 3\nevent: node.su',
            )
            return httpx.Response(200, stream=body)
        rest = b": ping\n\nid: 3\nevent: node.succeeded\ndata: {}\n\n"
        rest += b"id: 4\nevent: execution.completed\ndata: {}\n\n"
        return httpx.Response(200, content=rest)

    client, delays = mock_client(handler)
    with client:
        events = list(client.events("exec_1"))
        assert [(e.id, e.type) for e in events] == [
            ("1", "execution.started"),
            ("2", "node.started"),
            ("3", "node.succeeded"),
            ("4", "execution.completed"),
        ]
        assert events[1].data == {"nodeId": "gen"}
        assert resumed_from == [None, "2"]
        assert len(delays) == 1
        list(client.events("exec_1", after=4))
        assert resumed_from[-1] == "4"


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def poll_answers(statuses: Iterator[str]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/workflows/executions/exec_1/poll"
        status = next(statuses)
        headers = {} if status == "COMPLETED" else {"Retry-After": "1"}
        body: dict[str, Any] = {
            "executionId": "exec_1",
            "status": status,
            "outputs": [],
            "error": None,
        }
        return httpx.Response(200, json=body, headers=headers)

    return handler


def test_wait_backs_off_from_1s_by_1_5_up_to_10s_then_times_out() -> None:
    fake = FakeTime()
    running = iter(["RUNNING"] * 1000)
    with (
        Client(
            "http://fake",
            "sk-test-fake",
            transport=httpx.MockTransport(poll_answers(running)),
            sleep=fake.sleep,
            clock=fake.clock,
        ) as client,
        pytest.raises(WaitTimeout) as raised,
    ):
        client.wait("exec_1", timeout=60)
    expected = [1, 1.5, 2.25, 3.375, 5.0625, 7.59375, 10, 10, 10]
    assert fake.sleeps == pytest.approx([*expected, 60 - sum(expected)])
    assert raised.value.last.status == "RUNNING"
    assert raised.value.execution_id == "exec_1"
    assert isinstance(raised.value, TimeoutError)

    fake = FakeTime()
    three_then_done = iter(["QUEUED", "RUNNING", "RUNNING", "COMPLETED"])
    with Client(
        "http://fake",
        "sk-test-fake",
        transport=httpx.MockTransport(poll_answers(three_then_done)),
        sleep=fake.sleep,
        clock=fake.clock,
    ) as client:
        assert client.wait("exec_1").status == "COMPLETED"
    assert fake.sleeps == [1, 1.5, 2.25]


# -- triggers and webhooks -------------------------------------------------------------------


async def test_triggers(api: AsyncClient) -> None:
    wf = await api.create_workflow(linear(size=64))
    trigger = await api.create_trigger(wf.id)
    assert trigger.enabled
    assert trigger.workflow_id == wf.id
    assert trigger.url.endswith(f"/api/v1/workflow/{trigger.webhook_id}/trigger")
    assert [t.webhook_id for t in await api.list_triggers(wf.id)] == [trigger.webhook_id]

    handle = await api.fire_trigger(trigger.url, {"Prompt": "from a form"})
    assert handle.status == "QUEUED"
    assert (await api.wait(handle.execution_id, timeout=30)).status == "COMPLETED"
    assert (await api.get_execution(handle.execution_id)).inputs == {"Prompt": "from a form"}

    disabled = await api.set_trigger_enabled(wf.id, trigger.webhook_id, False)
    assert not disabled.enabled
    with pytest.raises(NotFound):
        await api.fire_trigger(trigger.url)
    await api.set_trigger_enabled(wf.id, trigger.webhook_id, True)
    rotated = await api.rotate_trigger(wf.id, trigger.webhook_id)
    assert rotated.url != trigger.url
    with pytest.raises(NotFound):
        await api.fire_trigger(trigger.url)
    await api.delete_trigger(wf.id, rotated.webhook_id)
    assert await api.list_triggers(wf.id) == []


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local HTTP server that accepts webhooks; yields its URL and what it received."""
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_webhook_endpoints_and_deliveries(
    api: AsyncClient, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    import asyncio

    url, received = receiver
    endpoint = await api.create_webhook_endpoint(url, ["execution.completed"], "ci")
    assert endpoint.secret is not None
    assert endpoint.secret.startswith("whsec_")
    assert [(e.id, e.secret) for e in await api.list_webhook_endpoints()] == [(endpoint.id, None)]

    wf = await api.create_workflow(linear(size=64))
    result = await api.run(wf.id, timeout=30)
    for _ in range(200):
        deliveries = (await api.webhook_deliveries(endpoint.id)).items
        if deliveries and deliveries[0].state == "delivered":
            break
        await asyncio.sleep(0.05)
    [delivery] = deliveries
    assert (delivery.state, delivery.event_type, delivery.last_status) == (
        "delivered",
        "execution.completed",
        204,
    )
    assert delivery.attempt_log[0].status_code == 204
    assert received[0]["type"] == "execution.completed"
    assert result.execution_id in json.dumps(received[0])
    assert [d.id for d in (await api.webhook_deliveries()).items] == [delivery.id]

    replayed = await api.replay_delivery(delivery.id)
    assert replayed.id == delivery.id
    assert replayed.state != "delivered"


# -- configuration, models, events -----------------------------------------------------------


def test_default_key_headers_and_base_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGRAPH_API_KEY", raising=False)
    monkeypatch.setenv("IMAGEGRAPH_DATA_DIR", str(tmp_path))
    assert default_api_key() is None
    (tmp_path / "admin.key").write_text("sk-live-fromfile\n")
    assert default_api_key() == "sk-live-fromfile"
    other = tmp_path / "other"
    other.mkdir()
    (other / "admin.key").write_text("sk-live-other")
    assert default_api_key(other) == "sk-live-other"
    monkeypatch.setenv("IMAGEGRAPH_API_KEY", "sk-live-fromenv")
    assert default_api_key() == "sk-live-fromenv"

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/trigger"):
            return httpx.Response(202, json={"executionId": "exec_1", "status": "QUEUED"})
        return httpx.Response(204)

    transport = httpx.MockTransport(handler)
    with Client("http://h:1/", transport=transport) as client:
        client.delete_workflow("wf/../keys")
    with Client("http://h:1/api/v1", "sk-live-given", transport=transport) as client:
        assert client.base_url == "http://h:1/api/v1/"
        client.delete_trigger("wf_1", "wh_1")
    monkeypatch.delenv("IMAGEGRAPH_API_KEY")
    monkeypatch.setenv("IMAGEGRAPH_DATA_DIR", str(tmp_path / "none"))
    with Client("http://h:1", transport=transport) as client:
        client.delete_workflow("wf_2")
    assert seen[0].headers["Authorization"] == "Bearer sk-live-fromenv"
    assert seen[0].headers["User-Agent"] == f"imagegraph-python/{__version__}"
    assert seen[0].url.raw_path == b"/api/v1/workflows/wf%2F..%2Fkeys"
    assert seen[1].headers["Authorization"] == "Bearer sk-live-given"
    assert str(seen[1].url) == "http://h:1/api/v1/workflows/wf_1/triggers/wh_1"
    assert "Authorization" not in seen[2].headers

    with Client("http://h:1", "sk-live-key", transport=transport) as client:
        handle = client.fire_trigger("http://elsewhere/api/v1/workflow/abc/trigger", {"a": 1})
    assert handle.execution_id == "exec_1"
    fired = seen[-1]
    assert "Authorization" not in fired.headers
    assert str(fired.url) == "http://elsewhere/api/v1/workflow/abc/trigger"
    assert fired.headers["Idempotency-Key"]
    assert json.loads(fired.content) == {"a": 1}
    with (
        Client("http://h:1", transport=transport) as client,
        pytest.raises(ValueError, match="not an asset id"),
    ):
        client.download("http://h:1/api/v1/keys")


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    decoder = SSEDecoder()
    lines = [
        ": ping - 2024-01-01",
        "event: node.started",
        'data: {"nodeId": "a",',
        'data: "n": 1}',
        "id: 7",
        "",
        "",  # a blank line without data dispatches nothing
        "retry: 5000",
        "data:plain text",
        "",
    ]
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert events == [
        Event(id="7", type="node.started", data={"nodeId": "a", "n": 1}),
        Event(id="7", type="message", data={"value": "plain text"}),
    ]
    assert decoder.last_id == "7"


def test_the_public_surface() -> None:
    names = imagegraph.client.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(imagegraph.client, name) for name in names)
    public = {n for n in vars(imagegraph.client) if not n.startswith("_")}
    assert public - set(names) <= {"errors", "models"}
    # servers add fields: unknown ones are ignored, and models are immutable
    poll = Poll.model_validate(
        {"executionId": "e", "status": "RUNNING", "outputs": [], "newField": {"x": 1}}
    )
    assert poll.execution_id == "e"
    assert not poll.done
    with pytest.raises(ValueError, match="frozen"):
        poll.status = "COMPLETED"  # type: ignore[misc]


# -- the blocking client against a real server -----------------------------------------------


@pytest.mark.e2e
def test_sync_client_against_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        monkeypatch.delenv("IMAGEGRAPH_API_KEY", raising=False)
        monkeypatch.setenv("IMAGEGRAPH_DATA_DIR", str(server.data_dir))
        assert default_api_key() == server.api_key
        with Client(server.url) as client:  # the key from <data dir>/admin.key
            wf = client.create_workflow(EXAMPLES / "linear.json")
            assert [w.id for w in client.iter_workflows()] == [wf.id]
            result = client.run(wf.id, {"Product": "a leather bag"}, timeout=60)
            assert result.status == "COMPLETED"
            target = tmp_path / "bag.webp"
            data = client.download(result.outputs[0].url, target)
            assert is_webp(data)
            assert target.read_bytes() == data
            assert client.lineage(result.outputs[0].asset_id)[-1].node_id == "generate"

            handle = client.execute(wf.id, {"Product": "a desk lamp"})
            events = list(client.events(handle.execution_id))
            assert events[-1].type == "execution.completed"
            assert client.get_execution(handle.execution_id).status == "COMPLETED"

            trigger = client.create_trigger(wf.id)
            fired = fire_trigger(trigger.url, {"Product": "a kettle"})
            assert client.wait(fired.execution_id, timeout=60).status == "COMPLETED"

            with pytest.raises(NotFound) as raised:
                client.get_execution("exec_nope")
            assert raised.value.request_id
        with Client(server.url, "sk-live-" + "x" * 40) as stranger, pytest.raises(Unauthorized):
            stranger.workspace()
    finally:
        server.stop()
