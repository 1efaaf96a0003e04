"""`generate:local` through the API: a diffusers pipeline under the models directory makes
the image, offline, for no credits, and stays warm for the next execution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagegraph.settings import Settings
from tests.builders import edge, node, workflow
from tests.clients import api_client, started_runtime
from tests.tiny_pipelines import save_tiny_pipeline

API = "/api/v1"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("local-models")
    save_tiny_pipeline(base / "models" / "tiny-sd", base / "tokenizer-source")
    return base / "models"


def local(model: str, seed: int | None = 3) -> dict[str, Any]:
    params: dict[str, Any] = {"model": model, "width": 64, "height": 64, "steps": 2}
    if seed is not None:
        params["seed"] = seed
    return workflow(
        [
            node("prompt", "input:text", text="a fox in the snow"),
            node("gen", "generate:local", **params),
            node("out", "output:image"),
        ],
        [edge("prompt", "text", "gen", "prompt"), edge("gen", "image", "out", "image")],
    )


async def test_a_local_pipeline_makes_the_image(settings: Settings, models_dir: Path) -> None:
    async with (
        started_runtime(settings, local_models_dir=models_dir, local_device="cpu") as runtime,
        api_client(runtime) as client,
    ):
        saved = await client.post(f"{API}/workflows", json=local("tiny-sd"))
        started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json={})
        assert started.status_code == 201, started.text
        execution_id = started.json()["executionId"]
        await client.get(
            f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=60"}
        )
        record = (await client.get(f"{API}/workflows/executions/{execution_id}")).json()

        assert record["status"] == "COMPLETED", record["error"]
        (gen,) = [n for n in record["nodes"] if n["nodeId"] == "gen"]
        assert gen["credits"] == 0
        asset = (await client.get(f"{API}/assets/{gen['outputs']['image']['assetId']}")).json()
        assert (asset["width"], asset["height"]) == (64, 64)
        assert asset["model"] == "local:tiny-sd"
        assert asset["seed"] == 3
        assert asset["generation"]["pipeline"] == "StableDiffusionPipeline"
        content = await client.get(asset["url"])
        assert content.status_code == 200


async def test_a_model_that_is_not_there_fails_the_node_clearly(
    settings: Settings, models_dir: Path
) -> None:
    async with (
        started_runtime(settings, local_models_dir=models_dir, local_device="cpu") as runtime,
        api_client(runtime) as client,
    ):
        saved = await client.post(f"{API}/workflows", json=local("/etc"))
        started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json={})
        execution_id = started.json()["executionId"]
        await client.get(
            f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=60"}
        )
        record = (await client.get(f"{API}/workflows/executions/{execution_id}")).json()

    assert record["status"] == "FAILED"
    (gen,) = [n for n in record["nodes"] if n["nodeId"] == "gen"]
    assert gen["error"]["code"] == "local_model_not_found"
    assert "absolute paths are allowed" in gen["error"]["message"]
    assert gen["attempts"] == 1
