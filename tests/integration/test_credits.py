"""Credits: prices, holds, charges, 402s, test keys, usage."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import Field

from imagegraph.errors import NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes import builtin_registry
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store import workspaces
from tests.builders import edge, linear, node, workflow
from tests.clients import api_client, make_key, make_workspace, started_runtime

API = "/api/v1"


class PricedParams(NodeParams):
    width: int = Field(default=64, ge=16, le=4096)
    height: int = Field(default=64, ge=16, le=4096)
    seed: int | None = None
    fail: bool = False


class PricedGenerate(Node[PricedParams]):
    """A paid model's node, as far as credits are concerned: 3 credits an image."""

    type = "generate:priced"
    params_model = PricedParams
    inputs = (InputPort("prompt", PortType.TEXT), InputPort("style", PortType.IMAGE, False))
    outputs = (OutputPort("image", PortType.IMAGE),)

    def price(self, params: PricedParams) -> float:
        return 3.0

    def model(self, params: PricedParams) -> str:
        return "priced-model-1"

    async def run(self, ctx: NodeContext, params: PricedParams, inputs: Inputs) -> Outputs:
        if params.fail:
            raise NodeError("the model refused", code="refused")
        image = Image.new("RGB", (params.width, params.height), (10, 200, 10))
        generation = {"prompt": inputs["prompt"], "model": "priced-model-1", "seed": params.seed}
        return {"image": ctx.store_image(image, generation=generation)}


@contextlib.asynccontextmanager
async def priced_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    registry = builtin_registry()
    registry.register(PricedGenerate())
    async with started_runtime(settings, registry) as runtime:
        yield runtime


def paid(count: int = 2, fail: bool = False, size: int = 64) -> dict[str, Any]:
    """Prompt -> `count` priced generators, each -> an output."""
    nodes = [node("prompt", "input:text", "Prompt", text="a lamp")]
    edges = []
    for i in range(count):
        nodes.append(node(f"gen{i}", "generate:priced", seed=i, fail=fail, width=size, height=size))
        nodes.append(node(f"out{i}", "output:image"))
        edges.append(edge("prompt", "text", f"gen{i}", "prompt"))
        edges.append(edge(f"gen{i}", "image", f"out{i}", "image"))
    return workflow(nodes, edges, name="paid")


async def credits(client: httpx.AsyncClient) -> dict[str, float]:
    body: dict[str, float] = (await client.get(f"{API}/workspace")).json()["credits"]
    return body


async def run(client: httpx.AsyncClient, document: dict[str, Any], **body: Any) -> dict[str, Any]:
    saved = await client.post(f"{API}/workflows", json=document)
    assert saved.status_code == 201, saved.text
    started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json=body)
    assert started.status_code == 201, started.text
    execution_id = started.json()["executionId"]
    await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=30"}
    )
    record: dict[str, Any] = (await client.get(f"{API}/workflows/executions/{execution_id}")).json()
    return record


async def test_an_execution_is_charged_what_its_nodes_cost(settings: Settings) -> None:
    async with priced_runtime(settings) as runtime, api_client(runtime) as client:
        before = await credits(client)
        record = await run(client, paid(2))
        assert record["status"] == "COMPLETED"
        charged = {n["nodeId"]: n["credits"] for n in record["nodes"]}
        assert charged == {"prompt": 0, "gen0": 3, "gen1": 3, "out0": 0, "out1": 0}
        assert record["totals"]["credits"] == 6
        after = await credits(client)
        assert after["balance"] == before["balance"] - 6
        assert after["held"] == 0
        ledger = (await client.get(f"{API}/credits/ledger")).json()["items"]
        charges = [e for e in ledger if e["kind"] == "charge"]
        assert sorted((e["nodeId"], e["amount"], e["model"]) for e in charges) == [
            ("gen0", -3, "priced-model-1"),
            ("gen1", -3, "priced-model-1"),
        ]
        assert {e["executionId"] for e in charges} == {record["executionId"]}


async def test_too_few_credits_is_402_with_the_price_of_each_node(settings: Settings) -> None:
    async with priced_runtime(settings) as runtime:
        workspace_id, key = make_workspace(runtime, credits=5)
        async with api_client(runtime, key) as client:
            saved = (await client.post(f"{API}/workflows", json=paid(2))).json()
            response = await client.post(f"{API}/workflows/{saved['id']}/execute", json={})
            assert response.status_code == 402
            assert response.headers["content-type"] == "application/problem+json"
            body = response.json()
            assert body["code"] == "insufficient_credits"
            assert body["requiredCredits"] == 6
            assert body["availableCredits"] == 5
            assert body["nodes"] == [
                {"nodeId": "gen0", "nodeType": "generate:priced", "credits": 3},
                {"nodeId": "gen1", "nodeType": "generate:priced", "credits": 3},
            ]
            assert (await client.get(f"{API}/workflows/executions")).json()["items"] == []
            assert await credits(client) == {"balance": 5, "held": 0, "available": 5}
            # An idempotency key is not used up by a refused request.
            again = await client.post(
                f"{API}/workflows/{saved['id']}/execute",
                json={},
                headers={"Idempotency-Key": "when-funded"},
            )
            assert again.status_code == 402
            workspaces.grant_credits(runtime.db, workspace_id, 10, None, datetime.now(UTC))
            funded = await client.post(
                f"{API}/workflows/{saved['id']}/execute",
                json={},
                headers={"Idempotency-Key": "when-funded"},
            )
            assert funded.status_code == 201


async def test_credits_held_by_a_running_execution_are_not_spent_twice(runtime: Runtime) -> None:
    _, key = make_workspace(runtime, credits=10)
    async with api_client(runtime, key) as client:
        slow = linear(seed=None, delay_ms=1500)
        slow["nodes"][1]["data"]["params"]["credits"] = 7
        saved = (await client.post(f"{API}/workflows", json=slow)).json()
        url = f"{API}/workflows/{saved['id']}/execute"
        first = await client.post(url, json={})
        assert first.status_code == 201
        assert await credits(client) == {"balance": 10, "held": 7, "available": 3}
        second = await client.post(url, json={})
        assert second.status_code == 402
        assert second.json()["availableCredits"] == 3
        await client.get(
            f"{API}/workflows/executions/{first.json()['executionId']}/poll",
            headers={"Prefer": "wait=30"},
        )
        assert await credits(client) == {"balance": 3, "held": 0, "available": 3}


async def test_failed_and_cancelled_executions_release_their_hold_unspent(
    settings: Settings,
) -> None:
    async with priced_runtime(settings) as runtime, api_client(runtime) as client:
        before = await credits(client)
        record = await run(client, paid(2, fail=True))
        assert record["status"] == "FAILED"
        assert record["totals"]["credits"] == 0
        assert await credits(client) == before

        slow = linear(seed=None, delay_ms=5000)
        slow["nodes"][1]["data"]["params"]["credits"] = 4
        saved = (await client.post(f"{API}/workflows", json=slow)).json()
        started = (await client.post(f"{API}/workflows/{saved['id']}/execute", json={})).json()
        assert (await credits(client))["held"] == 4
        cancelled = await client.post(f"{API}/workflows/executions/{started['executionId']}/cancel")
        assert cancelled.status_code == 200
        assert await credits(client) == before


async def test_cache_hits_cost_nothing(runtime: Runtime, client: httpx.AsyncClient) -> None:
    document = linear(seed=5)
    document["nodes"][1]["data"]["params"]["credits"] = 2
    before = await credits(client)
    first = await run(client, document)
    second = await run(client, document)
    assert first["totals"]["credits"] == 2
    assert second["totals"]["credits"] == 0
    gen = next(n for n in second["nodes"] if n["nodeId"] == "gen")
    assert gen["cached"]
    assert gen["credits"] == 0
    assert (await credits(client))["balance"] == before["balance"] - 2


async def test_test_keys_run_paid_models_on_the_sandbox_for_free(settings: Settings) -> None:
    async with priced_runtime(settings) as runtime:
        test_key = make_key(runtime, scopes=["admin"], mode="test")
        async with api_client(runtime, test_key) as client:
            before = await credits(client)
            record = await run(client, paid(2, size=4000))  # beyond the sandbox's 2048 limit
            assert record["status"] == "COMPLETED", record["error"]
            gens = [n for n in record["nodes"] if n["nodeId"].startswith("gen")]
            assert {n["nodeType"] for n in gens} == {"generate:sandbox"}
            assert record["totals"]["credits"] == 0
            assert await credits(client) == before
            output = record["outputs"][0]
            asset = (await client.get(f"{API}/assets/{output['assetId']}")).json()
            assert asset["model"] == "sandbox"
        # The same workflow with a live key costs its price.
        async with api_client(runtime) as live:
            record = await run(live, paid(2))
            assert record["totals"]["credits"] == 6


async def test_usage_by_day_and_model(settings: Settings) -> None:
    async with priced_runtime(settings) as runtime, api_client(runtime) as client:
        await run(client, paid(2))
        await run(client, linear(seed=1))
        response = await client.get(f"{API}/usage")
        assert response.status_code == 200, response.text
        usage = response.json()
        today = datetime.now(UTC).date().isoformat()
        assert usage["to"] == today
        assert usage["totals"] == {
            "executions": 2,
            "images": 3,
            "credits": 6,
            "costPerImage": 2,
        }
        assert usage["byDay"] == [
            {"date": today, "executions": 2, "images": 3, "credits": 6, "costPerImage": 2}
        ]
        assert usage["byModel"] == [
            {
                "model": "priced-model-1",
                "generations": 2,
                "images": 2,
                "credits": 6,
                "costPerImage": 3,
            },
            {"model": "sandbox", "generations": 1, "images": 1, "credits": 0, "costPerImage": 0},
        ]
        empty = await client.get(f"{API}/usage", params={"from": "2020-01-01", "to": "2020-01-31"})
        assert empty.json()["totals"]["executions"] == 0
        bad = await client.get(f"{API}/usage", params={"from": "2020-02-01", "to": "2020-01-01"})
        assert bad.status_code == 422


async def test_admins_add_credits_and_others_cannot(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    before = await credits(client)
    added = await client.post(f"{API}/credits", json={"amount": 250, "note": "top-up"})
    assert added.status_code == 201
    assert added.json()["credits"]["balance"] == before["balance"] + 250
    grants = (await client.get(f"{API}/credits/ledger")).json()["items"]
    assert grants[0]["kind"] == "grant"
    assert grants[0]["amount"] == 250
    assert grants[0]["note"] == "top-up"
    writer = make_key(runtime, scopes=["workflows:write", "executions:write"])
    async with api_client(runtime, writer) as other:
        assert (await other.post(f"{API}/credits", json={"amount": 1})).status_code == 403
    for amount in (0, -5):
        assert (await client.post(f"{API}/credits", json={"amount": amount})).status_code == 422


@pytest.mark.parametrize("mode", ["live", "test"])
async def test_the_workspace_reports_plan_credits_and_the_callers_key(
    runtime: Runtime, mode: str
) -> None:
    key = make_key(runtime, scopes=["workflows:read"], mode=mode)  # type: ignore[arg-type]
    async with api_client(runtime, key) as client:
        body = (await client.get(f"{API}/workspace")).json()
    assert body["id"] == "ws_default"
    assert body["plan"]["name"] == "self-hosted"
    assert body["credits"]["balance"] == runtime.settings.bootstrap_credits
    assert body["mode"] == mode
    assert body["scopes"] == ["workflows:read"]
