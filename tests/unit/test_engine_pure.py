"""The engine's pure parts: what a settled node does next, cache keys, execution inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from imagegraph.engine.cache import cache_key
from imagegraph.engine.inputs import apply_execution_inputs
from imagegraph.engine.states import RunState
from imagegraph.engine.transitions import decide
from imagegraph.errors import InvalidInput, Issue
from imagegraph.graph.model import WorkflowDoc, parse_workflow
from imagegraph.graph.plan import Plan
from imagegraph.graph.validate import validate_workflow
from imagegraph.nodes import builtin_registry
from imagegraph.nodes.values import ImageValue
from tests.builders import edge, linear, node, workflow

REGISTRY = builtin_registry()

Settled = tuple[RunState, Mapping[str, Any] | None]

IMAGE = ImageValue("asset_a", "a" * 64, "png", 64, 64).to_json()


def succeeded(**outputs: Any) -> Settled:
    return (RunState.SUCCEEDED, outputs)


# transitions.decide


def branching_plan() -> Plan:
    """A branch on a number routes the prompt to `yes` (true) or `no` (false); both generators
    fan in to one collect. `neg` takes its negative prompt from the false route only, and
    `tpl` (whose one variable has a default) is fed only by the false route."""
    nodes = [
        node("count", "input:number", value=5),
        node("prompt", "input:text", text="fox"),
        node("branch", "control:branch", operator="gt", compareTo=3),
        node("yes", "generate:sandbox", seed=1),
        node("no", "generate:sandbox", seed=2),
        node("neg", "generate:sandbox", seed=3),
        node("tpl", "prompt:template", template="${subject}", variables={"subject": "x"}),
        node("collect", "control:collect"),
        node("grid", "image:grid"),
        node("out", "output:image"),
    ]
    edges = [
        edge("count", "number", "branch", "value"),
        edge("prompt", "text", "branch", "input"),
        edge("branch", "true", "yes", "prompt"),
        edge("branch", "false", "no", "prompt"),
        edge("prompt", "text", "neg", "prompt"),
        edge("branch", "false", "neg", "negativePrompt"),
        edge("branch", "false", "tpl", "subject"),
        edge("tpl", "text", "no", "negativePrompt"),
        edge("yes", "image", "collect", "images"),
        edge("no", "image", "collect", "images"),
        edge("collect", "images", "grid", "images"),
        edge("grid", "image", "out", "image"),
    ]
    return validate_workflow(parse_workflow(workflow(nodes, edges)), REGISTRY)


def test_a_node_whose_inputs_all_succeeded_is_queued() -> None:
    plan = branching_plan()

    decision = decide(
        plan.nodes["branch"], {"count": succeeded(number=5), "prompt": succeeded(text="fox")}
    )

    assert decision == (RunState.QUEUED, {})


def test_a_node_on_the_route_taken_is_queued() -> None:
    plan = branching_plan()

    decision = decide(plan.nodes["yes"], {"branch": succeeded(true="fox")})

    assert decision == (RunState.QUEUED, {})


def test_a_node_fed_by_the_route_not_taken_is_skipped() -> None:
    plan = branching_plan()

    state, detail = decide(plan.nodes["no"], {"branch": succeeded(true="fox"), "tpl": succeeded()})

    assert state is RunState.SKIPPED
    assert detail == {"message": "input 'prompt' is on a route not taken"}


def test_an_optional_input_on_the_route_not_taken_does_not_skip_the_node() -> None:
    plan = branching_plan()

    decision = decide(
        plan.nodes["neg"], {"prompt": succeeded(text="fox"), "branch": succeeded(true="fox")}
    )

    assert decision == (RunState.QUEUED, {})


def test_a_node_with_only_optional_inputs_all_on_dead_routes_is_skipped() -> None:
    plan = branching_plan()

    state, detail = decide(plan.nodes["tpl"], {"branch": succeeded(true="fox")})

    assert state is RunState.SKIPPED
    assert detail == {"message": "every input is on a route not taken"}


def test_a_fan_in_with_one_live_and_one_dead_edge_is_queued() -> None:
    plan = branching_plan()

    decision = decide(
        plan.nodes["collect"], {"yes": succeeded(image=IMAGE), "no": (RunState.SKIPPED, None)}
    )

    assert decision == (RunState.QUEUED, {})


def test_a_fan_in_with_every_edge_dead_is_skipped() -> None:
    plan = branching_plan()

    state, _ = decide(
        plan.nodes["collect"],
        {"yes": (RunState.SKIPPED, None), "no": (RunState.SKIPPED, None)},
    )

    assert state is RunState.SKIPPED


@pytest.mark.parametrize("upstream", [RunState.FAILED, RunState.CANCELLED])
def test_an_upstream_failure_fails_the_node(upstream: RunState) -> None:
    plan = branching_plan()

    decision = decide(
        plan.nodes["collect"], {"yes": (upstream, None), "no": (RunState.SKIPPED, None)}
    )

    assert decision == (
        RunState.FAILED,
        {"code": "upstream_failed", "message": "upstream node yes failed", "nodeId": "yes"},
    )


def test_a_failure_wins_over_a_live_input() -> None:
    plan = branching_plan()

    state, detail = decide(
        plan.nodes["collect"], {"yes": succeeded(image=IMAGE), "no": (RunState.FAILED, None)}
    )

    assert state is RunState.FAILED
    assert detail["nodeId"] == "no"


def test_a_succeeded_node_without_the_connected_output_is_not_live() -> None:
    plan = branching_plan()

    state, _ = decide(plan.nodes["yes"], {"branch": (RunState.SUCCEEDED, None)})

    assert state is RunState.SKIPPED


# cache.cache_key


def sandbox_params(raw: Mapping[str, Any]) -> Any:
    return REGISTRY["generate:sandbox"].parse_params(raw)


def key(
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    version: str = "1.0.0",
    node_type: str = "generate:sandbox",
    workspace: str = "ws_default",
) -> str:
    return cache_key(
        workspace,
        node_type,
        version,
        sandbox_params(params if params is not None else {"seed": 1}),
        inputs if inputs is not None else {"prompt": "fox"},
    )


def image(sha: str, asset_id: str = "asset_1") -> ImageValue:
    return ImageValue(asset_id, sha * 64, "png", 64, 64)


def test_cache_key_is_stable_for_equal_inputs() -> None:
    first = key()

    assert first == key()
    assert len(first) == 64
    assert int(first, 16) >= 0


def test_cache_key_does_not_depend_on_the_order_of_params_or_inputs() -> None:
    one = key({"seed": 1, "width": 64, "height": 96}, {"prompt": "fox", "negativePrompt": "x"})
    two = key({"height": 96, "width": 64, "seed": 1}, {"negativePrompt": "x", "prompt": "fox"})

    assert one == two


def test_cache_key_treats_explicit_defaults_like_omitted_ones() -> None:
    assert key({"seed": 1}) == key({"seed": 1, "steps": 20, "width": 512})


@pytest.mark.parametrize(
    "changed",
    [
        {"params": {"seed": 2}},
        {"params": {"seed": 1, "width": 640}},
        {"version": "1.0.1"},
        {"node_type": "generate:other"},
        {"inputs": {"prompt": "wolf"}},
        {"inputs": {"prompt": "fox", "negativePrompt": "blurry"}},
        {"workspace": "ws_other"},
    ],
)
def test_cache_key_changes_with_params_version_type_inputs_and_workspace(
    changed: dict[str, Any],
) -> None:
    assert key(**changed) != key()


def test_cache_key_changes_with_an_input_image_sha256() -> None:
    assert key(inputs={"image": image("a")}) != key(inputs={"image": image("b")})


def test_cache_key_hashes_images_by_content_not_by_asset_id() -> None:
    assert key(inputs={"image": image("a", "asset_1")}) == key(
        inputs={"image": image("a", "asset_2")}
    )


def test_cache_key_of_an_image_list_depends_on_its_order() -> None:
    forward = key(inputs={"images": [image("a"), image("b")]})
    backward = key(inputs={"images": [image("b"), image("a")]})

    assert forward != backward


# inputs.apply_execution_inputs


def doc_with_inputs() -> WorkflowDoc:
    """Text "Prompt", number "Steps" and an unlabelled image, feeding nothing in particular."""
    return parse_workflow(
        workflow(
            [
                node("prompt", "input:text", "Prompt", text="a red fox"),
                node("steps", "input:number", " Steps ", value=20),
                node("img", "input:image"),
                node("gen", "generate:sandbox", "Generator", seed=1, width=64),
                node("out", "output:image"),
            ],
            [],
        )
    )


def params_of(doc: WorkflowDoc, node_id: str) -> dict[str, Any]:
    found = doc.node(node_id)
    assert found is not None
    return found.data.params


def refused(
    doc: WorkflowDoc,
    inputs: Mapping[str, Any] | None = None,
    overrides: list[Mapping[str, Any]] | None = None,
) -> list[Issue]:
    with pytest.raises(InvalidInput) as info:
        apply_execution_inputs(doc, REGISTRY, inputs, overrides)
    assert info.value.message == f"execution request is invalid: {info.value.issues[0].message}"
    return info.value.issues


def test_inputs_by_node_id_set_the_input_param() -> None:
    doc = doc_with_inputs()

    result = apply_execution_inputs(
        doc, REGISTRY, {"prompt": "a blue whale", "steps": 30, "img": "https://x.test/a.png"}
    )

    assert params_of(result, "prompt") == {"text": "a blue whale"}
    assert params_of(result, "steps") == {"value": 30}
    assert params_of(result, "img") == {"image": "https://x.test/a.png"}
    assert params_of(doc, "prompt") == {"text": "a red fox"}  # the original is untouched


def test_inputs_by_label_set_the_input_param() -> None:
    result = apply_execution_inputs(
        doc_with_inputs(), REGISTRY, {"Prompt": "a blue whale", "Steps": 5}
    )

    assert params_of(result, "prompt") == {"text": "a blue whale"}
    assert params_of(result, "steps") == {"value": 5}


def test_an_id_match_wins_over_a_label_match() -> None:
    doc = parse_workflow(
        workflow(
            [
                node("subject", "input:text", "Prompt", text="a"),
                node("other", "input:text", "subject", text="b"),
            ],
            [],
        )
    )

    result = apply_execution_inputs(doc, REGISTRY, {"subject": "c"})

    assert params_of(result, "subject") == {"text": "c"}
    assert params_of(result, "other") == {"text": "b"}


def test_an_unknown_input_key_lists_the_input_nodes() -> None:
    issues = refused(doc_with_inputs(), {"Colour": "red"})

    assert [(i.code, i.field) for i in issues] == [("unknown_input", "inputs.Colour")]
    assert "(input nodes: prompt ('Prompt'), steps (' Steps '), img)" in issues[0].message


def test_a_node_that_is_not_an_input_cannot_be_set_by_inputs() -> None:
    issues = refused(doc_with_inputs(), {"gen": "x", "Generator": "y"})

    assert [i.code for i in issues] == ["unknown_input", "unknown_input"]


def test_an_input_key_without_input_nodes_says_there_are_none() -> None:
    issues = refused(parse_workflow(linear()).model_copy(update={"nodes": []}), {"Prompt": "x"})

    assert "(input nodes: none)" in issues[0].message


def test_an_ambiguous_label_asks_for_a_node_id() -> None:
    doc = parse_workflow(
        workflow(
            [
                node("a", "input:text", "Prompt", text="a"),
                node("b", "input:text", "Prompt", text="b"),
            ],
            [],
        )
    )

    issues = refused(doc, {"Prompt": "c"})

    assert [(i.code, i.field) for i in issues] == [("ambiguous_input", "inputs.Prompt")]
    assert "(a, b)" in issues[0].message


def test_overrides_merge_params_over_the_saved_ones() -> None:
    result = apply_execution_inputs(
        doc_with_inputs(),
        REGISTRY,
        overrides=[{"id": "gen", "data": {"params": {"seed": 99, "height": 128}}}],
    )

    assert params_of(result, "gen") == {"seed": 99, "width": 64, "height": 128}


def test_an_override_naming_the_same_node_type_is_allowed() -> None:
    result = apply_execution_inputs(
        doc_with_inputs(),
        REGISTRY,
        overrides=[{"id": "gen", "data": {"nodeType": "generate:sandbox", "params": {"seed": 2}}}],
    )

    assert params_of(result, "gen")["seed"] == 2


def test_inputs_apply_after_overrides() -> None:
    result = apply_execution_inputs(
        doc_with_inputs(),
        REGISTRY,
        {"Prompt": "from inputs"},
        [{"id": "prompt", "data": {"params": {"text": "from overrides"}}}],
    )

    assert params_of(result, "prompt") == {"text": "from inputs"}


def test_an_override_of_an_unknown_node() -> None:
    issues = refused(doc_with_inputs(), overrides=[{"id": "ghost", "data": {"params": {}}}])

    assert [(i.code, i.node_id, i.field) for i in issues] == [
        ("unknown_node", "ghost", "nodes[0].id")
    ]


def test_an_override_cannot_change_the_node_type() -> None:
    issues = refused(
        doc_with_inputs(),
        overrides=[{"id": "gen", "data": {"nodeType": "image:resize", "params": {}}}],
    )

    assert [(i.code, i.node_id, i.field) for i in issues] == [
        ("invalid_field", "gen", "nodes[0].data.nodeType")
    ]
    assert "generate:sandbox" in issues[0].message
    assert "image:resize" in issues[0].message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"data": {"params": {}}}, "nodes[0].id"),
        ({"id": 7}, "nodes[0].id"),
        ({"id": "gen", "data": {"params": ["seed", 1]}}, "nodes[0].data.params"),
    ],
)
def test_a_malformed_override_is_located(override: dict[str, Any], field: str) -> None:
    issues = refused(doc_with_inputs(), overrides=[override])

    assert [(i.code, i.field) for i in issues] == [("invalid_field", field)]


def test_every_bad_input_and_override_is_reported_at_once() -> None:
    doc = doc_with_inputs()

    issues = refused(
        doc,
        {"Colour": "red", "Prompt": "ok"},
        [{"id": "ghost"}, {"id": "gen", "data": {"params": {"seed": 3}}}, {"id": "out"}],
    )

    assert [(i.code, i.field) for i in issues] == [
        ("unknown_node", "nodes[0].id"),
        ("unknown_input", "inputs.Colour"),
    ]
    assert params_of(doc, "gen")["seed"] == 1


def test_applying_inputs_leaves_the_saved_workflow_untouched() -> None:
    """Saved versions are cached and shared by executions: applying must copy, not mutate."""
    saved = parse_workflow(linear(prompt="original"))
    before = saved.to_json()

    applied = apply_execution_inputs(
        saved, REGISTRY, {"Prompt": "changed"}, [{"id": "gen", "data": {"params": {"seed": 99}}}]
    )

    assert saved.to_json() == before
    assert applied.node("prompt").data.params["text"] == "changed"  # type: ignore[union-attr]
    assert applied.node("gen").data.params["seed"] == 99  # type: ignore[union-attr]
    assert applied.node("out") is saved.node("out")  # unchanged nodes are shared
