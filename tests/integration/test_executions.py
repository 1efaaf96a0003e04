"""Executions through the API: outputs, records, events, cancel, concurrency, failures,
cache, branches."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime
from typing import Any

import httpx

from imagegraph.runtime import Runtime
from tests.builders import edge, fan_out, linear, node, workflow

API = "/api/v1"


async def create(client: httpx.AsyncClient, document: dict[str, Any]) -> str:
    response = await client.post(f"{API}/workflows", json=document)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def execute(client: httpx.AsyncClient, workflow_id: str, **body: Any) -> str:
    response = await client.post(f"{API}/workflows/{workflow_id}/execute", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "QUEUED"
    return str(response.json()["executionId"])


async def finish(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    response = await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=30"}
    )
    body: dict[str, Any] = response.json()
    assert body["status"] in ("COMPLETED", "FAILED", "CANCELLED"), body
    return body


async def record(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    response = await client.get(f"{API}/workflows/executions/{execution_id}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def nodes_by_id(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["nodeId"]: n for n in rec["nodes"]}


async def test_outputs_carry_everything_needed_to_download(client: httpx.AsyncClient) -> None:
    execution_id = await execute(client, await create(client, linear(size=160)))
    polled = await finish(client, execution_id)
    assert polled["status"] == "COMPLETED"
    assert polled["error"] is None
    [output] = polled["outputs"]
    assert output["nodeId"] == "out"
    assert (output["width"], output["height"], output["format"]) == (160, 160, "png")
    content = await client.get(output["url"])
    assert content.headers["content-type"] == "image/png"
    assert hashlib.sha256(content.content).hexdigest() == output["sha256"]


async def test_inputs_by_label_and_by_id(client: httpx.AsyncClient) -> None:
    workflow_id = await create(client, linear())
    by_label = await execute(client, workflow_id, inputs={"Prompt": "a lighthouse"})
    by_id = await execute(client, workflow_id, inputs={"prompt": "a lighthouse"})
    outputs = [(await finish(client, e))["outputs"][0]["sha256"] for e in (by_label, by_id)]
    assert outputs[0] == outputs[1]  # same prompt and seed: the same image
    asset = (
        await client.get(
            f"{API}/assets/{(await finish(client, by_label))['outputs'][0]['assetId']}"
        )
    ).json()
    assert asset["prompt"] == "a lighthouse"
    assert asset["seed"] == 7
    assert asset["model"] == "sandbox"
    assert asset["executionId"] == by_label
    assert asset["nodeId"] == "out"
    assert asset["params"]["width"] == 128


async def test_param_overrides_and_pinned_versions(client: httpx.AsyncClient) -> None:
    workflow_id = await create(client, linear(size=128))
    overridden = await execute(
        client,
        workflow_id,
        nodes=[{"id": "gen", "data": {"params": {"width": 96, "height": 64}}}],
        edges=[],
    )
    assert (await finish(client, overridden))["outputs"][0]["width"] == 96
    await client.put(f"{API}/workflows/{workflow_id}", json=linear(size=200))
    old = await execute(client, workflow_id, version=1)
    new = await execute(client, workflow_id)
    assert (await finish(client, old))["outputs"][0]["width"] == 128
    assert (await finish(client, new))["outputs"][0]["width"] == 200
    assert (await record(client, old))["workflowVersion"] == 1


async def test_bad_execute_requests_are_422_naming_the_problem(client: httpx.AsyncClient) -> None:
    workflow_id = await create(client, linear())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"inputs": {"Nope": "x"}}, "inputs.Nope"),
        ({"nodes": [{"id": "ghost", "data": {"params": {}}}]}, "nodes[0].id"),
        ({"nodes": [{"id": "gen", "data": {"params": {"width": 9999}}}]}, "params.width"),
        ({"edges": [{"source": "a", "target": "b"}]}, "edges"),
        ({"unexpected": 1}, "unexpected"),
        ({"inputs": "not an object"}, "inputs"),
    ]
    for body, field in cases:
        response = await client.post(f"{API}/workflows/{workflow_id}/execute", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        fields = [e.get("field") for e in response.json()["errors"]]
        assert field in fields, (body, response.json())
    assert (await client.get(f"{API}/workflows/executions")).json()["items"] == []


async def test_full_record_has_per_node_details_and_totals(client: httpx.AsyncClient) -> None:
    execution_id = await execute(client, await create(client, linear()))
    await finish(client, execution_id)
    rec = await record(client, execution_id)
    assert rec["status"] == "COMPLETED"
    assert rec["workflowVersion"] == 1
    assert rec["durationMs"] > 0
    for item in rec["nodes"]:
        assert item["status"] == "SUCCEEDED"
        assert item["attempts"] == 1
        assert item["cached"] is False
        assert item["credits"] == 0
        assert datetime.fromisoformat(item["finishedAt"]) >= datetime.fromisoformat(
            item["startedAt"]
        )
        assert item["durationMs"] >= 0
        assert item["error"] is None
    gen = nodes_by_id(rec)["gen"]
    assert gen["outputs"]["image"]["url"].endswith(
        f"/assets/{gen['outputs']['image']['assetId']}/content"
    )
    assert nodes_by_id(rec)["prompt"]["outputs"]["text"]["value"] == "a red fox in the snow"
    assert nodes_by_id(rec)["prompt"]["label"] == "Prompt"
    totals = rec["totals"]
    assert (totals["nodes"], totals["succeeded"], totals["failed"], totals["outputs"]) == (
        3,
        3,
        0,
        1,
    )
    assert totals["attempts"] == 3


async def test_independent_branches_run_at_the_same_time(client: httpx.AsyncClient) -> None:
    execution_id = await execute(client, await create(client, fan_out(delay_ms=1000)))
    assert (await finish(client, execution_id))["status"] == "COMPLETED"
    generators = [
        n
        for n in (await record(client, execution_id))["nodes"]
        if n["nodeType"] == "generate:sandbox"
    ]
    assert len(generators) == 4
    starts = [datetime.fromisoformat(n["startedAt"]) for n in generators]
    ends = [datetime.fromisoformat(n["finishedAt"]) for n in generators]
    # Every generator started before any of them finished: they overlapped, not queued.
    assert max(starts) < min(ends)


async def test_a_failed_node_fails_downstream_only(client: httpx.AsyncClient) -> None:
    document = workflow(
        [
            node("prompt", "input:text", text="a cliff"),
            node("gen", "generate:sandbox", width=64, height=64, seed=1),
            node("crop", "image:crop", x=0, y=0, width=500, height=500),
            node("bad_out", "output:image"),
            node("good_out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "crop", "image"),
            edge("crop", "image", "bad_out", "image"),
            edge("gen", "image", "good_out", "image"),
        ],
    )
    execution_id = await execute(client, await create(client, document))
    polled = await finish(client, execution_id)
    assert polled["status"] == "FAILED"
    assert polled["error"]["nodeId"] == "crop"
    assert "outside the 64x64 image" in polled["error"]["message"]
    assert [o["nodeId"] for o in polled["outputs"]] == ["good_out"]
    runs = nodes_by_id(await record(client, execution_id))
    assert runs["crop"]["error"]["code"] == "crop_out_of_bounds"
    assert runs["bad_out"]["status"] == "FAILED"
    assert runs["bad_out"]["error"] == {
        "code": "upstream_failed",
        "message": "upstream node crop failed",
        "nodeId": "crop",
    }
    assert runs["bad_out"]["attempts"] == 0  # never ran: nothing broken was passed on
    assert runs["good_out"]["status"] == "SUCCEEDED"


async def test_cache_hits_are_reported_and_free(client: httpx.AsyncClient) -> None:
    workflow_id = await create(client, linear(seed=11))
    first = await execute(client, workflow_id)
    await finish(client, first)
    second = await execute(client, workflow_id)
    await finish(client, second)
    gen_first = nodes_by_id(await record(client, first))["gen"]
    rec = await record(client, second)
    gen_second = nodes_by_id(rec)["gen"]
    assert gen_first["cached"] is False
    assert gen_second["cached"] is True
    assert gen_second["credits"] == 0
    assert gen_second["outputs"]["image"]["sha256"] == gen_first["outputs"]["image"]["sha256"]
    assert rec["totals"]["cached"] == 1

    random_seed = await create(client, linear(seed=None))
    runs = [await execute(client, random_seed) for _ in range(2)]
    shas = set()
    for execution_id in runs:
        polled = await finish(client, execution_id)
        shas.add(polled["outputs"][0]["sha256"])
        assert nodes_by_id(await record(client, execution_id))["gen"]["cached"] is False
    assert len(shas) == 2  # a random seed is a request for a new image


def branch_workflow() -> dict[str, Any]:
    return workflow(
        [
            node("score", "input:number", "Score", value=0.0),
            node("prompt", "input:text", "Prompt", text="a harbour at dawn"),
            node("branch", "control:branch", operator="gt", compareTo=0.5),
            node("hi_gen", "generate:sandbox", width=64, height=64, seed=1),
            node("hi_up", "upscale:lanczos", factor=2),
            node("hi_out", "output:image"),
            node("lo_gen", "generate:sandbox", width=64, height=64, seed=2),
            node("lo_out", "output:image"),
        ],
        [
            edge("score", "number", "branch", "value"),
            edge("prompt", "text", "branch", "input"),
            edge("branch", "true", "hi_gen", "prompt"),
            edge("hi_gen", "image", "hi_up", "image"),
            edge("hi_up", "image", "hi_out", "image"),
            edge("branch", "false", "lo_gen", "prompt"),
            edge("lo_gen", "image", "lo_out", "image"),
        ],
    )


async def test_branch_skips_the_route_not_taken(client: httpx.AsyncClient) -> None:
    workflow_id = await create(client, branch_workflow())
    high = await execute(client, workflow_id, inputs={"Score": 0.9})
    low = await execute(client, workflow_id, inputs={"Score": 0.1})
    assert [o["nodeId"] for o in (await finish(client, high))["outputs"]] == ["hi_out"]
    assert [o["nodeId"] for o in (await finish(client, low))["outputs"]] == ["lo_out"]
    high_runs = nodes_by_id(await record(client, high))
    assert {
        n: high_runs[n]["status"] for n in ("hi_gen", "hi_up", "hi_out", "lo_gen", "lo_out")
    } == {
        "hi_gen": "SUCCEEDED",
        "hi_up": "SUCCEEDED",
        "hi_out": "SUCCEEDED",
        "lo_gen": "SKIPPED",
        "lo_out": "SKIPPED",
    }
    low_rec = await record(client, low)
    assert low_rec["status"] == "COMPLETED"
    assert low_rec["totals"]["skipped"] == 3
    assert nodes_by_id(low_rec)["branch"]["outputs"] == {
        "false": {"type": "text", "value": "a harbour at dawn"}
    }


async def test_fan_in_collects_only_the_routes_taken(client: httpx.AsyncClient) -> None:
    document = workflow(
        [
            node("word", "input:text", "Word", text="cat"),
            node("branch", "control:branch", operator="eq", compareTo="cat"),
            node("a", "generate:sandbox", width=64, height=64, seed=1),
            node("b", "generate:sandbox", width=64, height=64, seed=2),
            node("c", "generate:sandbox", width=64, height=64, seed=3),
            node("collect", "control:collect"),
            node("grid", "image:grid", cellWidth=32, cellHeight=32, gap=0),
            node("out", "output:image"),
        ],
        [
            edge("word", "text", "branch", "value"),
            edge("branch", "true", "a", "prompt"),
            edge("branch", "false", "b", "prompt"),
            edge("word", "text", "c", "prompt"),
            edge("a", "image", "collect", "images"),
            edge("b", "image", "collect", "images"),
            edge("c", "image", "collect", "images"),
            edge("collect", "images", "grid", "images"),
            edge("grid", "image", "out", "image"),
        ],
    )
    execution_id = await execute(client, await create(client, document))
    polled = await finish(client, execution_id)
    assert polled["status"] == "COMPLETED"
    runs = nodes_by_id(await record(client, execution_id))
    assert runs["b"]["status"] == "SKIPPED"
    collected = runs["collect"]["outputs"]["images"]["items"]
    assert [item["assetId"] for item in collected] == [
        runs["a"]["outputs"]["image"]["assetId"],
        runs["c"]["outputs"]["image"]["assetId"],
    ]
    # Two images lay out as two columns of 32 px: the skipped route left no hole.
    assert (polled["outputs"][0]["width"], polled["outputs"][0]["height"]) == (64, 32)


async def test_events_stream_state_changes_and_resume(client: httpx.AsyncClient) -> None:
    execution_id = await execute(client, await create(client, linear()))
    await finish(client, execution_id)
    stream = await client.get(f"{API}/workflows/executions/{execution_id}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(stream.text)
    types = [e["event"] for e in events]
    assert types[0] == "execution.queued"
    assert types[1] == "execution.started"
    assert types[-1] == "execution.completed"
    assert types.count("node.started") == 3
    assert types.count("node.succeeded") == 3
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    started = [json.loads(e["data"]) for e in events if e["event"] == "node.started"]
    assert [s["nodeId"] for s in started] == ["prompt", "gen", "out"]

    resumed = await client.get(
        f"{API}/workflows/executions/{execution_id}/events",
        headers={"Last-Event-ID": str(ids[3])},
    )
    assert [int(e["id"]) for e in parse_sse(resumed.text)] == ids[4:]


def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "event" in fields and "id" in fields:
            events.append(fields)
    return events


async def test_cancel_stops_a_running_node_promptly(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    execution_id = await execute(client, await create(client, linear(delay_ms=60_000)))
    for _ in range(200):
        gen = nodes_by_id(await record(client, execution_id))["gen"]
        if gen["status"] == "RUNNING":
            break
        await asyncio.sleep(0.02)
    assert gen["status"] == "RUNNING"
    cancelled = await client.post(f"{API}/workflows/executions/{execution_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json() == {"executionId": execution_id, "status": "CANCELLED"}
    rec = await record(client, execution_id)
    assert rec["status"] == "CANCELLED"
    assert {n["nodeId"]: n["status"] for n in rec["nodes"]} == {
        "prompt": "SUCCEEDED",
        "gen": "CANCELLED",
        "out": "CANCELLED",
    }
    assert runtime.engine.worker is not None
    for _ in range(100):  # the 60 s sleep was interrupted, not waited out
        if runtime.engine.worker.busy == 0:
            break
        await asyncio.sleep(0.02)
    assert runtime.engine.worker.busy == 0

    again = await client.post(f"{API}/workflows/executions/{execution_id}/cancel")
    assert again.status_code == 409
    assert again.json()["code"] == "conflict"
    assert "CANCELLED" in again.json()["detail"]


async def test_cancel_of_a_finished_execution_is_409(client: httpx.AsyncClient) -> None:
    execution_id = await execute(client, await create(client, linear()))
    await finish(client, execution_id)
    response = await client.post(f"{API}/workflows/executions/{execution_id}/cancel")
    assert response.status_code == 409
    assert "COMPLETED" in response.json()["detail"]
    assert (await record(client, execution_id))["status"] == "COMPLETED"
    unknown = await client.post(f"{API}/workflows/executions/exec_nope/cancel")
    assert unknown.status_code == 404


async def test_list_executions_filters_and_pages(client: httpx.AsyncClient) -> None:
    first_wf = await create(client, linear())
    second_wf = await create(client, linear())
    ids = [await execute(client, first_wf) for _ in range(3)]
    other = await execute(client, second_wf)
    for execution_id in [*ids, other]:
        await finish(client, execution_id)
    page = (
        await client.get(f"{API}/workflows/executions", params={"workflowId": first_wf, "limit": 2})
    ).json()
    assert [e["executionId"] for e in page["items"]] == [ids[2], ids[1]]
    rest = (
        await client.get(
            f"{API}/workflows/executions",
            params={"workflowId": first_wf, "cursor": page["nextCursor"]},
        )
    ).json()
    assert [e["executionId"] for e in rest["items"]] == [ids[0]]
    completed = (
        await client.get(f"{API}/workflows/executions", params={"status": "COMPLETED"})
    ).json()
    assert len(completed["items"]) == 4
    failed = (await client.get(f"{API}/workflows/executions", params={"status": "FAILED"})).json()
    assert failed["items"] == []
    bad = await client.get(f"{API}/workflows/executions", params={"status": "DONE"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "query.status"


async def test_poll_headers(client: httpx.AsyncClient) -> None:
    execution_id = await execute(client, await create(client, linear(delay_ms=500)))
    quick = await client.get(f"{API}/workflows/executions/{execution_id}/poll")
    assert quick.json()["status"] in ("QUEUED", "RUNNING")
    assert quick.headers["retry-after"] == "1"
    waited = await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=10"}
    )
    assert waited.json()["status"] == "COMPLETED"
    assert waited.headers["preference-applied"] == "wait=10"
    assert "retry-after" not in waited.headers


async def test_lineage_shows_every_step_that_made_an_output(client: httpx.AsyncClient) -> None:
    document = workflow(
        [
            node("prompt", "input:text", "Prompt", text="a windmill"),
            node("gen", "generate:sandbox", width=128, height=128, seed=3),
            node("up", "upscale:lanczos", factor=2),
            node("jpeg", "convert:format", format="jpeg", quality=80),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "up", "image"),
            edge("up", "image", "jpeg", "image"),
            edge("jpeg", "image", "out", "image"),
        ],
    )
    execution_id = await execute(client, await create(client, document))
    [output] = (await finish(client, execution_id))["outputs"]
    response = await client.get(f"{API}/assets/{output['assetId']}/lineage")
    assert response.status_code == 200
    chain = response.json()
    assert [a["nodeId"] for a in chain] == ["out", "jpeg", "up", "gen"]
    assert [a["operation"]["nodeType"] for a in chain] == [
        "output:image",
        "convert:format",
        "upscale:lanczos",
        "generate:sandbox",
    ]
    assert chain[1]["operation"]["params"] == {"format": "jpeg", "quality": 80}
    assert [(a["width"], a["format"]) for a in chain] == [
        (256, "jpeg"),
        (256, "jpeg"),
        (256, "png"),
        (128, "png"),
    ]
    assert {a["prompt"] for a in chain} == {"a windmill"}
    assert {a["seed"] for a in chain} == {3}
    assert (await client.get(f"{API}/assets/asset_nope/lineage")).status_code == 404
