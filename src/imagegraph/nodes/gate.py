"""`quality:gate`: let an image through when it passes, have its generation made again
(a new seed, more steps) when it does not, and after the last attempt mark it for review.

The gate decides from its `passed` input when that is connected (a `quality:check` says
whether its limits hold), else from `thresholds` on the numbers in `scores` or in the
image's quality measurements. An image that fails while attempts remain is not passed on:
the gate raises `Regenerate`, and the engine sends the generation (`target`) back with the
adjusted params, re-running every node between it and the gate. `maxAttempts` counts the
generations in all, so the loop always ends. The image that leaves the gate carries its
review state (`approved`, `pending-review` or `rejected`), which becomes the review state
of the output asset made from it.

The gate only reads values; it stores nothing and never touches the database (the engine
tells it how many times the generation was made: `NodeContext.regeneration_target`).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, StringConstraints, ValidationError, model_validator

from imagegraph.errors import Issue, NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import (
    Inputs,
    Node,
    NodeContext,
    NodeParams,
    Outputs,
    Regenerate,
    RegenerationTarget,
)
from imagegraph.nodes.values import ImageValue

if TYPE_CHECKING:
    from imagegraph.graph.plan import Plan, PlanNode

APPROVED = "approved"
PENDING_REVIEW = "pending-review"
REJECTED = "rejected"
MAX_SEED = 2**32 - 1


class Bounds(NodeParams):
    min: float | None = Field(default=None, description="Smallest value accepted.")
    max: float | None = Field(default=None, description="Largest value accepted.")

    @model_validator(mode="after")
    def _a_bound(self) -> Self:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


class Adjust(NodeParams):
    seed: Literal["increment", "random"] = Field(
        default="increment",
        description="The seed of the next attempt: the last one plus 1, or a random one.",
    )
    steps_increase: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Steps added at each attempt, for generations with a `steps` param (up "
        "to its maximum).",
    )


def _empty_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


Metric = Annotated[str, StringConstraints(min_length=1, max_length=100)]
NodeId = Annotated[str | None, BeforeValidator(_empty_is_none)]


class GateParams(NodeParams):
    thresholds: dict[Metric, Bounds] = Field(
        default_factory=dict,
        max_length=50,
        description='Bounds by measurement name, e.g. {"sharpness": {"min": 100}}: looked '
        "up in `scores`, then in the image's quality measurements. Used when `passed` is "
        "not connected.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Generations in all, the first included; after the last one a failing "
        "image goes on as `onExhausted` says.",
    )
    target: NodeId = Field(
        default=None,
        description="Id of the generation to make again; empty: the nearest node upstream "
        "of `image` that has a seed.",
    )
    adjust: Adjust = Field(
        default_factory=Adjust, description="How the params change at each new attempt."
    )
    on_exhausted: Literal["review", "reject"] = Field(
        default="review",
        description="The review state of an image that failed every attempt: "
        "pending-review (a person decides) or rejected.",
    )


class QualityGate(Node[GateParams]):
    """Approves an image, has it made again, or sends it on for review.

    The image is passed on with its review state set: `approved` when it passed, else (the
    attempts used up) `pending-review` or `rejected` as `onExhausted` says. `scores` holds
    the decision, the attempt (1 for the first generation), the values checked and the
    checks that failed.
    """

    type = "quality:gate"
    title = "Quality gate"
    description = (
        "Passes images that meet thresholds; has the others made again (new seed, more "
        "steps) up to maxAttempts, then marks them for review."
    )
    params_model = GateParams
    inputs = (
        InputPort("image", PortType.IMAGE, description="The image to judge."),
        InputPort(
            "scores",
            PortType.JSON,
            required=False,
            description="Measurements by name (a quality node's `scores`), for `thresholds`.",
        ),
        InputPort(
            "passed",
            PortType.BOOLEAN,
            required=False,
            description="A check's verdict; when connected, it decides instead of thresholds.",
        ),
    )
    outputs = (
        OutputPort("image", PortType.IMAGE, "The image, with its review state."),
        OutputPort("passed", PortType.BOOLEAN, "Whether the last attempt passed."),
        OutputPort("scores", PortType.JSON, "Decision, attempt, values checked, failures."),
    )

    def check_plan(self, node: PlanNode, plan: Plan) -> list[Issue]:
        params = node.params
        assert isinstance(params, GateParams)
        issues = []
        if params.target is not None:
            problem = _target_problem(params.target, node, plan)
            if problem is not None:
                issues.append(Issue("invalid_param", problem, field="params.target"))
        elif params.max_attempts > 1 and _nearest_seeded(node, plan) is None:
            issues.append(
                Issue(
                    "invalid_param",
                    "no node upstream of input 'image' has a seed to change; set "
                    "params.target, or params.maxAttempts to 1",
                    field="params.target",
                )
            )
        if "passed" not in node.inputs and not params.thresholds:
            issues.append(
                Issue(
                    "invalid_param",
                    "nothing to decide from: connect input 'passed' or set params.thresholds",
                    field="params.thresholds",
                )
            )
        return issues

    def regeneration_target(self, node: PlanNode, plan: Plan) -> str | None:
        params = node.params
        assert isinstance(params, GateParams)
        return params.target or _nearest_seeded(node, plan)

    async def run(self, ctx: NodeContext, params: GateParams, inputs: Inputs) -> Outputs:
        image: ImageValue = inputs["image"]
        target = ctx.regeneration_target
        attempt = target.regenerations + 1 if target is not None else 1
        checked, values, failures = judge(params, image, inputs)
        scores: dict[str, Any] = {
            "decision": APPROVED,
            "passed": not failures,
            "attempt": attempt,
            "maxAttempts": params.max_attempts,
            "target": target.node_id if target is not None else None,
            "checked": checked,
            "values": values,
            "failures": failures,
        }
        if not failures:
            return _outputs(image, APPROVED, scores)
        review = REJECTED if params.on_exhausted == "reject" else PENDING_REVIEW
        if target is None or attempt >= params.max_attempts:
            return _outputs(image, review, {**scores, "decision": review})
        adjust = adjusted(params.adjust, target, image)
        raise Regenerate(
            adjust,
            # Should the engine find the generation already sent back again (by another
            # gate), this image goes on as if its attempts were used up.
            outputs=_outputs(image, review, {**scores, "decision": review, "regenerated": False}),
            detail={
                "target": target.node_id,
                "attempt": attempt,
                "maxAttempts": params.max_attempts,
                "checked": checked,
                "values": values,
                "failures": failures,
                "adjust": adjust,
            },
        )


def _outputs(image: ImageValue, review: str, scores: dict[str, Any]) -> Outputs:
    return {
        "image": dataclasses.replace(image, review=review),
        "passed": review == APPROVED,
        "scores": scores,
    }


def judge(
    params: GateParams, image: ImageValue, inputs: Inputs
) -> tuple[str, dict[str, Any], list[str]]:
    """What was checked ("passed" or "thresholds"), the values looked at, and a sentence per
    failed check (empty when the image passes)."""
    scores = inputs.get("scores")
    measured: dict[str, Any] = dict(image.quality)
    if isinstance(scores, Mapping):
        measured.update(scores)
    if inputs.get("passed") is not None:
        passed = bool(inputs["passed"])
        failures: list[str] = []
        if not passed:
            reasons = measured.get("failures")
            if isinstance(reasons, list) and reasons:
                failures = [str(r) for r in reasons]
            else:
                failures = ["the connected check did not pass"]
        return "passed", {"passed": passed}, failures
    values: dict[str, Any] = {}
    failures = []
    for name, bounds in sorted(params.thresholds.items()):
        raw = measured.get(name)
        value = _number(raw)
        values[name] = value if value is not None else raw
        if value is None:
            what = "was not measured" if raw is None else f"is not a number ({str(raw)[:40]!r})"
            failures.append(f"{name} {what}")
        elif bounds.min is not None and value < bounds.min:
            failures.append(f"{name} {value:g} is below min {bounds.min:g}")
        elif bounds.max is not None and value > bounds.max:
            failures.append(f"{name} {value:g} is above max {bounds.max:g}")
    return "thresholds", values, failures


def _number(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def adjusted(adjust: Adjust, target: RegenerationTarget, image: ImageValue) -> dict[str, Any]:
    """The params the next attempt of `target` changes: its seed, and its steps when asked
    (kept within the bounds of its params)."""
    model = target.params_model
    low, high = _int_bounds(model, "seed", 0, MAX_SEED)
    current = target.params.get("seed")
    if not isinstance(current, int):
        current = image.generation.get("seed")  # a random seed: the one that was drawn
    if adjust.seed == "increment" and isinstance(current, int):
        seed = current + 1 if current < high else low
    else:
        seed = low + secrets.randbelow(high - low + 1)
        if seed == current:
            seed = seed + 1 if seed < high else low
    changes: dict[str, Any] = {"seed": seed}
    steps = target.params.get("steps")
    if adjust.steps_increase and "steps" in model.model_fields and isinstance(steps, int):
        _, most = _int_bounds(model, "steps", 1, steps + adjust.steps_increase)
        changes["steps"] = min(steps + adjust.steps_increase, most)
    try:
        model.model_validate({**target.params, **changes})
    except ValidationError as exc:
        raise NodeError(
            f"cannot make {target.node_id} again with {changes}: {exc.errors()[0]['msg']}",
            code="invalid_adjust",
        ) from None
    return changes


def _int_bounds(model: type[NodeParams], name: str, low: int, high: int) -> tuple[int, int]:
    """The inclusive bounds a params model sets on an int field (`low`, `high` where unset)."""
    for item in model.model_fields[name].metadata:
        ge, gt = getattr(item, "ge", None), getattr(item, "gt", None)
        le, lt = getattr(item, "le", None), getattr(item, "lt", None)
        if isinstance(ge, int | float):
            low = max(low, int(ge))
        if isinstance(gt, int | float):
            low = max(low, int(gt) + 1)
        if isinstance(le, int | float):
            high = min(high, int(le))
        if isinstance(lt, int | float):
            high = min(high, int(lt) - 1)
    return low, high


def _upstream_of_image(node: PlanNode, plan: Plan) -> list[str]:
    """Every node the gate's image comes from, nearest first (breadth first, in edge
    order)."""
    queue = deque(edge.source for edge in node.inputs.get("image", ()))
    seen: list[str] = []
    while queue:
        node_id = queue.popleft()
        if node_id in seen:
            continue
        seen.append(node_id)
        queue.extend(plan.nodes[node_id].predecessors)
    return seen


def _has_seed(node: PlanNode) -> bool:
    return "seed" in node.node.params_model.model_fields


def _nearest_seeded(node: PlanNode, plan: Plan) -> str | None:
    return next(
        (n for n in _upstream_of_image(node, plan) if _has_seed(plan.nodes[n])),
        None,
    )


def _target_problem(target: str, node: PlanNode, plan: Plan) -> str | None:
    if target not in plan.nodes:
        return f"params.target {target!r} is not a node of this workflow"
    if target not in _upstream_of_image(node, plan):
        return f"params.target {target!r} is not upstream of input 'image'"
    if not _has_seed(plan.nodes[target]):
        return f"params.target {target!r} ({plan.nodes[target].type}) has no seed param to change"
    return None
