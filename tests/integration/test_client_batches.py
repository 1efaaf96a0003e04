"""Batches through the Python client: `AsyncClient` against the app in-process (ASGI), the
blocking `Client` against a real server process. Creating from items or a file, progress,
items page by page, cancel, retry, review, the manifest and the zip; and a manifest entry
run again (`imagegraph.batches.replay`) making the very same image."""

from __future__ import annotations

import asyncio
import io
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegraph.api.app import create_app
from imagegraph.batches.replay import item_run
from imagegraph.client import (
    AsyncClient,
    Batch,
    BatchItem,
    Client,
    Conflict,
    ValidationFailed,
)
from imagegraph.graph.model import parse_workflow
from imagegraph.runtime import Runtime
from tests.builders import edge, linear, node, templated, workflow
from tests.e2e.server import ServerProcess


@pytest.fixture
async def api(runtime: Runtime, admin_key: str) -> AsyncIterator[AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime=runtime))
    async with AsyncClient("http://testserver", admin_key, transport=transport) as client:
        yield client


async def finished(api: AsyncClient, batch_id: str, timeout: float = 30) -> Batch:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (batch := await api.get_batch(batch_id)).done:
        assert loop.time() < deadline, batch
        await asyncio.sleep(0.05)
    return batch


async def all_items(api: AsyncClient, batch_id: str, **kw: Any) -> list[BatchItem]:
    return [item async for item in api.batch_items(batch_id, **kw)]


def cropping() -> dict[str, Any]:
    """Prompt -> sandbox 64x64 -> crop -> output: a crop wider than 64 fails the item."""
    return workflow(
        [
            node("prompt", "input:text", "Prompt", text="x"),
            node("gen", "generate:sandbox", width=64, height=64),
            node("crop", "image:crop", width=32, height=32),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "crop", "image"),
            edge("crop", "image", "out", "image"),
        ],
        name="cropping",
    )


async def test_inline_items_progress_pages_and_seeds(api: AsyncClient) -> None:
    wf = await api.create_workflow(linear(seed=None, size=64))
    created = await api.create_batch(
        wf.id,
        [{"Prompt": "a fox"}, {"Prompt": "a crow"}, {"Prompt": "a fox"}],
        concurrency=2,
        runs_per_item=2,
        seeds={"strategy": "increment", "base": 10},
        name="birds and foxes",
        dedupe=False,
    )
    assert (created.status, created.total, created.deduplicated) == ("RUNNING", 6, 0)
    batch = await finished(api, created.batch_id)
    assert (batch.status, batch.name, batch.workflow_version) == ("COMPLETED", "birds and foxes", 1)
    assert batch.counts.completed == 6
    assert batch.progress == 1.0
    assert batch.options["runsPerItem"] == 2

    items = await all_items(api, created.batch_id, page_size=4)  # two pages
    assert [(i.index, i.run, i.seed) for i in items] == [
        (0, 0, 10),
        (0, 1, 11),
        (1, 0, 12),
        (1, 1, 13),
        (2, 0, 14),
        (2, 1, 15),
    ]
    assert all(i.status == "COMPLETED" and i.attempts == 1 for i in items)
    output = items[0].outputs[0]
    assert output.review_state == "pending-review"
    assert (await api.download(output.url))[:4] == b"\x89PNG"
    page = await api.list_batch_items(created.batch_id, "FAILED")
    assert (page.items, page.next_cursor) == ([], None)


async def test_a_file_upload_and_its_line_numbered_refusal(
    api: AsyncClient, runtime: Runtime, tmp_path: Path
) -> None:
    wf = await api.create_workflow(templated())
    good = tmp_path / "items.csv"
    good.write_text("Subject,style\na lighthouse,ink\na harbour,oil\n")
    created = await api.create_batch(wf.id, file=good, concurrency=1)
    assert created.total == 2
    assert (await finished(api, created.batch_id)).counts.completed == 2

    bad = tmp_path / "bad.csv"
    bad.write_text("Subject,style\na,b\nc\n")
    with pytest.raises(ValidationFailed) as raised:
        await api.create_batch(wf.id, file=bad)
    assert "bad.csv line 3: has 1 cells, the header has 2" in raised.value.detail
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"Subject": "a"}\n{"Subject": \n')
    with pytest.raises(ValidationFailed, match="line 2: not valid JSON"):
        await api.create_batch(wf.id, file=jsonl)
    with pytest.raises(ValueError, match="either items or file"):
        await api.create_batch(wf.id, [{"Subject": "a"}], good)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime=runtime)),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {runtime.bootstrap_key}"},
    ) as raw:
        listed = (await raw.get("/api/v1/batches")).json()["items"]
    assert [b["batchId"] for b in listed] == [created.batch_id]  # nothing else queued


async def test_review_manifest_and_zip(api: AsyncClient, tmp_path: Path) -> None:
    wf = await api.create_workflow(linear(seed=None, size=64))
    created = await api.create_batch(wf.id, [{"Prompt": f"p{i}"} for i in range(3)])
    await finished(api, created.batch_id)
    items = await all_items(api, created.batch_id)

    assert await api.review_batch(created.batch_id, "approved", item_ids=[items[0].item_id]) == 1
    rejected = await api.set_review(items[1].outputs[0].asset_id, "rejected", note="too dark")
    assert rejected.review_state == "rejected"
    assert (await api.get_asset(items[1].outputs[0].asset_id)).review_state == "rejected"
    assert await api.review_batch(created.batch_id, "approved", current_state="pending-review") == 1

    manifest = await api.batch_manifest(created.batch_id)
    assert manifest["batchId"] == created.batch_id
    files = [e["outputs"][0]["file"] for e in manifest["items"]]
    assert files == ["approved/00000-out.png", "rejected/00001-out.png", "approved/00002-out.png"]
    assert manifest["items"][1]["outputs"][0]["reviewNote"] == "too dark"

    zips = tmp_path / "zips"
    zips.mkdir()
    target = await api.download_batch_zip(created.batch_id, zips / "batch.zip")
    assert target == zips / "batch.zip"
    assert [p.name for p in zips.iterdir()] == ["batch.zip"]  # no partial file left
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        folder = manifest["folder"]
        assert {f"{folder}/{f}" for f in files} | {f"{folder}/manifest.json"} <= names
        first = archive.read(f"{folder}/{files[0]}")
    assert first == await api.download(items[0].outputs[0].asset_id)


async def test_cancel_then_retry_failed(api: AsyncClient) -> None:
    slow = await api.create_workflow(linear(seed=None, size=64, delay_ms=2000))
    created = await api.create_batch(slow.id, [{"Prompt": f"p{i}"} for i in range(4)])
    cancelled = await api.cancel_batch(created.batch_id)
    assert cancelled.status == "CANCELLED"
    assert cancelled.done
    with pytest.raises(Conflict):
        await api.cancel_batch(created.batch_id)

    crop = await api.create_workflow(cropping())
    created = await api.create_batch(
        crop.id, [{"Prompt": "fits"}, {"Prompt": "too wide", "crop.width": 100}]
    )
    batch = await finished(api, created.batch_id)
    assert (batch.status, batch.counts.completed, batch.counts.failed) == ("COMPLETED", 1, 1)
    failed = await all_items(api, created.batch_id, status="FAILED")
    assert [i.index for i in failed] == [1]
    assert "outside the 64x64 image" in str(failed[0].error)
    retry = await api.retry_failed(created.batch_id, [failed[0].item_id])
    assert retry.retried == 1
    assert retry.batch.status == "RUNNING"
    again = await finished(api, created.batch_id)
    assert again.counts.failed == 1
    assert [i.attempts for i in await all_items(api, created.batch_id)] == [1, 2]


async def test_a_manifest_entry_run_again_makes_the_same_image(
    api: AsyncClient, runtime: Runtime
) -> None:
    """Every run of a batch with an item column, a param column, shared inputs and overrides,
    variants and a library negative prompt, made again from its manifest entry alone."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime=runtime)),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {runtime.bootstrap_key}"},
    ) as raw:
        put = await raw.put("/api/v1/negative-prompts/clean", json={"text": "watermark"})
        assert put.status_code == 201
    wf = await api.create_workflow(templated())
    await api.update_workflow(wf.id, {**templated(), "description": "the second version"})
    created = await api.create_batch(
        wf.id,
        [{"Subject": "a fox", "gen.steps": 5}, {"Subject": "a crow", "style": "ink"}],
        workflow_version=1,
        inputs={"style": "oil"},
        nodes=[{"id": "gen", "data": {"params": {"guidance": 3}}}],
        variants=[
            {
                "name": "A",
                "nodes": [{"id": "tpl", "data": {"params": {"template": "${subject}, ${style}"}}}],
            },
            {"name": "B", "nodes": [{"id": "gen", "data": {"params": {"steps": 12}}}]},
        ],
        negative_prompts=["clean"],
        runs_per_item=2,
    )
    assert (await finished(api, created.batch_id)).counts.completed == 8
    manifest = await api.batch_manifest(created.batch_id)
    assert manifest["workflowVersion"] == 1
    assert manifest["options"]["negativeText"] == "watermark"
    saved = await api.get_workflow(wf.id, manifest["workflowVersion"])
    doc = parse_workflow(saved.document())
    shas = set()
    for entry in manifest["items"]:
        again = item_run(
            doc,
            runtime.registry,
            manifest["options"],
            entry["inputs"],
            entry["seed"],
            entry["variant"],
        )
        result = await api.run(
            wf.id, again.inputs, nodes=again.overrides, version=saved.version, timeout=30
        )
        assert result.status == "COMPLETED", result.error
        made = result.outputs[0]
        recorded = entry["outputs"][0]
        assert made.sha256 == recorded["sha256"], entry
        asset = await api.get_asset(made.asset_id)
        assert (asset.prompt, asset.negative_prompt, asset.seed) == (
            recorded["prompt"],
            recorded["negativePrompt"],
            recorded["seed"],
        )
        shas.add(made.sha256)
    assert len(shas) == 8  # every run its own image: the check above means something
    with pytest.raises(ValueError, match="no variant 'C'"):
        item_run(doc, runtime.registry, manifest["options"], {"Subject": "x"}, 1, "C")


# -- the blocking client against a real server -----------------------------------------------


@pytest.mark.e2e
def test_sync_client_batches_against_a_server(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        with Client(server.url, server.api_key) as client:
            wf = client.create_workflow(linear(seed=None, size=64))
            items = tmp_path / "items.jsonl"
            items.write_text('{"Prompt": "a"}\n{"Prompt": "b"}\n{"Prompt": "a"}\n')
            created = client.create_batch(wf.id, file=items, concurrency=2)
            assert (created.total, created.deduplicated) == (3, 1)
            while not (batch := client.get_batch(created.batch_id)).done:
                time.sleep(0.05)
            assert batch.counts.completed == 3
            found = list(client.batch_items(created.batch_id, page_size=2))
            assert [i.duplicate_of for i in found] == [None, None, found[0].item_id]
            assert client.review_batch(created.batch_id, "rejected", item_ids=[2]) == 1
            asset = client.set_review(found[0].outputs[0].asset_id, "approved", "good")
            assert asset.review_state == "approved"
            manifest = client.batch_manifest(created.batch_id)
            archive = client.download_batch_zip(created.batch_id, tmp_path / "b.zip")
            with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as zipped:
                assert f"{manifest['folder']}/approved/00000-out.png" in zipped.namelist()
            retried = client.retry_failed(created.batch_id)
            assert (retried.retried, retried.batch.status) == (0, "COMPLETED")
            with pytest.raises(Conflict):
                client.cancel_batch(created.batch_id)
            items.write_text('{"Prompt": "a"}\n[1]\n')
            with pytest.raises(ValidationFailed, match="line 2"):
                client.create_batch(wf.id, file=items)
    finally:
        server.stop()
