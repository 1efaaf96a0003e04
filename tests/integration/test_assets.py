"""Uploading and downloading assets, and feeding images into executions with `input:image`
(asset ids, data URIs and URLs fetched from a real local HTTP server)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from tests.builders import edge, node, workflow
from tests.clients import api_client

PROBLEM_JSON = "application/problem+json"
UNKNOWN_ASSET = "asset_01ARZ3NDEKTSV4RRFFQ69G5FAV"


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png(width: int, height: int) -> bytes:
    """A PNG that does not compress well, so its size in bytes is predictable-ish and large."""
    pixels = hashlib.shake_256(b"noise").digest(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG header declaring a huge grayscale canvas (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["detail"]
    return body


async def upload(
    client: httpx.AsyncClient, data: bytes, filename: str = "image.png", mime: str = "image/png"
) -> httpx.Response:
    return await client.post("/api/v1/assets", files={"file": (filename, data, mime)})


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A runtime and API client of their own, for tests that need other settings."""
    runtime = Runtime.build(settings)
    await runtime.start()
    try:
        async with api_client(runtime) as client:
            yield client
    finally:
        await runtime.stop()


@pytest.fixture
async def small_upload_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings.model_copy(update={"max_upload_bytes": 1024})) as client:
        yield client


@pytest.fixture
async def private_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings.model_copy(update={"allow_private_urls": True})) as client:
        yield client


# -- a real HTTP server -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "image/png"
    headers: dict[str, str] = field(default_factory=dict)


class ImageServer:
    """An HTTP server on a free local port, in a thread, answering GETs from a script.

    `replies` are used in order; the last one repeats. `paths` records each request path.
    """

    def __init__(self) -> None:
        self.replies: list[Reply] = [Reply(200, png_bytes(20, 10))]
        self.paths: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reply = server.next_reply(self.path)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def next_reply(self, path: str) -> Reply:
        with self._lock:
            self.paths.append(path)
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def url(self, path: str = "/x.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


# -- executions -------------------------------------------------------------------------------

# The saved workflow's own image: 8x8, so a run that ignored the execution's inputs shows.
PLACEHOLDER = data_uri(png_bytes(8, 8, (0, 0, 255)))


def resize_workflow() -> dict[str, Any]:
    """input:image (label "Image") -> resize to exactly 32x16 -> output."""
    return workflow(
        [
            node("img", "input:image", "Image", image=PLACEHOLDER),
            node("resize", "image:resize", width=32, height=16, mode="exact"),
            node("out", "output:image"),
        ],
        [edge("img", "image", "resize", "image"), edge("resize", "image", "out", "image")],
        name="resize an input",
    )


async def execute(client: httpx.AsyncClient, image: str) -> httpx.Response:
    created = await client.post("/api/v1/workflows", json=resize_workflow())
    assert created.status_code == 201, created.text
    workflow_id = created.json()["id"]
    return await client.post(
        f"/api/v1/workflows/{workflow_id}/execute", json={"inputs": {"Image": image}}
    )


async def run_to_end(
    client: httpx.AsyncClient, image: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Execute, wait for the end; returns the poll body and the execution's details."""
    queued = await execute(client, image)
    assert queued.status_code == 201, queued.text
    execution_id = queued.json()["executionId"]
    polled = await client.get(
        f"/api/v1/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=20"}
    )
    assert polled.status_code == 200, polled.text
    poll: dict[str, Any] = polled.json()
    assert poll["status"] not in ("QUEUED", "RUNNING"), "execution did not end in time"
    details = await client.get(f"/api/v1/workflows/executions/{execution_id}")
    assert details.status_code == 200, details.text
    return poll, details.json()


def node_run(details: dict[str, Any], node_id: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = [n for n in details["nodes"] if n["nodeId"] == node_id]
    assert len(runs) == 1, details["nodes"]
    return runs[0]


def assert_resized(poll: dict[str, Any]) -> None:
    assert poll["status"] == "COMPLETED", poll
    [output] = poll["outputs"]
    assert output["nodeId"] == "out"
    assert (output["width"], output["height"]) == (32, 16)


# -- uploads and downloads --------------------------------------------------------------------


async def test_upload_then_read_metadata_and_content(client: httpx.AsyncClient) -> None:
    data = png_bytes(64, 48)
    created = await upload(client, data, filename="fox.png")
    assert created.status_code == 201, created.text
    asset = created.json()
    assert asset["id"].startswith("asset_")
    assert (asset["width"], asset["height"], asset["format"]) == (64, 48, "png")
    assert asset["sha256"] == hashlib.sha256(data).hexdigest()
    assert asset["sizeBytes"] == len(data)
    assert asset["url"].endswith(f"/api/v1/assets/{asset['id']}/content")
    assert created.headers["location"] == f"/api/v1/assets/{asset['id']}"

    meta = await client.get(f"/api/v1/assets/{asset['id']}")
    assert meta.status_code == 200, meta.text
    assert meta.json()["id"] == asset["id"]
    assert (meta.json()["width"], meta.json()["height"]) == (64, 48)
    assert meta.json()["sha256"] == asset["sha256"]
    assert meta.json()["filename"] == "fox.png"

    content = await client.get(asset["url"])
    assert content.status_code == 200
    assert content.content == data
    assert content.headers["content-type"] == "image/png"
    etag = content.headers["etag"]
    assert asset["sha256"] in etag

    cached = await client.get(asset["url"], headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    assert cached.headers["etag"] == etag

    stale = await client.get(asset["url"], headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200
    assert stale.content == data


async def test_upload_of_a_text_file_is_refused(client: httpx.AsyncClient) -> None:
    response = await upload(client, b"hello, I am not an image\n", "notes.txt", "text/plain")
    body = assert_problem(response, 422, "invalid_image")
    assert "not a supported image" in body["detail"]


async def test_upload_of_an_empty_file_is_refused(client: httpx.AsyncClient) -> None:
    response = await upload(client, b"", "empty.png")
    body = assert_problem(response, 422, "invalid_image")
    assert "empty" in body["detail"]


async def test_upload_over_the_limit_is_413(small_upload_client: httpx.AsyncClient) -> None:
    data = noisy_png(40, 40)
    assert len(data) > 1024
    response = await upload(small_upload_client, data)
    body = assert_problem(response, 413, "payload_too_large")
    assert "1024" in body["detail"]

    # Just under the limit is fine on the same server.
    small = png_bytes(8, 8)
    assert len(small) <= 1024
    accepted = await upload(small_upload_client, small)
    assert accepted.status_code == 201, accepted.text


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # Far beyond any limit: refused while the header is read.
        (100_000, 100_000, "decompression bomb"),
        # Over our limit (50 MP by default) but under Pillow's own: our message.
        (8_000, 8_000, "the limit is 50.0 MP"),
    ],
)
async def test_upload_of_a_decompression_bomb_is_refused(
    client: httpx.AsyncClient, width: int, height: int, expected: str
) -> None:
    data = bomb_png(width, height)
    assert len(data) < 200
    response = await upload(client, data, "bomb.png")
    body = assert_problem(response, 422, "invalid_image")
    assert expected in body["detail"]
    assert "pixels" in body["detail"]
    assert "limit" in body["detail"]


async def test_unknown_asset_is_404(client: httpx.AsyncClient) -> None:
    meta = await client.get(f"/api/v1/assets/{UNKNOWN_ASSET}")
    assert UNKNOWN_ASSET in assert_problem(meta, 404, "not_found")["detail"]
    content = await client.get(f"/api/v1/assets/{UNKNOWN_ASSET}/content")
    assert_problem(content, 404, "not_found")


# -- input:image in executions ----------------------------------------------------------------


async def test_execute_with_an_uploaded_asset(client: httpx.AsyncClient) -> None:
    asset = (await upload(client, png_bytes(64, 48))).json()
    poll, details = await run_to_end(client, asset["id"])
    assert_resized(poll)
    image = node_run(details, "img")["outputs"]["image"]
    assert image["assetId"] == asset["id"]
    assert (image["width"], image["height"]) == (64, 48)

    content = await client.get(poll["outputs"][0]["url"])
    assert content.status_code == 200
    with Image.open(io.BytesIO(content.content)) as result:
        assert result.size == (32, 16)


async def test_execute_with_a_data_uri(client: httpx.AsyncClient) -> None:
    poll, details = await run_to_end(client, data_uri(png_bytes(40, 30)))
    assert_resized(poll)
    image = node_run(details, "img")["outputs"]["image"]
    assert (image["width"], image["height"]) == (40, 30)


async def test_execute_with_a_loopback_url_is_refused_before_queueing(
    client: httpx.AsyncClient, image_server: ImageServer
) -> None:
    response = await execute(client, image_server.url())
    body = assert_problem(response, 422, "invalid_input")
    [issue] = body["errors"]
    assert issue["nodeId"] == "img"
    assert issue["code"] == "unsafe_url"
    assert issue["field"] == "params.image"
    assert "127.0.0.1" in issue["message"]
    assert "loopback" in issue["message"]
    assert "loopback" in body["detail"]
    assert image_server.paths == []

    listed = await client.get("/api/v1/workflows/executions")
    assert listed.status_code == 200, listed.text
    assert listed.json()["items"] == []


async def test_execute_with_an_unknown_asset_is_refused(client: httpx.AsyncClient) -> None:
    response = await execute(client, UNKNOWN_ASSET)
    body = assert_problem(response, 422, "invalid_input")
    [issue] = body["errors"]
    assert issue["nodeId"] == "img"
    assert issue["code"] == "asset_not_found"
    assert UNKNOWN_ASSET in issue["message"]


async def test_execute_fetches_a_url_when_private_urls_are_allowed(
    private_client: httpx.AsyncClient, image_server: ImageServer
) -> None:
    poll, details = await run_to_end(private_client, image_server.url("/cat.png"))
    assert_resized(poll)
    assert image_server.paths == ["/cat.png"]
    run = node_run(details, "img")
    assert run["attempts"] == 1
    image = run["outputs"]["image"]
    assert (image["width"], image["height"]) == (20, 10)
    assert image["generation"] == {"source": "url", "url": image_server.url("/cat.png")}


async def test_a_503_is_retried(
    private_client: httpx.AsyncClient, image_server: ImageServer
) -> None:
    image_server.replies = [
        Reply(503, b"busy", "text/plain", {"Retry-After": "0"}),
        Reply(200, png_bytes(20, 10)),
    ]
    poll, details = await run_to_end(private_client, image_server.url())
    assert_resized(poll)
    assert node_run(details, "img")["attempts"] == 2
    assert image_server.paths == ["/x.png", "/x.png"]


async def test_a_url_that_is_not_an_image_fails_the_node(
    private_client: httpx.AsyncClient, image_server: ImageServer
) -> None:
    image_server.replies = [Reply(200, b"<html>not an image</html>", "text/html")]
    poll, details = await run_to_end(private_client, image_server.url("/page.html"))
    assert poll["status"] == "FAILED", poll
    assert poll["outputs"] == []
    run = node_run(details, "img")
    assert run["status"] == "FAILED"
    assert run["error"]["code"] == "invalid_image"
    assert run["attempts"] == 1  # not worth another attempt
    assert image_server.paths == ["/page.html"]
