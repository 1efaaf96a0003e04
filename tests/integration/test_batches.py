"""Batches through the API: items inline or from files, concurrency, dedupe, seeds, runs,
variants, cancel, retry, review, manifest and export (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store.tables import executions, webhook_deliveries
from tests.builders import edge, linear, node, templated, workflow
from tests.clients import api_client, started_runtime

pytestmark = pytest.mark.asyncio
HOOK = "http://127.0.0.1:9/hook"


async def _workflow(client: httpx.AsyncClient, doc: dict[str, Any] | None = None) -> str:
    response = await client.post("/api/v1/workflows", json=doc or linear(seed=None, size=64))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _variant(name: str, template: str | None = None) -> dict[str, Any]:
    """A prompt variant that replaces the template node's template (or changes nothing)."""
    nodes = [] if template is None else [{"id": "tpl", "data": {"params": {"template": template}}}]
    return {"name": name, "nodes": nodes}


async def _wait(client: httpx.AsyncClient, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        body: dict[str, Any] = (await client.get(f"/api/v1/batches/{batch_id}")).json()
        if body["status"] != "RUNNING":
            return body
        assert loop.time() < deadline, body
        await asyncio.sleep(0.05)


async def _posted(client: httpx.AsyncClient, workflow_id: str, items: int, concurrency: int) -> str:
    """A batch of `items` prompts ("p0", "p1", ...) of the workflow: its id."""
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": [{"Prompt": f"p{i}"} for i in range(items)],
            "concurrency": concurrency,
        },
    )
    assert response.status_code == 201, response.text
    batch_id: str = response.json()["batchId"]
    return batch_id


async def _started(
    client: httpx.AsyncClient, delay_ms: int, items: int, concurrency: int
) -> tuple[str, str]:
    """A batch of a slow workflow, once `concurrency` of its items run: (workflow, batch)."""
    workflow_id = await _workflow(client, linear(seed=None, size=64, delay_ms=delay_ms))
    batch_id = await _posted(client, workflow_id, items, concurrency)
    while (await client.get(f"/api/v1/batches/{batch_id}")).json()["counts"][
        "running"
    ] < concurrency:
        await asyncio.sleep(0.02)
    return workflow_id, batch_id


async def _items(client: httpx.AsyncClient, batch_id: str, **params: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 200, **params, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/api/v1/batches/{batch_id}/items", params=query)).json()
        found += page["items"]
        cursor = page["nextCursor"]
        if cursor is None:
            return found


async def test_inline_batch_runs_every_item_and_reports_progress(
    client: httpx.AsyncClient,
) -> None:
    workflow_id = await _workflow(client)
    items = [{"Prompt": f"item {i}"} for i in range(12)]
    response = await client.post(
        "/api/v1/batches", json={"workflowId": workflow_id, "items": items, "concurrency": 3}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["total"] == 12
    body = await _wait(client, created["batchId"])
    assert body["status"] == "COMPLETED"
    assert body["counts"]["completed"] == 12
    assert body["progress"] == 1.0
    found = await _items(client, created["batchId"])
    assert [i["index"] for i in found] == list(range(12))
    assert all(i["status"] == "COMPLETED" and len(i["outputs"]) == 1 for i in found)
    # hash seeds: distinct per item, recorded, and applied to the generation
    seeds = {i["seed"] for i in found}
    assert len(seeds) == 12
    asset = (await client.get(f"/api/v1/assets/{found[0]['outputs'][0]['assetId']}")).json()
    assert asset["seed"] == found[0]["seed"]
    assert asset["prompt"] == "item 0"
    assert asset["reviewState"] == "pending-review"


async def test_concurrency_limit_is_never_exceeded(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    doc = linear(seed=None, size=64, delay_ms=100)
    batch_id = await _posted(client, await _workflow(client, doc), items=20, concurrency=4)
    peak = 0
    while True:
        body = (await client.get(f"/api/v1/batches/{batch_id}")).json()
        peak = max(peak, body["counts"]["running"])
        counts = body["counts"]
        assert (
            counts["pending"]
            + counts["running"]
            + counts["completed"]
            + counts["failed"]
            + counts["cancelled"]
            == 20
        )
        if body["status"] != "RUNNING":
            break
        await asyncio.sleep(0.02)
    assert peak == 4
    assert body["counts"]["completed"] == 20


async def test_an_item_s_end_starts_the_next_item_in_the_same_transaction(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    batch_id = await _posted(client, await _workflow(client), items=4, concurrency=1)
    assert (await _wait(client, batch_id))["counts"]["completed"] == 4
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(executions.c.created_at, executions.c.finished_at)
            .where(executions.c.batch_id == batch_id)
            .order_by(executions.c.batch_item_id)
        ).all()
    # The first item was started by the dispatcher; each of the others by the transaction
    # that ended the one before it (one timestamp for both), so no slot waited.
    assert len(rows) == 4
    for before, after in itertools.pairwise(rows):
        assert after.created_at == before.finished_at


async def test_dedupe_runs_identical_items_once_and_shares_the_result(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    workflow_id = await _workflow(client)
    items = [{"Prompt": f"p{i % 5}"} for i in range(10)]
    response = await client.post(
        "/api/v1/batches", json={"workflowId": workflow_id, "items": items}
    )
    assert response.json()["deduplicated"] == 5
    body = await _wait(client, response.json()["batchId"])
    assert body["counts"]["completed"] == 10
    found = await _items(client, body["batchId"])
    executions = {i["executionId"] for i in found}
    assert len(executions) == 5
    assert found[5]["duplicateOf"] == found[0]["itemId"]
    assert found[5]["outputs"][0]["assetId"] == found[0]["outputs"][0]["assetId"]
    listed = (await client.get("/api/v1/workflows/executions", params={"limit": 100})).json()
    assert len(listed["items"]) == 5


async def test_without_dedupe_identical_items_run_apart(client: httpx.AsyncClient) -> None:
    workflow_id = await _workflow(client)
    items = [{"Prompt": "same"}] * 4
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": items,
            "dedupe": False,
            "seeds": {"strategy": "increment", "base": 100},
        },
    )
    body = await _wait(client, response.json()["batchId"])
    found = await _items(client, body["batchId"])
    assert [i["seed"] for i in found] == [100, 101, 102, 103]
    assert len({i["executionId"] for i in found}) == 4


async def test_runs_per_item_make_variants_with_consecutive_seeds(
    client: httpx.AsyncClient,
) -> None:
    workflow_id = await _workflow(client)
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": [{"Prompt": "a", "seed": 40}, {"Prompt": "b"}],
            "runsPerItem": 3,
            "seeds": {"strategy": "fixed", "base": 7},
        },
    )
    assert response.json()["total"] == 6
    body = await _wait(client, response.json()["batchId"])
    found = await _items(client, body["batchId"])
    assert [(i["index"], i["run"], i["seed"]) for i in found] == [
        (0, 0, 40),
        (0, 1, 41),
        (0, 2, 42),
        (1, 0, 7),
        (1, 1, 8),
        (1, 2, 9),
    ]
    hashes = set()
    for item in found:
        asset = (await client.get(f"/api/v1/assets/{item['outputs'][0]['assetId']}")).json()
        hashes.add(asset["sha256"])
    assert len(hashes) == 6


async def test_csv_upload_fills_template_variables_and_negative_library(
    client: httpx.AsyncClient,
) -> None:
    workflow_id = await _workflow(client, templated())
    put = await client.put("/api/v1/negative-prompts/clean", json={"text": "watermark, text"})
    assert put.status_code == 201
    csv_text = "Subject,style\na lighthouse,ink\na harbour,oil\n"
    response = await client.post(
        "/api/v1/batches",
        files={"file": ("items.csv", csv_text.encode(), "text/csv")},
        data={"options": json.dumps({"workflowId": workflow_id, "negativePrompts": ["clean"]})},
    )
    assert response.status_code == 201, response.text
    body = await _wait(client, response.json()["batchId"])
    assert body["counts"]["completed"] == 2
    found = await _items(client, body["batchId"])
    first = (await client.get(f"/api/v1/assets/{found[0]['outputs'][0]['assetId']}")).json()
    assert first["prompt"] == "a lighthouse in ink style"
    assert first["negativePrompt"] == "blurry, watermark, text"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty"),
        (b"Subject\n", "no rows"),
        (b"Subject,style\na,b\nc\n", "line 3: has 1 cells, the header has 2"),
        (b"Colour\nred\n", "column 'Colour' is not an input"),
        (b"style\nink\n", "no column gives input 'Subject'"),
    ],
)
async def test_bad_files_are_refused_naming_the_line_and_nothing_is_queued(
    client: httpx.AsyncClient, content: bytes, needle: str
) -> None:
    workflow_id = await _workflow(client, templated())
    response = await client.post(
        "/api/v1/batches",
        files={"file": ("items.csv", content, "text/csv")},
        data={"options": json.dumps({"workflowId": workflow_id})},
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert needle in problem["detail"], problem
    assert (await client.get("/api/v1/batches")).json()["items"] == []


async def test_malformed_jsonl_line_is_named(client: httpx.AsyncClient) -> None:
    workflow_id = await _workflow(client)
    content = b'{"Prompt": "a"}\n{"Prompt": "b"\n{"Prompt": "c"}\n'
    response = await client.post(
        "/api/v1/batches",
        files={"file": ("items.jsonl", content, "application/jsonl")},
        data={"options": json.dumps({"workflowId": workflow_id})},
    )
    assert response.status_code == 422
    assert "line 2: not valid JSON" in response.json()["detail"]


async def test_a_bad_value_names_its_item_and_node(client: httpx.AsyncClient) -> None:
    workflow_id = await _workflow(client)
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": [{"Prompt": "ok"}, {"Prompt": "ok", "gen.width": 5}],
        },
    )
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert errors[0]["message"].startswith("items[1]:")
    assert errors[0]["nodeId"] == "gen"


async def test_cancel_stops_pending_and_running_items(client: httpx.AsyncClient) -> None:
    _, batch_id = await _started(client, delay_ms=2000, items=10, concurrency=2)
    cancelled = await client.post(f"/api/v1/batches/{batch_id}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["status"] == "CANCELLED"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while body["counts"]["running"]:
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
        body = (await client.get(f"/api/v1/batches/{batch_id}")).json()
    assert body["counts"]["cancelled"] == 10
    again = await client.post(f"/api/v1/batches/{batch_id}/cancel")
    assert again.status_code == 409


async def test_review_manifest_export_and_zip(
    client: httpx.AsyncClient, runtime: Runtime, tmp_path: Path
) -> None:
    workflow_id = await _workflow(client)
    response = await client.post(
        "/api/v1/batches",
        json={"workflowId": workflow_id, "items": [{"Prompt": f"p{i}"} for i in range(4)]},
    )
    batch_id = response.json()["batchId"]
    await _wait(client, batch_id)
    found = await _items(client, batch_id)
    first_asset = found[0]["outputs"][0]["assetId"]
    patched = await client.patch(
        f"/api/v1/assets/{first_asset}", json={"reviewState": "rejected", "reviewNote": "off"}
    )
    assert patched.status_code == 200
    assert patched.json()["reviewState"] == "rejected"
    bulk = await client.post(
        f"/api/v1/batches/{batch_id}/review",
        json={"state": "approved", "currentState": "pending-review"},
    )
    assert bulk.json()["updated"] == 3

    manifest = (await client.get(f"/api/v1/batches/{batch_id}/manifest")).json()
    assert manifest["workflowId"] == workflow_id
    entry = manifest["items"][0]
    assert entry["inputs"] == {"Prompt": "p0"}
    output = entry["outputs"][0]
    assert output["reviewState"] == "rejected"
    assert output["file"] == "rejected/00000-out.png"
    assert output["seed"] == entry["seed"]
    assert output["provider"] == "sandbox"
    assert entry["workflowVersion"] == 1
    assert entry["timings"]["durationMs"] >= 0

    exported = await client.post(f"/api/v1/batches/{batch_id}/export", json={"directory": "x"})
    assert exported.status_code == 200, exported.text
    root = Path(exported.json()["path"])
    assert root.name == manifest["folder"]
    assert root.parent == runtime.settings.export_dir_or_default() / "x"
    assert sorted(p.name for p in (root / "approved").iterdir()) == [
        "00001-out.png",
        "00002-out.png",
        "00003-out.png",
    ]
    assert [p.name for p in (root / "rejected").iterdir()] == ["00000-out.png"]
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["items"] == manifest["items"]

    zipped = await client.get(f"/api/v1/batches/{batch_id}/export.zip")
    assert zipped.status_code == 200
    assert zipped.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()
    assert f"{manifest['folder']}/approved/00001-out.png" in names
    assert f"{manifest['folder']}/manifest.json" in names


async def test_variants_run_the_same_items_with_the_same_seeds(
    client: httpx.AsyncClient,
) -> None:
    workflow_id = await _workflow(client, templated())
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": [{"Subject": "a fox"}, {"Subject": "a crow"}],
            "variants": [
                _variant("A", "${subject}, ${style} photo"),
                _variant("B", "${subject}, ${style} sketch"),
            ],
        },
    )
    assert response.status_code == 201, response.text
    body = await _wait(client, response.json()["batchId"])
    assert body["counts"]["completed"] == 4
    compared = (await client.get(f"/api/v1/batches/{body['batchId']}/compare")).json()
    assert compared["variants"] == ["A", "B"]
    row = compared["rows"][0]
    assert row["variants"]["A"]["seed"] == row["variants"]["B"]["seed"]
    a = (await client.get(f"/api/v1/assets/{row['variants']['A']['outputs'][0]['assetId']}")).json()
    b = (await client.get(f"/api/v1/assets/{row['variants']['B']['outputs'][0]['assetId']}")).json()
    assert a["prompt"] == "a fox, watercolor photo"
    assert b["prompt"] == "a fox, watercolor sketch"
    assert compared["summary"]["A"]["completed"] == 2


async def test_batch_end_is_announced_to_its_webhook(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    workflow_id = await _workflow(client)
    refused = await client.post(
        "/api/v1/batches",
        json={"workflowId": workflow_id, "items": [{"Prompt": "a"}], "webhookUrl": HOOK},
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "webhookUrl"


async def test_batch_end_writes_its_webhook_delivery(settings: Settings) -> None:
    async with (
        started_runtime(settings, allow_private_webhooks=True) as runtime,
        api_client(runtime) as client,
    ):
        workflow_id = await _workflow(client)
        response = await client.post(
            "/api/v1/batches",
            json={
                "workflowId": workflow_id,
                "items": [{"Prompt": "a"}, {"Prompt": "b"}],
                "webhookUrl": HOOK,
            },
        )
        assert response.status_code == 201, response.text
        await _wait(client, response.json()["batchId"])
        with runtime.db.read() as conn:
            rows = conn.execute(
                select(webhook_deliveries.c.event_type, webhook_deliveries.c.payload).where(
                    webhook_deliveries.c.url == HOOK
                )
            ).all()
    assert [r.event_type for r in rows] == ["batch.completed"]
    assert rows[0].payload["data"]["completed"] == 2


async def test_manifest_flags_near_duplicate_outputs_across_items(
    client: httpx.AsyncClient,
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    uploaded = await client.post(
        "/api/v1/assets", files={"file": ("ref.png", buffer.getvalue(), "image/png")}
    )
    reference = uploaded.json()["id"]
    doc = workflow(
        [
            node("prompt", "input:text", "Prompt"),
            node("gen", "generate:sandbox", width=64, height=64),
            node("sim", "quality:similarity", referenceAssetId=reference, minSsim=0),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "sim", "image"),
            edge("sim", "image", "out", "image"),
        ],
    )
    workflow_id = await _workflow(client, doc)
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": [{"Prompt": p} for p in ("a fox", "a crow", "a fox", "a hare")],
            "dedupe": False,
            "seeds": {"strategy": "fixed", "base": 3},
        },
    )
    assert response.status_code == 201, response.text
    await _wait(client, response.json()["batchId"])
    manifest = (await client.get(f"/api/v1/batches/{response.json()['batchId']}/manifest")).json()
    outputs = [entry["outputs"][0] for entry in manifest["items"]]
    assert all(len(o["quality"]["phash"]) == 16 for o in outputs)
    assert manifest["nearDuplicates"] == [
        {
            "assetId": outputs[2]["assetId"],
            "file": "pending-review/00002-out.png",
            "nearDuplicateOf": outputs[0]["assetId"],
            "keeperFile": "pending-review/00000-out.png",
            "distance": 0,
        }
    ]
    assert outputs[2]["nearDuplicateOf"] == outputs[0]["assetId"]


async def test_a_variant_may_use_a_column_the_saved_template_does_not(
    client: httpx.AsyncClient,
) -> None:
    workflow_id = await _workflow(client, templated())
    response = await client.post(
        "/api/v1/batches",
        json={
            "workflowId": workflow_id,
            "items": [{"Subject": "a fox", "mood": "misty"}],
            "variants": [
                _variant("plain"),
                _variant("moody", "${subject}, ${mood}, ${style}"),
            ],
        },
    )
    assert response.status_code == 201, response.text
    body = await _wait(client, response.json()["batchId"])
    assert body["counts"]["completed"] == 2
    found = await _items(client, body["batchId"])
    prompts = {}
    for item in found:
        asset = (await client.get(f"/api/v1/assets/{item['outputs'][0]['assetId']}")).json()
        prompts[item["variant"]] = asset["prompt"]
    assert prompts == {
        "plain": "a fox in watercolor style",
        "moody": "a fox, misty, watercolor",
    }


async def test_a_quality_gate_decides_the_review_state_of_batch_outputs(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    doc = workflow(
        [
            node("prompt", "input:text", "Prompt"),
            node("gen", "generate:sandbox", width=64, height=64),
            node("check", "quality:check", minWidth=100),
            node("gate", "quality:gate", maxAttempts=2, onExhausted="reject"),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "check", "image"),
            edge("check", "image", "gate", "image"),
            edge("check", "passed", "gate", "passed"),
            edge("gate", "image", "out", "image"),
        ],
    )
    workflow_id = await _workflow(client, doc)
    csv_text = "Prompt,gen.width\na small one,64\na big one,128\n"
    response = await client.post(
        "/api/v1/batches",
        files={"file": ("items.csv", csv_text.encode(), "text/csv")},
        data={"options": json.dumps({"workflowId": workflow_id})},
    )
    assert response.status_code == 201, response.text
    batch_id = response.json()["batchId"]
    body = await _wait(client, batch_id)
    assert body["counts"]["completed"] == 2
    manifest = (await client.get(f"/api/v1/batches/{batch_id}/manifest")).json()
    small, big = (entry["outputs"][0] for entry in manifest["items"])
    assert small["reviewState"] == "rejected"
    assert small["file"] == "rejected/00000-out.png"
    assert big["reviewState"] == "approved"
    assert big["width"] == 128
    assert big["quality"]["sharpness"] > 0
    # the small item was generated twice (the gate sent it back once), the big one once
    record = (
        await client.get(f"/api/v1/workflows/executions/{manifest['items'][0]['executionId']}")
    ).json()
    gen = next(n for n in record["nodes"] if n["nodeId"] == "gen")
    assert gen["regenerations"] == 1
    exported = await client.post(f"/api/v1/batches/{batch_id}/export")
    root = Path(exported.json()["path"])
    assert [p.name for p in (root / "approved").iterdir()] == ["00001-out.png"]
    assert [p.name for p in (root / "rejected").iterdir()] == ["00000-out.png"]


async def test_a_10000_line_file_is_accepted_in_one_request_and_cancelled_mid_batch(
    client: httpx.AsyncClient,
) -> None:
    workflow_id = await _workflow(client, linear(seed=None, size=64, delay_ms=200))
    lines = ["Prompt,gen.steps"] + [f"product {i},{1 + i % 50}" for i in range(10_000)]
    response = await client.post(
        "/api/v1/batches",
        files={"file": ("items.csv", "\n".join(lines).encode(), "text/csv")},
        data={"options": json.dumps({"workflowId": workflow_id, "concurrency": 20})},
    )
    assert response.status_code == 201, response.text
    assert response.json()["total"] == 10_000
    batch_id = response.json()["batchId"]
    while (await client.get(f"/api/v1/batches/{batch_id}")).json()["counts"]["completed"] < 20:
        await asyncio.sleep(0.05)
    cancelled = (await client.post(f"/api/v1/batches/{batch_id}/cancel")).json()
    assert cancelled["status"] == "CANCELLED"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    body = cancelled
    while body["counts"]["running"]:
        assert loop.time() < deadline, body
        await asyncio.sleep(0.05)
        body = (await client.get(f"/api/v1/batches/{batch_id}")).json()
    counts = body["counts"]
    assert counts["completed"] >= 20
    assert counts["completed"] + counts["cancelled"] == 10_000
    assert counts["pending"] == 0
    last = (
        await client.get(f"/api/v1/batches/{batch_id}/items", params={"status": "CANCELLED"})
    ).json()["items"][0]
    assert last["status"] == "CANCELLED"
    assert last["executionId"] is None or last["executionId"].startswith("exec_")


async def test_a_batch_runs_its_pinned_version_to_the_end_if_the_workflow_is_deleted(
    client: httpx.AsyncClient,
) -> None:
    workflow_id, batch_id = await _started(client, delay_ms=300, items=6, concurrency=2)
    assert (await client.delete(f"/api/v1/workflows/{workflow_id}")).status_code == 204
    body = await _wait(client, batch_id)
    assert body["status"] == "COMPLETED"
    assert body["counts"]["completed"] == 6
