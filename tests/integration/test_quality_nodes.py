"""Quality nodes run through the engine and the API: measurements reach the output asset,
failed checks are named, similarity of pinned seeds, validation of the reference."""

from __future__ import annotations

from typing import Any

import httpx

from tests.builders import edge, linear, node, workflow

API = "/api/v1"


async def create(client: httpx.AsyncClient, document: dict[str, Any]) -> str:
    response = await client.post(f"{API}/workflows", json=document)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def execute(client: httpx.AsyncClient, workflow_id: str) -> str:
    response = await client.post(f"{API}/workflows/{workflow_id}/execute", json={})
    assert response.status_code == 201, response.text
    return str(response.json()["executionId"])


async def finish(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    response = await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=30"}
    )
    body: dict[str, Any] = response.json()
    assert body["status"] == "COMPLETED", body
    return body


async def record(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    response = await client.get(f"{API}/workflows/executions/{execution_id}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def nodes_by_id(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["nodeId"]: n for n in rec["nodes"]}


def checked(size: int = 160, seed: int = 7, **check: Any) -> dict[str, Any]:
    """Prompt -> sandbox generator -> quality:check -> output."""
    return workflow(
        [
            node("prompt", "input:text", "Prompt", text="a red fox in the snow"),
            node("gen", "generate:sandbox", width=size, height=size, seed=seed),
            node("check", "quality:check", **check),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "check", "image"),
            edge("check", "image", "out", "image"),
        ],
    )


def compared(seed: int, reference_seed: int | None = None, **similarity: Any) -> dict[str, Any]:
    """Prompt -> generator (`seed`) -> quality:similarity -> output; the reference is a second
    generator (`reference_seed`) when given, else whatever `similarity` params name."""
    nodes = [
        node("prompt", "input:text", "Prompt", text="a red fox in the snow"),
        node("gen", "generate:sandbox", width=128, height=128, seed=seed),
        node("similar", "quality:similarity", **similarity),
        node("out", "output:image"),
    ]
    edges = [
        edge("prompt", "text", "gen", "prompt"),
        edge("gen", "image", "similar", "image"),
        edge("similar", "image", "out", "image"),
    ]
    if reference_seed is not None:
        nodes.append(node("ref", "generate:sandbox", width=128, height=128, seed=reference_seed))
        edges += [
            edge("prompt", "text", "ref", "prompt"),
            edge("ref", "image", "similar", "reference"),
        ]
    return workflow(nodes, edges)


async def run(client: httpx.AsyncClient, document: dict[str, Any]) -> dict[str, Any]:
    execution_id = await execute(client, await create(client, document))
    await finish(client, execution_id)
    return await record(client, execution_id)


async def output_asset(client: httpx.AsyncClient, rec: dict[str, Any]) -> dict[str, Any]:
    asset_id = nodes_by_id(rec)["out"]["outputs"]["image"]["assetId"]
    response = await client.get(f"{API}/assets/{asset_id}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def test_check_measurements_land_on_the_output_asset(client: httpx.AsyncClient) -> None:
    rec = await run(client, checked(minWidth=100, minSharpness=1))
    check = nodes_by_id(rec)["check"]["outputs"]
    assert check["passed"]["value"] is True
    scores = check["scores"]["value"]
    assert scores["failures"] == []
    assert (scores["width"], scores["height"], scores["measuredAt"]) == (160, 160, [160, 160])

    asset = await output_asset(client, rec)
    assert asset["kind"] == "output"
    assert asset["reviewState"] is None
    measured = asset["quality"]
    assert measured["sharpness"] == scores["sharpness"] > 1
    assert measured["brightness"] == scores["brightness"]
    assert measured["contrast"] == scores["contrast"]
    assert measured["nearBlank"] is False
    # The check passed its input on: the output's parent is the generated image itself.
    generated = nodes_by_id(rec)["gen"]["outputs"]["image"]["assetId"]
    assert asset["parents"] == [generated]
    assert (await client.get(f"{API}/assets/{generated}")).json()["quality"] is None


async def test_impossible_thresholds_fail_the_check_by_name(client: httpx.AsyncClient) -> None:
    rec = await run(client, checked(minWidth=5000, minSharpness=1e9, aspectRatio="16:9"))
    check = nodes_by_id(rec)["check"]["outputs"]
    assert check["passed"]["value"] is False
    failures = check["scores"]["value"]["failures"]
    assert "width 160 is below minWidth 5000" in failures
    assert any(f.startswith("sharpness ") and "minSharpness 1e+09" in f for f in failures)
    assert any(f.startswith("aspect ratio 1 ") and "aspectRatio 16:9" in f for f in failures)
    # Failing a check is an answer, not an error: the image still reaches the output.
    assert rec["status"] == "COMPLETED"


async def test_similarity_of_the_same_pinned_seed_is_exact(client: httpx.AsyncClient) -> None:
    same = nodes_by_id(await run(client, compared(7, reference_seed=7)))["similar"]["outputs"]
    assert same["passed"]["value"] is True
    assert same["scores"]["value"]["hashDistance"] == 0
    assert same["scores"]["value"]["ssim"] == 1.0

    other = nodes_by_id(await run(client, compared(7, reference_seed=8)))["similar"]["outputs"]
    assert other["passed"]["value"] is False
    assert other["scores"]["value"]["hashDistance"] > 10
    assert other["scores"]["value"]["ssim"] < 0.9


async def test_similarity_against_a_stored_asset(client: httpx.AsyncClient) -> None:
    baseline = await finish(client, await execute(client, await create(client, linear(size=128))))
    reference_id = baseline["outputs"][0]["assetId"]

    rec = await run(client, compared(7, referenceAssetId=reference_id))
    scores = nodes_by_id(rec)["similar"]["outputs"]["scores"]["value"]
    assert (scores["hashDistance"], scores["ssim"]) == (0, 1.0)
    assert scores["referenceAssetId"] == reference_id
    asset = await output_asset(client, rec)
    assert asset["quality"]["hashDistance"] == 0
    assert asset["quality"]["phash"] == asset["quality"]["referencePhash"]

    rec = await run(client, compared(99, referenceAssetId=reference_id))
    scores = nodes_by_id(rec)["similar"]["outputs"]["scores"]["value"]
    assert scores["hashDistance"] > 10
    assert nodes_by_id(rec)["similar"]["outputs"]["passed"]["value"] is False


async def test_reference_must_be_given_exactly_once(client: httpx.AsyncClient) -> None:
    asset_id = "asset_01J00000000000000000000000"
    neither = await client.post(f"{API}/workflows", json=compared(7))
    assert neither.status_code == 422, neither.text
    assert {"code": "missing_input", "nodeId": "similar", "port": "reference"}.items() <= (
        neither.json()["errors"][0].items()
    )
    assert "similar" in neither.json()["errors"][0]["message"]

    both = await client.post(
        f"{API}/workflows", json=compared(7, reference_seed=7, referenceAssetId=asset_id)
    )
    assert both.status_code == 422, both.text
    [error] = both.json()["errors"]
    assert (error["code"], error["nodeId"], error["port"]) == (
        "unknown_port",
        "similar",
        "reference",
    )

    workflow_id = await create(client, compared(7, referenceAssetId=asset_id))
    missing = await client.post(f"{API}/workflows/{workflow_id}/execute", json={})
    assert missing.status_code == 422, missing.text
    [error] = missing.json()["errors"]
    assert (error["code"], error["nodeId"], error["field"]) == (
        "asset_not_found",
        "similar",
        "params.referenceAssetId",
    )

    bad = await client.post(f"{API}/workflows", json=compared(7, referenceAssetId="fox.png"))
    assert bad.status_code == 422
    [error] = bad.json()["errors"]
    assert (error["nodeId"], error["field"]) == ("similar", "params.referenceAssetId")


async def test_dedupe_drops_repeated_seeds(client: httpx.AsyncClient) -> None:
    nodes = [node("prompt", "input:text", "Prompt", text="four seasons")]
    edges = []
    for index, seed in enumerate([1, 2, 1, 3]):
        nodes.append(node(f"gen{index}", "generate:sandbox", width=96, height=96, seed=seed))
        edges += [
            edge("prompt", "text", f"gen{index}", "prompt"),
            edge(f"gen{index}", "image", "dedupe", "images"),
        ]
    nodes += [
        node("dedupe", "quality:dedupe"),
        node("grid", "image:grid", cellWidth=32, cellHeight=32, gap=0),
        node("out", "output:image"),
    ]
    edges += [edge("dedupe", "images", "grid", "images"), edge("grid", "image", "out", "image")]
    rec = await run(client, workflow(nodes, edges))
    outputs = nodes_by_id(rec)["dedupe"]["outputs"]
    assert outputs["duplicates"]["value"] == [{"index": 2, "duplicateOf": 0, "distance": 0}]
    kept = outputs["images"]["items"]
    assert [item["quality"]["phash"] for item in kept] == [
        outputs["scores"]["value"]["phashes"][i] for i in (0, 1, 3)
    ]
    grid = nodes_by_id(rec)["grid"]["outputs"]["image"]
    assert (grid["width"], grid["height"]) == (64, 64)  # three images: a 2x2 sheet
    # Measurements of every image a grid is made of, first image's winning: a phash.
    assert (await output_asset(client, rec))["quality"]["phash"] == kept[0]["quality"]["phash"]
