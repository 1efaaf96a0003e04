"""State transitions straight against the database (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from imagegraph.engine import queries, transitions
from imagegraph.engine.transitions import Finished, Lease, Success
from imagegraph.graph.model import parse_workflow
from imagegraph.graph.plan import Plan
from imagegraph.graph.validate import validate_workflow
from imagegraph.nodes.values import ImageValue
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store import assets as asset_store
from imagegraph.store.tables import node_runs
from tests.builders import linear

WS = "ws_default"
OWNER = "host:1:test"
TEXT = {"text": {"type": "text", "value": "a fox"}}
IMAGE = {"image": {"type": "text", "value": "stands in for an image"}}


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Storage only: no worker, so every transition here is made by the test."""
    runtime = Runtime.build(settings, run_worker=False)
    await runtime.start()
    yield runtime
    await runtime.stop()


def queue(runtime: Runtime, execution_id: str) -> tuple[Plan, transitions.Claim]:
    doc = parse_workflow(linear())
    plan = validate_workflow(doc, runtime.registry)
    _, claims, _ = transitions.create_execution(
        runtime.db,
        execution_id=execution_id,
        workspace_id="ws_default",
        workflow_id=None,
        workflow_version=None,
        graph=doc.to_json(),
        inputs={},
        plan=plan,
        now=datetime.now(UTC),
        lease=Lease(OWNER, 30, 10),
    )
    [claim] = claims  # the generator: the prompt was settled as the execution was created
    return plan, claim


async def test_a_source_whose_outputs_follow_from_its_params_is_settled_at_creation(
    runtime: Runtime,
) -> None:
    plan, claim = queue(runtime, "exec_a")
    assert (claim.node_id, claim.attempt) == ("gen", 1)
    prompt = {"text": {"type": "text", "value": "a red fox in the snow"}}
    assert queries.load_outputs(runtime.db, "exec_a", ["prompt", "gen"]) == {
        "prompt": prompt,
        "gen": None,
    }
    recorded = [(e.type, e.node_id) for e in queries.load_events(runtime.db, "exec_a")]
    assert recorded == [
        ("execution.queued", None),
        ("execution.started", None),
        ("node.started", "prompt"),
        ("node.succeeded", "prompt"),
        ("node.started", "gen"),
    ]
    # Two node runs left: finishing the generator and the output ends the execution.
    [done] = transitions.complete_many(
        runtime.db,
        OWNER,
        [Finished(claim, plan, Success(IMAGE, 1.0), Lease(OWNER, 30, 1), workspace_id=WS)],
        datetime.now(UTC),
    )
    [out] = done.claims
    [ended] = transitions.complete_many(
        runtime.db,
        OWNER,
        [Finished(out, plan, Success({}, 1.0), workspace_id=WS)],
        datetime.now(UTC),
    )
    assert ended.finished is not None
    assert ended.finished.value == "COMPLETED"


async def test_a_batch_records_each_outcome_and_claims_successors(runtime: Runtime) -> None:
    plan_a, claim_a = queue(runtime, "exec_a")
    plan_b, claim_b = queue(runtime, "exec_b")
    completions = transitions.complete_many(
        runtime.db,
        OWNER,
        [
            Finished(claim_a, plan_a, Success(IMAGE, 1.0), Lease(OWNER, 30, 1), workspace_id=WS),
            Finished(claim_b, plan_b, Success(IMAGE, 1.0), Lease(OWNER, 30, 1), workspace_id=WS),
        ],
        datetime.now(UTC),
    )
    assert [c.accepted for c in completions] == [True, True]
    assert [[x.node_id for x in c.claims] for c in completions] == [["out"], ["out"]]
    for completion, execution_id in zip(completions, ["exec_a", "exec_b"], strict=True):
        assert {e.execution_id for e in completion.events} == {execution_id}
        assert [e.type for e in completion.events] == ["node.succeeded", "node.started"]
    recorded = [e.type for e in queries.load_events(runtime.db, "exec_a")]
    assert recorded.count("node.succeeded") == 2  # each event stored once (and the prompt's)
    assert recorded.count("node.started") == 3


async def test_a_stale_run_in_a_batch_changes_nothing_and_spares_the_others(
    runtime: Runtime,
) -> None:
    plan_a, claim_a = queue(runtime, "exec_a")
    plan_b, claim_b = queue(runtime, "exec_b")
    transitions.cancel_execution(runtime.db, "ws_default", "exec_b", datetime.now(UTC))
    completions = transitions.complete_many(
        runtime.db,
        OWNER,
        [
            Finished(claim_a, plan_a, Success(TEXT, 1.0), workspace_id=WS),
            Finished(claim_b, plan_b, Success(TEXT, 1.0), workspace_id=WS),
        ],
        datetime.now(UTC),
    )
    assert [c.accepted for c in completions] == [True, False]
    assert completions[1].events == []
    assert queries.execution_status(runtime.db, "ws_default", "exec_b").value == "CANCELLED"  # type: ignore[union-attr]
    events_b = [(e.type, e.node_id) for e in queries.load_events(runtime.db, "exec_b")]
    assert ("node.succeeded", "gen") not in events_b


async def test_a_lease_held_by_another_worker_is_not_ours_to_complete(runtime: Runtime) -> None:
    plan, claim = queue(runtime, "exec_a")
    [completion] = transitions.complete_many(
        runtime.db,
        "someone:else:x",
        [Finished(claim, plan, Success(TEXT, 1.0), workspace_id=WS)],
        datetime.now(UTC),
    )
    assert completion.accepted is False
    outputs = queries.load_outputs(runtime.db, "exec_a", ["gen"])
    assert outputs == {"gen": None}


async def test_an_earlier_attempt_cannot_record_over_a_later_one(runtime: Runtime) -> None:
    """Lease lapsed, run claimed again by the same worker: the first attempt's late outcome
    is refused (the attempt number fences it), the second attempt's is recorded."""
    plan, first = queue(runtime, "exec_a")
    transitions.requeue_runs(runtime.db, datetime.now(UTC), owners=[OWNER])
    [second], _ = transitions.claim(runtime.db, OWNER, 10, 30, datetime.now(UTC))
    assert (second.run_id, second.attempt) == (first.run_id, 2)
    late = {"text": {"type": "text", "value": "from the first attempt"}}
    [stale] = transitions.complete_many(
        runtime.db,
        OWNER,
        [Finished(first, plan, Success(late, 1.0), workspace_id=WS)],
        datetime.now(UTC),
    )
    [current] = transitions.complete_many(
        runtime.db,
        OWNER,
        [Finished(second, plan, Success(TEXT, 1.0), workspace_id=WS)],
        datetime.now(UTC),
    )
    assert (stale.accepted, current.accepted) == (False, True)
    assert queries.load_outputs(runtime.db, "exec_a", ["gen"]) == {"gen": TEXT}


# -- runs settled at once: an output of an image that is stored already --------------------


def _generated(size_bytes: int | None = 2048, fmt: str = "png") -> dict[str, Any]:
    image = ImageValue(
        "asset_gen", "ab" * 32, fmt, 128, 128, {"prompt": "a fox", "seed": 7}, size_bytes=size_bytes
    )
    return {"image": image.to_json()}


async def test_an_output_of_a_stored_image_succeeds_in_the_transaction_that_gives_it_one(
    runtime: Runtime,
) -> None:
    plan, claim = queue(runtime, "exec_a")
    [done] = transitions.complete_many(
        runtime.db,
        OWNER,
        [Finished(claim, plan, Success(_generated(), 1.0), Lease(OWNER, 30, 1), workspace_id=WS)],
        datetime.now(UTC),
    )
    assert done.claims == []  # nothing left to run: the output did not need to
    assert done.finished is not None
    assert done.finished.value == "COMPLETED"
    assert [(e.type, e.node_id) for e in done.events] == [
        ("node.succeeded", "gen"),
        ("node.started", "out"),
        ("node.succeeded", "out"),
        ("execution.completed", None),
    ]
    out = queries.load_outputs(runtime.db, "exec_a", ["out"])["out"]
    assert out is not None
    image = ImageValue.from_json(out["image"])
    assert (image.sha256, image.size_bytes, image.generation["seed"]) == ("ab" * 32, 2048, 7)
    [asset] = asset_store.execution_outputs(runtime.db, "exec_a")
    assert asset["id"] == image.asset_id != "asset_gen"
    assert (asset["workspace_id"], asset["node_id"], asset["sha256"]) == (WS, "out", "ab" * 32)
    assert asset["meta"]["parents"] == ["asset_gen"]
    with runtime.db.read() as conn:
        run = conn.execute(
            select(node_runs).where(
                node_runs.c.execution_id == "exec_a", node_runs.c.node_id == "out"
            )
        ).one()
    assert (run.state, run.attempt, run.duration_ms, run.lease_owner) == ("SUCCEEDED", 1, 0.0, None)


@pytest.mark.parametrize(
    ("generated", "why"),
    [
        (_generated(size_bytes=None), "the size of an image recorded before sizes were kept"),
        (_generated(fmt="webp"), "a conversion to the output's format (png)"),
    ],
)
async def test_an_output_with_work_to_do_is_run_as_usual(
    runtime: Runtime, generated: dict[str, Any], why: str
) -> None:
    plan, claim = queue(runtime, "exec_a")
    [done] = transitions.complete_many(
        runtime.db,
        OWNER,
        [Finished(claim, plan, Success(generated, 1.0), Lease(OWNER, 30, 1), workspace_id=WS)],
        datetime.now(UTC),
    )
    assert [c.node_id for c in done.claims] == ["out"], why
    assert done.finished is None
