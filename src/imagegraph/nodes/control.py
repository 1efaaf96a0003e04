"""Control nodes: route by a condition (`control:branch`), gather images (`control:collect`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from imagegraph.errors import Issue, NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs

Operator = Literal[
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "contains",
    "not_contains",
    "matches",
    "empty",
    "not_empty",
]
NUMERIC = frozenset({"gt", "gte", "lt", "lte"})


class BranchParams(NodeParams):
    operator: Operator = Field(default="eq", description="How `value` is compared.")
    compare_to: float | str | None = Field(
        default=None, description="What `value` is compared with (unused by empty/not_empty)."
    )
    case_sensitive: bool = Field(default=False, description="For text comparisons.")


class Branch(Node[BranchParams]):
    """Routes its payload to `true` or `false`; nodes only reachable through the other route
    are SKIPPED. The payload is `input` when connected, else `value` itself."""

    type = "control:branch"
    title = "Branch"
    description = "Routes to `true` or `false` by comparing a number or text."
    params_model = BranchParams
    inputs = (
        InputPort(
            "value",
            PortType.NUMBER,
            accepts=frozenset({PortType.TEXT}),
            description="The number or text the condition looks at.",
        ),
        InputPort(
            "input",
            PortType.ANY,
            required=False,
            description="What is routed; defaults to `value`.",
        ),
    )
    outputs = (OutputPort("true", PortType.ANY), OutputPort("false", PortType.ANY))

    def output_ports(
        self, params: BranchParams, input_types: Mapping[str, PortType]
    ) -> tuple[OutputPort, ...]:
        routed = input_types.get("input") or input_types.get("value") or PortType.ANY
        return (OutputPort("true", routed), OutputPort("false", routed))

    def check(self, params: BranchParams) -> list[Issue]:
        if params.operator in NUMERIC and not isinstance(params.compare_to, int | float):
            return [
                Issue(
                    "invalid_param",
                    f"operator {params.operator!r} needs a number in params.compareTo",
                    field="params.compareTo",
                )
            ]
        if params.operator == "matches":
            try:
                re.compile(str(params.compare_to or ""))
            except re.error as exc:
                return [
                    Issue(
                        "invalid_param",
                        f"params.compareTo is not a valid regular expression: {exc}",
                        field="params.compareTo",
                    )
                ]
        if params.operator not in ("empty", "not_empty") and params.compare_to is None:
            return [
                Issue(
                    "invalid_param",
                    f"operator {params.operator!r} needs params.compareTo",
                    field="params.compareTo",
                )
            ]
        return []

    async def run(self, ctx: NodeContext, params: BranchParams, inputs: Inputs) -> Outputs:
        value = inputs["value"]
        route = "true" if evaluate(params, value) else "false"
        return {route: inputs.get("input", value)}


def evaluate(params: BranchParams, value: Any) -> bool:
    op = params.operator
    if op == "empty":
        return value is None or str(value).strip() == ""
    if op == "not_empty":
        return not (value is None or str(value).strip() == "")
    if op in NUMERIC:
        number = _number(value)
        target = float(params.compare_to)  # type: ignore[arg-type]
        return {
            "gt": number > target,
            "gte": number >= target,
            "lt": number < target,
            "lte": number <= target,
        }[op]
    if op in ("eq", "ne") and isinstance(params.compare_to, int | float):
        as_number = _maybe_number(value)
        if as_number is not None:
            equal = as_number == float(params.compare_to)
            return equal if op == "eq" else not equal
    return _text_op(params, value)


def _text_op(params: BranchParams, value: Any) -> bool:
    text, target = _text(value), _text(params.compare_to)
    flags = 0
    if not params.case_sensitive:
        text, target, flags = text.casefold(), target.casefold(), re.IGNORECASE
    op = params.operator
    if op == "eq":
        return text == target
    if op == "ne":
        return text != target
    if op == "contains":
        return target in text
    if op == "not_contains":
        return target not in text
    if op == "matches":
        return re.search(_text(params.compare_to), _text(value), flags) is not None
    raise NodeError(f"operator {op!r} does not apply to text", code="invalid_value")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise NodeError(
            f"value {str(value)[:50]!r} is not a number", code="invalid_value"
        ) from None


def _maybe_number(value: Any) -> float | None:
    try:
        return _number(value)
    except NodeError:
        return None


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


class CollectParams(NodeParams):
    pass


class Collect(Node[CollectParams]):
    """Fan-in: every image or image list connected to `images`, in edge order, as one list."""

    type = "control:collect"
    title = "Collect images"
    description = "Gathers several images (fan-in) into one image list."
    params_model = CollectParams
    inputs = (InputPort("images", PortType.IMAGE_LIST, multiple=True),)
    outputs = (OutputPort("images", PortType.IMAGE_LIST),)

    async def run(self, ctx: NodeContext, params: CollectParams, inputs: Inputs) -> Outputs:
        return {"images": list(inputs["images"])}
