"""`quality:gate` through the API: approve, make the generation again (new seed, more steps)
up to maxAttempts, then send the image on for review; what the record, the events, the
assets and the credits say about it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import Field
from sqlalchemy import select

from imagegraph.engine import queries, transitions
from imagegraph.engine.transitions import Lease, Regeneration, Success
from imagegraph.graph.model import parse_workflow
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.graph.validate import validate_workflow
from imagegraph.nodes import builtin_registry
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs
from imagegraph.nodes.values import ImageValue
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store.tables import DEFAULT_WORKSPACE, assets, executions, node_runs
from tests.builders import edge, node, workflow
from tests.clients import api_client, make_workspace, started_runtime

API = "/api/v1"

WS = "ws_default"


class JudgeParams(NodeParams):
    passing_seeds: list[int] = Field(default_factory=list)


class Judge(Node[JudgeParams]):
    """Passes an image when the seed it was made with is one of `passingSeeds`; reports the
    seed and the steps as scores and as quality measurements (so the gate can be driven by
    `passed`, by thresholds on `scores`, or by thresholds on the image's measurements)."""

    type = "test:judge"
    params_model = JudgeParams
    inputs = (InputPort("image", PortType.IMAGE),)
    outputs = (
        OutputPort("image", PortType.IMAGE),
        OutputPort("passed", PortType.BOOLEAN),
        OutputPort("scores", PortType.JSON),
    )

    async def run(self, ctx: NodeContext, params: JudgeParams, inputs: Inputs) -> Outputs:
        image: ImageValue = inputs["image"]
        seed = image.generation["seed"]
        steps = image.generation["params"]["steps"]
        passed = seed in params.passing_seeds
        failures = [] if passed else [f"seed {seed} is not one of {params.passing_seeds}"]
        measured = {"seed": seed, "steps": steps}
        return {
            "image": dataclasses.replace(image, quality={**image.quality, **measured}),
            "passed": passed,
            "scores": {**measured, "failures": failures},
        }


@contextlib.asynccontextmanager
async def gate_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    registry = builtin_registry()
    registry.register(Judge())
    async with started_runtime(settings, registry) as runtime:
        yield runtime


def gated(
    *,
    passing: list[int],
    prompt: str = "a lighthouse",
    seed: int | None = 42,
    steps: int = 20,
    credits: float = 0.0,
    delay_ms: int = 0,
    by: str = "passed",
    side_branch: bool = False,
    **gate: Any,
) -> dict[str, Any]:
    """Prompt -> sandbox -> judge -> gate -> output; the gate decides from the judge's
    `passed` (by="passed", with its `scores` for the reasons), from thresholds on its
    `scores` (by="scores") or on the image's measurements (by="quality"). With
    `side_branch`, the generation also feeds an output of its own, off the path to the
    gate."""
    gen: dict[str, Any] = {"width": 64, "height": 64, "steps": steps, "delayMs": delay_ms}
    if seed is not None:
        gen["seed"] = seed
    if credits:
        gen["credits"] = credits
    nodes = [
        node("prompt", "input:text", "Prompt", text=prompt),
        node("gen", "generate:sandbox", **gen),
        node("judge", "test:judge", passingSeeds=passing),
        node("gate", "quality:gate", **gate),
        node("out", "output:image"),
    ]
    edges = [
        edge("prompt", "text", "gen", "prompt"),
        edge("gen", "image", "judge", "image"),
        edge("judge", "image", "gate", "image"),
        edge("gate", "image", "out", "image"),
    ]
    if by == "passed":
        edges.append(edge("judge", "passed", "gate", "passed"))
    if by in ("passed", "scores"):
        edges.append(edge("judge", "scores", "gate", "scores"))
    if side_branch:
        nodes.append(node("raw", "output:image"))
        edges.append(edge("gen", "image", "raw", "image"))
    return workflow(nodes, edges, name="gated")


async def run(client: httpx.AsyncClient, document: dict[str, Any]) -> dict[str, Any]:
    """Save, execute and wait; returns the full record."""
    saved = await client.post(f"{API}/workflows", json=document)
    assert saved.status_code == 201, saved.text
    started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json={})
    assert started.status_code == 201, started.text
    execution_id = started.json()["executionId"]
    polled = await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=30"}
    )
    assert polled.json()["status"] in ("COMPLETED", "FAILED"), polled.text
    record: dict[str, Any] = (await client.get(f"{API}/workflows/executions/{execution_id}")).json()
    return record


def by_id(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["nodeId"]: n for n in record["nodes"]}


def node_assets(runtime: Runtime, execution_id: str, node_id: str) -> list[Any]:
    with runtime.db.read() as conn:
        return list(
            conn.execute(
                select(assets)
                .where(assets.c.execution_id == execution_id, assets.c.node_id == node_id)
                .order_by(assets.c.created_at, assets.c.id)
            ).all()
        )


def remaining(runtime: Runtime, execution_id: str) -> int:
    with runtime.db.read() as conn:
        value: int = conn.execute(
            select(executions.c.remaining).where(executions.c.id == execution_id)
        ).scalar_one()
    return value


async def events(client: httpx.AsyncClient, execution_id: str) -> list[dict[str, Any]]:
    """The recorded events, as the server-sent event stream gives them."""
    stream = await client.get(f"{API}/workflows/executions/{execution_id}/events")
    found = []
    for line in stream.text.splitlines():
        if line.startswith("data:"):
            found.append(json.loads(line.removeprefix("data:")))
    return found


def gate_scores(record: dict[str, Any]) -> dict[str, Any]:
    scores: dict[str, Any] = by_id(record)["gate"]["outputs"]["scores"]["value"]
    return scores


async def test_an_image_that_passes_is_approved_after_one_generation(settings: Settings) -> None:
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        record = await run(client, gated(passing=[42]))
        assert record["status"] == "COMPLETED"
        nodes = by_id(record)
        assert nodes["gen"]["regenerations"] == 0
        assert nodes["gen"]["adjust"] is None
        assert nodes["gen"]["attempts"] == 1
        assert nodes["gate"]["outputs"]["passed"]["value"] is True
        assert gate_scores(record)["decision"] == "approved"
        assert gate_scores(record)["attempt"] == 1
        [output] = node_assets(runtime, record["executionId"], "out")
        assert output.review_state == "approved"
        assert output.seed == 42
        assert len(node_assets(runtime, record["executionId"], "gen")) == 1
        types = [e["type"] for e in await events(client, record["executionId"])]
        assert "node.regenerating" not in types


async def test_an_image_that_always_fails_is_made_max_attempts_times_then_reviewed(
    settings: Settings,
) -> None:
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        record = await run(client, gated(passing=[], maxAttempts=3))
        execution_id = record["executionId"]
        assert record["status"] == "COMPLETED", record["error"]
        assert remaining(runtime, execution_id) == 0
        nodes = by_id(record)
        assert nodes["gen"]["regenerations"] == 2
        assert nodes["gen"]["adjust"] == {"seed": 44}
        assert nodes["gen"]["attempts"] == 3
        # Every run from the generation to the gate ran again; the output after it once.
        assert nodes["judge"]["regenerations"] == 2
        assert nodes["gate"]["regenerations"] == 2
        assert nodes["out"]["regenerations"] == 0
        assert nodes["out"]["attempts"] == 1
        assert record["totals"]["succeeded"] == 5
        seeds = [a.seed for a in node_assets(runtime, execution_id, "gen")]
        assert seeds == [42, 43, 44]
        assert [a.params["steps"] for a in node_assets(runtime, execution_id, "gen")] == [20] * 3
        [output] = node_assets(runtime, execution_id, "out")
        assert output.review_state == "pending-review"
        assert output.seed == 44
        assert nodes["gate"]["outputs"]["passed"]["value"] is False
        scores = gate_scores(record)
        assert scores["decision"] == "pending-review"
        assert scores["attempt"] == 3
        assert scores["maxAttempts"] == 3
        assert scores["failures"] == ["seed 44 is not one of []"]

        found = await events(client, execution_id)
        regenerating = [e for e in found if e["type"] == "node.regenerating"]
        assert [e["nodeId"] for e in regenerating] == ["gate", "gate"]
        assert [e["target"] for e in regenerating] == ["gen", "gen"]
        assert [e["attempt"] for e in regenerating] == [1, 2]
        assert [e["adjust"] for e in regenerating] == [{"seed": 43}, {"seed": 44}]
        assert regenerating[0]["failures"] == ["seed 42 is not one of []"]
        assert regenerating[0]["reset"] == ["gen", "judge", "gate"]
        starts = [e["nodeId"] for e in found if e["type"] == "node.started"]
        assert starts.count("gen") == 3
        assert starts.count("out") == 1
        assert found[-1]["type"] == "execution.completed"


async def test_on_exhausted_reject_rejects_the_image(settings: Settings) -> None:
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        record = await run(client, gated(passing=[], maxAttempts=2, onExhausted="reject"))
        assert record["status"] == "COMPLETED"
        assert by_id(record)["gen"]["regenerations"] == 1
        assert gate_scores(record)["decision"] == "rejected"
        [output] = node_assets(runtime, record["executionId"], "out")
        assert output.review_state == "rejected"


async def test_an_image_that_fails_once_is_approved_on_the_second_generation(
    settings: Settings,
) -> None:
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        record = await run(client, gated(passing=[43], maxAttempts=5))
        assert record["status"] == "COMPLETED"
        nodes = by_id(record)
        assert nodes["gen"]["regenerations"] == 1
        assert nodes["gen"]["adjust"] == {"seed": 43}
        assert gate_scores(record)["decision"] == "approved"
        assert gate_scores(record)["attempt"] == 2
        assert [a.seed for a in node_assets(runtime, record["executionId"], "gen")] == [42, 43]
        [output] = node_assets(runtime, record["executionId"], "out")
        assert (output.review_state, output.seed) == ("approved", 43)
        assert remaining(runtime, record["executionId"]) == 0


async def test_thresholds_on_scores_and_more_steps_on_each_attempt(settings: Settings) -> None:
    """No `passed`: the gate checks `steps` in the judge's scores against a minimum that only
    the third generation (20, 28, 36 steps) reaches."""
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        document = gated(
            passing=[],
            by="scores",
            thresholds={"steps": {"min": 36}},
            adjust={"stepsIncrease": 8},
        )
        record = await run(client, document)
        assert record["status"] == "COMPLETED"
        nodes = by_id(record)
        assert nodes["gen"]["regenerations"] == 2
        assert nodes["gen"]["adjust"] == {"seed": 44, "steps": 36}
        made = node_assets(runtime, record["executionId"], "gen")
        assert [(a.seed, a.params["steps"]) for a in made] == [(42, 20), (43, 28), (44, 36)]
        # The asset records the params that really ran.
        assert made[1].meta["operation"]["params"]["steps"] == 28
        scores = gate_scores(record)
        assert (scores["decision"], scores["checked"]) == ("approved", "thresholds")
        assert scores["values"] == {"steps": 36}
        [output] = node_assets(runtime, record["executionId"], "out")
        assert output.review_state == "approved"
        assert output.quality == {"seed": 44, "steps": 36}
        regenerating = [
            e
            for e in await events(client, record["executionId"])
            if e["type"] == "node.regenerating"
        ]
        assert regenerating[0]["failures"] == ["steps 20 is below min 36"]
        assert regenerating[0]["values"] == {"steps": 20}


async def test_thresholds_on_the_image_measurements_and_a_random_seed(
    settings: Settings,
) -> None:
    """The gate reads `seed` from the image's quality measurements; the generation has no
    fixed seed, so the next one is the drawn one plus one."""
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        document = gated(
            passing=[], by="quality", seed=None, thresholds={"seed": {"max": -1}}, maxAttempts=2
        )
        record = await run(client, document)
        assert record["status"] == "COMPLETED"
        first, second = node_assets(runtime, record["executionId"], "gen")
        assert second.seed == first.seed + 1
        assert by_id(record)["gen"]["adjust"] == {"seed": first.seed + 1}
        assert gate_scores(record)["decision"] == "pending-review"


async def test_a_branch_off_the_path_to_the_gate_is_not_run_again(settings: Settings) -> None:
    """`raw` takes the generation directly: it runs once, with the first image, while the
    gate has the generation made three times."""
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        record = await run(client, gated(passing=[], side_branch=True))
        assert record["status"] == "COMPLETED"
        nodes = by_id(record)
        assert nodes["gen"]["regenerations"] == 2
        assert (nodes["raw"]["attempts"], nodes["raw"]["regenerations"]) == (1, 0)
        [raw] = node_assets(runtime, record["executionId"], "raw")
        assert raw.seed == 42
        assert raw.review_state is None
        [out] = node_assets(runtime, record["executionId"], "out")
        assert (out.seed, out.review_state) == (44, "pending-review")
        assert remaining(runtime, record["executionId"]) == 0


async def test_each_generation_is_charged_and_held_for(settings: Settings) -> None:
    async with gate_runtime(settings) as runtime:
        _, key = make_workspace(runtime, credits=10)
        async with api_client(runtime, key) as client:
            record = await run(client, gated(passing=[], credits=2))
            assert record["status"] == "COMPLETED"
            assert by_id(record)["gen"]["credits"] == 6
            assert record["totals"]["credits"] == 6
            balance = (await client.get(f"{API}/workspace")).json()["credits"]
            assert balance == {"balance": 4, "held": 0, "available": 4}
            ledger = (await client.get(f"{API}/credits/ledger")).json()["items"]
            charges = [e["amount"] for e in ledger if e["kind"] == "charge"]
            assert charges == [-2, -2, -2]
            held = [
                e["creditsHeld"]
                for e in await events(client, record["executionId"])
                if e["type"] == "node.regenerating"
            ]
            assert held == [2, 2]


async def test_a_generation_the_workspace_cannot_pay_again_fails_the_gate(
    settings: Settings,
) -> None:
    async with gate_runtime(settings) as runtime:
        _, key = make_workspace(runtime, credits=3)
        async with api_client(runtime, key) as client:
            record = await run(client, gated(passing=[], credits=2))
            assert record["status"] == "FAILED"
            nodes = by_id(record)
            assert nodes["gen"]["regenerations"] == 0
            error = nodes["gate"]["error"]
            assert error["code"] == "insufficient_credits"
            assert (error["requiredCredits"], error["availableCredits"]) == (2, 1)
            assert "making gen again costs 2 credits" in error["message"]
            assert nodes["out"]["status"] == "FAILED"
            assert record["error"]["nodeId"] == "gate"
            balance = (await client.get(f"{API}/workspace")).json()["credits"]
            assert balance == {"balance": 1, "held": 0, "available": 1}


async def test_test_keys_regenerate_for_free(settings: Settings) -> None:
    async with gate_runtime(settings) as runtime:
        _, key = make_workspace(runtime, credits=0, mode="test")
        async with api_client(runtime, key) as client:
            record = await run(client, gated(passing=[], credits=2))
            assert record["status"] == "COMPLETED"
            assert by_id(record)["gen"]["regenerations"] == 2
            assert record["totals"]["credits"] == 0


async def test_a_regeneration_survives_a_restart(settings: Settings) -> None:
    """Stop the server while the second generation runs: the next process takes it back
    and the loop goes on where it was (the count and the new seed are in the database)."""
    registry = builtin_registry()
    registry.register(Judge())
    async with started_runtime(settings, registry) as runtime:
        doc = parse_workflow(gated(passing=[], delay_ms=300))
        execution_id = await runtime.engine.submit(doc)
        with runtime.engine.bus.subscribe(execution_id) as subscription:
            async with asyncio.timeout(30):
                while not any(
                    e.type == "node.regenerating"
                    for e in queries.load_events(runtime.db, execution_id)
                ):
                    await subscription.queue.get()
    async with started_runtime(settings, registry) as runtime:
        status = await runtime.engine.wait(execution_id, max_wait=30)
        assert status.value == "COMPLETED"
        with runtime.db.read() as conn:
            gen = conn.execute(
                select(node_runs).where(
                    node_runs.c.execution_id == execution_id, node_runs.c.node_id == "gen"
                )
            ).one()
        assert (gen.regenerations, gen.adjust, gen.state) == (2, {"seed": 44}, "SUCCEEDED")
        seeds = sorted({a.seed for a in node_assets(runtime, execution_id, "gen")})
        assert seeds == [42, 43, 44]
        [output] = node_assets(runtime, execution_id, "out")
        assert (output.seed, output.review_state) == (44, "pending-review")
        assert remaining(runtime, execution_id) == 0


async def test_invalid_targets_are_422_naming_the_gate_and_the_field(settings: Settings) -> None:
    cases = {
        "prompt": "has no seed param",
        "out": "is not upstream of input 'image'",
        "ghost": "is not a node of this workflow",
    }
    async with gate_runtime(settings) as runtime, api_client(runtime) as client:
        for target, message in cases.items():
            response = await client.post(f"{API}/workflows", json=gated(passing=[], target=target))
            assert response.status_code == 422, response.text
            [problem] = response.json()["errors"]
            assert (problem["nodeId"], problem["field"]) == ("gate", "params.target")
            assert message in problem["message"]
        # Nothing to decide from (no `passed`, no thresholds) is found just as early.
        response = await client.post(f"{API}/workflows", json=gated(passing=[], by="scores"))
        assert response.status_code == 422
        [problem] = response.json()["errors"]
        assert (problem["nodeId"], problem["field"]) == ("gate", "params.thresholds")
        # And so is a target the execute request's overrides point elsewhere.
        saved = await client.post(f"{API}/workflows", json=gated(passing=[], target="gen"))
        assert saved.status_code == 201, saved.text
        response = await client.post(
            f"{API}/workflows/{saved.json()['id']}/execute",
            json={"nodes": [{"id": "gate", "data": {"params": {"target": "judge"}}}]},
        )
        assert response.status_code == 422
        [problem] = response.json()["errors"]
        assert (problem["nodeId"], problem["field"]) == ("gate", "params.target")


async def test_without_a_seed_upstream_only_one_attempt_is_valid(
    client: httpx.AsyncClient,
) -> None:
    document = workflow(
        [
            node("img", "input:image", "Image", image="https://example.com/a.png"),
            node("gate", "quality:gate", thresholds={"sharpness": {"min": 1}}),
            node("out", "output:image"),
        ],
        [edge("img", "image", "gate", "image"), edge("gate", "image", "out", "image")],
    )
    response = await client.post(f"{API}/workflows", json=document)
    assert response.status_code == 422
    [problem] = response.json()["errors"]
    assert (problem["nodeId"], problem["field"]) == ("gate", "params.target")
    document["nodes"][1]["data"]["params"]["maxAttempts"] = 1
    response = await client.post(f"{API}/workflows", json=document)
    assert response.status_code == 201, response.text


async def test_a_gate_whose_generation_was_sent_back_meanwhile_lets_its_image_go(
    settings: Settings,
) -> None:
    """Straight against the transitions: when the target was made again after the gate read
    it (another gate sent it back), the gate's fallback outputs are recorded instead."""
    registry = builtin_registry()
    registry.register(Judge())
    runtime = Runtime.build(settings, run_worker=False, registry=registry)
    await runtime.start()
    try:
        await _stale_regeneration(runtime)
    finally:
        await runtime.stop()


async def _stale_regeneration(runtime: Runtime) -> None:
    owner = "host:1:test"
    doc = parse_workflow(gated(passing=[]))
    plan = validate_workflow(doc, runtime.registry)
    now = datetime.now(UTC)
    lease = Lease(owner, 30, 10)
    _, claims, _ = transitions.create_execution(
        runtime.db,
        execution_id="exec_stale",
        workspace_id=DEFAULT_WORKSPACE,
        workflow_id=None,
        workflow_version=None,
        graph=doc.to_json(),
        inputs={},
        plan=plan,
        now=now,
        lease=lease,
    )
    image = ImageValue("asset_x", "0" * 64, "png", 64, 64, {"seed": 42})
    outputs = {
        "prompt": {"text": {"type": "text", "value": "a lighthouse"}},
        "gen": {"image": image.to_json()},
        "judge": {
            "image": image.to_json(),
            "passed": {"type": "boolean", "value": False},
            "scores": {"type": "json", "value": {}},
        },
    }
    while claims[0].node_id != "gate":
        [claim] = claims
        [done] = transitions.complete_many(
            runtime.db,
            owner,
            [
                transitions.Finished(
                    claim, plan, Success(outputs[claim.node_id], 1.0), lease, workspace_id=WS
                )
            ],
            now,
        )
        claims = done.claims
    [gate] = claims
    fallback = {
        "image": dataclasses.replace(image, review="pending-review").to_json(),
        "passed": {"type": "boolean", "value": False},
        "scores": {"type": "json", "value": {"decision": "pending-review"}},
    }
    request = Regeneration(
        target="gen",
        seen=1,  # the gate saw a later generation than the one recorded: stale
        adjust={"seed": 43},
        detail={"attempt": 2},
        instead=Success(fallback, 1.0),
        duration_ms=1.0,
    )
    lost = transitions.regenerate(
        runtime.db, "someone:else:x", gate, plan, request, now, workspace_id=WS
    )
    assert lost.accepted is False
    completion = transitions.regenerate(
        runtime.db, owner, gate, plan, request, now, lease, workspace_id=WS
    )
    assert completion.accepted is True
    assert completion.reset == ()
    assert [e.type for e in completion.events] == ["node.succeeded", "node.started"]
    assert [c.node_id for c in completion.claims] == ["out"]
    runs = queries.load_outputs(runtime.db, "exec_stale", ["gen", "gate"])
    assert runs["gate"] == fallback
    assert runs["gen"] == outputs["gen"]
