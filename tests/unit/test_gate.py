"""`quality:gate` on an in-memory context: decisions, adjusted params, validation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field, ValidationError

from imagegraph.errors import NodeError, WorkflowInvalid
from imagegraph.graph.model import parse_workflow
from imagegraph.graph.validate import validate_workflow
from imagegraph.nodes import builtin_registry
from imagegraph.nodes.base import NodeParams, Outputs, Regenerate, RegenerationTarget
from imagegraph.nodes.gate import Adjust, GateParams, adjusted
from imagegraph.nodes.sandbox import SandboxParams
from imagegraph.nodes.values import ImageValue
from imagegraph.testing import MemoryContext
from tests.builders import edge, node, workflow

REGISTRY = builtin_registry()
GATE = REGISTRY["quality:gate"]
IMAGE = ImageValue("asset_1", "a" * 64, "png", 64, 64, {"seed": 7}, quality={"sharpness": 80})


def target(regenerations: int = 0, **params: Any) -> RegenerationTarget:
    full = SandboxParams(**params).model_dump(mode="json", by_alias=True)
    return RegenerationTarget("gen", "generate:sandbox", regenerations, full, SandboxParams)


async def run(params: dict[str, Any], inputs: dict[str, Any], **ctx: Any) -> Outputs:
    context = MemoryContext(**ctx)
    return await GATE.run(context.as_context(), GATE.parse_params(params), inputs)


async def test_an_image_within_every_threshold_is_approved() -> None:
    out = await run(
        {"thresholds": {"sharpness": {"min": 50, "max": 100}}},
        {"image": IMAGE},
        regeneration_target=target(seed=7),
    )
    assert out["passed"] is True
    assert out["image"].review == "approved"
    assert out["image"].asset_id == IMAGE.asset_id  # passed on, not copied
    assert out["scores"]["decision"] == "approved"
    assert out["scores"]["values"] == {"sharpness": 80}
    assert out["scores"]["attempt"] == 1


async def test_scores_win_over_the_image_measurements_and_missing_ones_fail() -> None:
    thresholds = {"sharpness": {"min": 50}, "contrast": {"min": 10}, "label": {"max": 1}}
    with pytest.raises(Regenerate) as raised:
        await run(
            {"thresholds": thresholds},
            {"image": IMAGE, "scores": {"sharpness": {"value": 20}, "label": "x"}},
            regeneration_target=target(seed=7),
        )
    detail = raised.value.detail
    assert detail["values"] == {"contrast": None, "label": "x", "sharpness": 20.0}
    assert detail["failures"] == [
        "contrast was not measured",
        "label is not a number ('x')",
        "sharpness 20 is below min 50",
    ]


async def test_a_failure_with_attempts_left_asks_for_the_next_seed() -> None:
    with pytest.raises(Regenerate) as raised:
        await run(
            {"maxAttempts": 3, "adjust": {"stepsIncrease": 5}, "onExhausted": "reject"},
            {"image": IMAGE, "passed": False, "scores": {"failures": ["too soft"]}},
            regeneration_target=target(regenerations=1, seed=8, steps=20),
        )
    signal = raised.value
    assert signal.adjust == {"seed": 9, "steps": 25}
    assert signal.detail["attempt"] == 2
    assert signal.detail["failures"] == ["too soft"]
    # What goes on should the engine not send the generation back after all.
    assert signal.outputs["image"].review == "rejected"
    assert signal.outputs["scores"]["regenerated"] is False


async def test_the_last_attempt_sends_the_image_on_for_review() -> None:
    out = await run(
        {"maxAttempts": 3},
        {"image": IMAGE, "passed": False},
        regeneration_target=target(regenerations=2, seed=9),
    )
    assert out["passed"] is False
    assert out["image"].review == "pending-review"
    assert out["scores"]["decision"] == "pending-review"
    assert out["scores"]["attempt"] == 3
    assert out["scores"]["failures"] == ["the connected check did not pass"]


async def test_without_a_generation_to_send_back_the_image_goes_on() -> None:
    out = await run({"maxAttempts": 1}, {"image": IMAGE, "passed": False})
    assert out["image"].review == "pending-review"
    assert out["scores"]["target"] is None


class NarrowParams(NodeParams):
    seed: int | None = Field(default=None, ge=10, le=12)
    steps: int = Field(default=48, ge=1, le=50)


def test_adjusted_params_stay_within_the_target_bounds() -> None:
    narrow = RegenerationTarget("g", "x:y", 0, {"seed": 12, "steps": 48}, NarrowParams)
    assert adjusted(Adjust(steps_increase=8), narrow, IMAGE) == {"seed": 10, "steps": 50}
    drawn = RegenerationTarget("g", "x:y", 0, {"seed": None, "steps": 1}, NarrowParams)
    image = ImageValue("a", "b" * 64, "png", 8, 8, {"seed": 11})
    assert adjusted(Adjust(), drawn, image) == {"seed": 12}
    for _ in range(20):
        seed = adjusted(Adjust(seed="random"), narrow, IMAGE)["seed"]
        assert seed in (10, 11)  # never the seed that just failed


def test_adjusting_a_target_into_invalid_params_fails_clearly() -> None:
    class Picky(NodeParams):
        seed: int = 1
        steps: int = Field(default=10, multiple_of=10)

    picky = RegenerationTarget("g", "x:y", 0, {"seed": 1, "steps": 10}, Picky)
    with pytest.raises(NodeError, match="cannot make g again"):
        adjusted(Adjust(steps_increase=5), picky, IMAGE)


def test_params_are_checked() -> None:
    with pytest.raises(ValidationError, match="set min, max or both"):
        GateParams.model_validate({"thresholds": {"sharpness": {}}})
    with pytest.raises(ValidationError, match="min 5 is above max 1"):
        GateParams.model_validate({"thresholds": {"sharpness": {"min": 5, "max": 1}}})
    with pytest.raises(ValidationError):
        GateParams.model_validate({"maxAttempts": 11})
    assert GateParams.model_validate({"target": " "}).target is None


def gated_graph(**gate: Any) -> dict[str, Any]:
    return workflow(
        [
            node("prompt", "input:text", text="a fox"),
            node("gen", "generate:sandbox", seed=1),
            node("resize", "image:resize", width=32, height=32),
            node("gate", "quality:gate", **gate),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "resize", "image"),
            edge("resize", "image", "gate", "image"),
            edge("gate", "image", "out", "image"),
        ],
    )


def test_the_target_is_the_nearest_seeded_node_upstream_of_the_image() -> None:
    plan = validate_workflow(
        parse_workflow(gated_graph(thresholds={"sharpness": {"min": 1}})), REGISTRY
    )
    gate = plan.nodes["gate"]
    assert gate.node.regeneration_target(gate, plan) == "gen"
    assert plan.between("gen", "gate") == ("gen", "resize", "gate")
    assert plan.between("gate", "gen") == ()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("resize", "has no seed param"),
        ("out", "is not upstream of input 'image'"),
        ("nope", "is not a node of this workflow"),
    ],
)
def test_a_bad_target_is_an_issue_of_the_gate(target: str, message: str) -> None:
    doc = parse_workflow(gated_graph(thresholds={"sharpness": {"min": 1}}, target=target))
    with pytest.raises(WorkflowInvalid) as raised:
        validate_workflow(doc, REGISTRY)
    [issue] = raised.value.issues
    assert (issue.node_id, issue.field) == ("gate", "params.target")
    assert message in issue.message
