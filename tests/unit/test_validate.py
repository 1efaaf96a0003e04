"""Validation: each check reports its code at the right place, and every problem at once."""

from __future__ import annotations

from typing import Any

import pytest

from imagegraph.errors import Issue, WorkflowInvalid
from imagegraph.graph.model import parse_workflow
from imagegraph.graph.plan import EdgeRef, Plan
from imagegraph.graph.ports import PortType
from imagegraph.graph.validate import validate_workflow
from imagegraph.nodes import builtin_registry, imaging
from tests.builders import edge, linear, node, workflow

REGISTRY = builtin_registry()

Where = tuple[str, str | None, str | None, str | None, str | None]


def plan_of(doc: dict[str, Any], max_nodes: int = 1000) -> Plan:
    return validate_workflow(parse_workflow(doc), REGISTRY, max_nodes=max_nodes)


def issues_of(doc: dict[str, Any], max_nodes: int = 1000) -> list[Issue]:
    with pytest.raises(WorkflowInvalid) as info:
        plan_of(doc, max_nodes)
    assert info.value.issues, "WorkflowInvalid must carry its issues"
    return info.value.issues


def where(issue: Issue) -> Where:
    """(code, node_id, edge_id, port, field): what a check must get right."""
    return (issue.code, issue.node_id, issue.edge_id, issue.port, issue.field)


def locations(issues: list[Issue]) -> list[Where]:
    return [where(i) for i in issues]


def only(issues: list[Issue], code: str) -> Issue:
    found = [i for i in issues if i.code == code]
    assert len(found) == 1, issues
    return found[0]


def gen_to_out() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompt -> generator -> output, as lists to extend."""
    doc = linear()
    return list(doc["nodes"]), list(doc["edges"])


# A valid workflow


def test_a_valid_linear_workflow_gives_a_plan() -> None:
    plan = plan_of(linear())

    assert plan.order == ("prompt", "gen", "out")
    assert plan.sources == ("prompt",)
    assert plan.nodes["gen"].type == "generate:sandbox"
    assert plan.nodes["prompt"].label == "Prompt"
    assert plan.nodes["gen"].output_types == {"image": PortType.IMAGE}


# Node checks


def test_unknown_node_type() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("mystery", "magic:wand"))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [
        ("unknown_node_type", "mystery", None, None, "data.nodeType"),
    ]
    assert "'magic:wand'" in issues[0].message


def test_edges_of_an_unknown_node_type_are_not_reported_again() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("mystery", "magic:wand"))
    edges.append(edge("gen", "image", "mystery", "whatever"))

    issues = issues_of(workflow(nodes, edges))

    assert [i.code for i in issues] == ["unknown_node_type"]


def test_duplicate_node_ids() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("gen", "generate:sandbox", seed=1))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("duplicate_node_id", "gen", None, None, None)]


def test_param_out_of_range() -> None:
    doc = linear()
    doc["nodes"][1]["data"]["params"]["width"] = 10

    issues = issues_of(doc)

    assert locations(issues) == [("invalid_param", "gen", None, None, "params.width")]
    assert "greater than or equal to 64" in issues[0].message


def test_param_of_the_wrong_type() -> None:
    doc = linear()
    doc["nodes"][1]["data"]["params"]["width"] = "wide"

    issues = issues_of(doc)

    assert locations(issues) == [("invalid_param", "gen", None, None, "params.width")]


def test_camel_case_params_are_located_by_their_json_name() -> None:
    doc = linear()
    doc["nodes"][1]["data"]["params"]["delayMs"] = -5

    issues = issues_of(doc)

    assert locations(issues) == [("invalid_param", "gen", None, None, "params.delayMs")]


def test_unknown_params_are_refused() -> None:
    doc = linear()
    doc["nodes"][1]["data"]["params"]["colour"] = "red"

    issues = issues_of(doc)

    assert locations(issues) == [("invalid_param", "gen", None, None, "params.colour")]
    assert "Extra inputs are not permitted" in issues[0].message


def test_every_bad_param_of_a_node_is_reported() -> None:
    doc = linear()
    doc["nodes"][1]["data"]["params"].update({"width": 4096, "height": 1, "steps": 0})

    issues = issues_of(doc)

    assert sorted(i.field or "" for i in issues) == [
        "params.height",
        "params.steps",
        "params.width",
    ]
    assert {i.node_id for i in issues} == {"gen"}


def test_a_node_params_check_is_located_by_node_and_field() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("img", "input:image", image="ftp://example.com/a.png"))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("invalid_param", "img", None, None, "params.image")]


def test_an_input_image_without_an_image_is_reported() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("img", "input:image"))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("missing_value", "img", None, None, "params.image")]


def test_a_format_the_server_cannot_write_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "avif_supported", lambda: False)
    doc = linear(out_format="avif")

    issues = issues_of(doc)

    assert locations(issues) == [("unsupported_format", "out", None, None, "params.format")]


def test_too_many_nodes() -> None:
    issues = issues_of(linear(), max_nodes=2)

    assert locations(issues) == [("too_many_nodes", None, None, None, None)]
    assert "3 nodes; the limit is 2" in issues[0].message


# Edge checks


def test_unknown_source_port() -> None:
    doc = linear()
    doc["edges"][0] = edge("prompt", "txt", "gen", "prompt", "e-prompt")

    issues = issues_of(doc)

    # The edge was drawn into gen.prompt, so that input is not reported missing as well.
    assert locations(issues) == [("unknown_port", "prompt", "e-prompt", "txt", None)]
    assert "outputs: text" in issues[0].message


def test_an_unknown_output_named_like_an_input_does_not_hide_that_input() -> None:
    # gen's own `prompt` input is unconnected; a bad edge *from* gen.prompt must not hide it.
    doc = linear()
    doc["edges"] = [edge("gen", "prompt", "out", "image", "e-bad")]

    issues = issues_of(doc)

    assert locations(issues) == [
        ("unknown_port", "gen", "e-bad", "prompt", None),
        ("missing_input", "gen", None, "prompt", None),
    ]


def test_unknown_target_port() -> None:
    doc = linear()
    doc["edges"][0] = edge("prompt", "text", "gen", "promt", "e-prompt")

    issues = issues_of(doc)

    issue = only(issues, "unknown_port")
    assert where(issue) == ("unknown_port", "gen", "e-prompt", "promt", None)
    assert only(issues, "missing_input").port == "prompt"
    assert "inputs: prompt, negativePrompt" in issue.message


def test_missing_handles_are_inferred_when_the_node_has_a_single_port() -> None:
    doc = linear()
    for e in doc["edges"]:
        del e["sourceHandle"]
    del doc["edges"][1]["targetHandle"]

    plan = plan_of(doc)

    assert plan.nodes["gen"].inputs["prompt"][0].source_port == "text"
    assert plan.nodes["out"].inputs["image"][0].source_port == "image"
    assert plan.nodes["out"].inputs["image"][0].target_port == "image"


def test_a_missing_target_handle_is_reported_when_the_node_has_several_inputs() -> None:
    doc = linear()
    del doc["edges"][0]["targetHandle"]
    edge_id = doc["edges"][0]["id"]

    issues = issues_of(doc)

    issue = only(issues, "missing_handle")
    assert where(issue) == ("missing_handle", "gen", edge_id, None, None)
    assert "targetHandle" in issue.message
    assert "prompt, negativePrompt" in issue.message
    # Which port the edge meant is unknown, so its node is not also said to miss an input.
    assert [i for i in issues if i.code == "missing_input"] == []


def test_a_missing_source_handle_is_reported_when_the_node_has_several_outputs() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("tpl", "prompt:template", template="${subject}"))
    edges[0] = edge("prompt", "text", "tpl", "subject")
    edges.append({"id": "e-tpl", "source": "tpl", "target": "gen", "targetHandle": "prompt"})

    issues = issues_of(workflow(nodes, edges))

    issue = only(issues, "missing_handle")
    assert where(issue) == ("missing_handle", "tpl", "e-tpl", None, None)
    assert "sourceHandle" in issue.message
    assert "text, negativePrompt" in issue.message


def test_an_image_into_a_template_text_variable_is_incompatible() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("tpl", "prompt:template", template="look at ${subject}"))
    edges.append(edge("gen", "image", "tpl", "subject", "e-bad"))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("incompatible_types", "tpl", "e-bad", "subject", None)]
    assert "gives image" in issues[0].message
    assert "takes number or text" in issues[0].message


def test_text_into_an_image_output_is_incompatible_and_not_also_missing() -> None:
    doc = workflow(
        [node("prompt", "input:text", text="hi"), node("out", "output:image")],
        [edge("prompt", "text", "out", "image", "e-bad")],
    )

    issues = issues_of(doc)

    assert locations(issues) == [("incompatible_types", "out", "e-bad", "image", None)]


def test_a_number_may_feed_a_template_variable() -> None:
    nodes, edges = gen_to_out()
    nodes += [
        node("n", "input:number", value=3),
        node("tpl", "prompt:template", template="${count} foxes"),
    ]
    edges[0] = edge("tpl", "text", "gen", "prompt")
    edges += [edge("n", "number", "tpl", "count")]

    plan = plan_of(workflow(nodes, edges))

    assert plan.nodes["tpl"].inputs["count"][0].source == "n"


def test_missing_required_input() -> None:
    doc = linear()
    del doc["edges"][0]

    issues = issues_of(doc)

    assert locations(issues) == [("missing_input", "gen", None, "prompt", None)]
    assert "'prompt' (text)" in issues[0].message


def test_an_optional_input_may_stay_unconnected() -> None:
    plan = plan_of(linear())

    assert "negativePrompt" not in plan.nodes["gen"].inputs


def test_dangling_edge() -> None:
    doc = linear()
    doc["edges"].append(edge("ghost", "image", "out", "image", "e-ghost"))

    issues = issues_of(doc)

    assert locations(issues) == [("dangling_edge", "ghost", "e-ghost", None, None)]
    assert "source node 'ghost' does not exist" in issues[0].message


def test_dangling_edge_at_both_ends_reports_each_end() -> None:
    doc = linear()
    doc["edges"].append(edge("ghost", "image", "phantom", "image", "e-ghost"))

    issues = issues_of(doc)

    assert locations(issues) == [
        ("dangling_edge", "ghost", "e-ghost", None, None),
        ("dangling_edge", "phantom", "e-ghost", None, None),
    ]


def test_duplicate_edge_ids() -> None:
    doc = linear()
    doc["edges"].append(edge("gen", "image", "out", "image", doc["edges"][1]["id"]))

    issues = issues_of(doc)

    assert locations(issues) == [("duplicate_edge_id", None, doc["edges"][1]["id"], None, None)]


def test_two_edges_into_a_single_value_port() -> None:
    nodes, edges = gen_to_out()
    nodes.append(node("other", "input:text", text="a second prompt"))
    edges.append(edge("other", "text", "gen", "prompt", "e-second"))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("too_many_edges", "gen", None, "prompt", None)]
    assert edges[0]["id"] in issues[0].message
    assert "e-second" in issues[0].message


def fan_in(count: int, order: list[int] | None = None) -> dict[str, Any]:
    """Generators -> control:collect -> image:grid -> output, collect edges in `order`."""
    nodes = [node("prompt", "input:text", text="fox")]
    edges = []
    for i in range(count):
        nodes.append(node(f"gen{i}", "generate:sandbox", seed=i, width=64, height=64))
        edges.append(edge("prompt", "text", f"gen{i}", "prompt"))
    for i in order if order is not None else range(count):
        edges.append(edge(f"gen{i}", "image", "collect", "images", f"c{i}"))
    nodes += [
        node("collect", "control:collect"),
        node("grid", "image:grid"),
        node("out", "output:image"),
    ]
    edges += [edge("collect", "images", "grid", "images"), edge("grid", "image", "out", "image")]
    return workflow(nodes, edges)


def test_images_may_fan_in_to_an_image_list() -> None:
    plan = plan_of(fan_in(3))

    assert [e.source for e in plan.nodes["collect"].inputs["images"]] == ["gen0", "gen1", "gen2"]
    assert plan.nodes["collect"].output_types == {"images": PortType.IMAGE_LIST}


def test_a_single_image_may_feed_a_single_image_list_port() -> None:
    doc = workflow(
        [
            node("prompt", "input:text", text="fox"),
            node("gen", "generate:sandbox", seed=1),
            node("grid", "image:grid"),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "grid", "images"),
            edge("grid", "image", "out", "image"),
        ],
    )

    assert plan_of(doc).order == ("prompt", "gen", "grid", "out")


def test_no_output_node() -> None:
    doc = linear()
    doc["nodes"] = doc["nodes"][:2]
    doc["edges"] = doc["edges"][:1]

    issues = issues_of(doc)

    assert locations(issues) == [("no_output", None, None, None, None)]


# Cycles


def resize(node_id: str) -> dict[str, Any]:
    return node(node_id, "image:resize", width=64, height=64)


def test_a_cycle_is_named_node_by_node_in_edge_order() -> None:
    nodes, edges = gen_to_out()
    nodes += [resize("a"), resize("c"), resize("b")]
    edges += [
        edge("a", "image", "c", "image"),
        edge("c", "image", "b", "image"),
        edge("b", "image", "a", "image"),
    ]

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("cycle", "a", None, None, None)]
    assert issues[0].message == "workflow has a cycle: a -> c -> b -> a"


def test_a_self_loop_is_a_cycle() -> None:
    nodes, edges = gen_to_out()
    nodes.append(resize("loop"))
    edges.append(edge("loop", "image", "loop", "image"))

    issues = issues_of(workflow(nodes, edges))

    assert locations(issues) == [("cycle", "loop", None, None, None)]
    assert issues[0].message == "workflow has a cycle: loop -> loop"


def test_two_separate_cycles_are_both_reported() -> None:
    nodes, edges = gen_to_out()
    nodes += [resize("a1"), resize("a2"), resize("b1"), resize("b2"), resize("b3")]
    edges += [
        edge("a1", "image", "a2", "image"),
        edge("a2", "image", "a1", "image"),
        edge("b1", "image", "b2", "image"),
        edge("b2", "image", "b3", "image"),
        edge("b3", "image", "b1", "image"),
    ]

    issues = issues_of(workflow(nodes, edges))

    assert [i.message for i in issues] == [
        "workflow has a cycle: a1 -> a2 -> a1",
        "workflow has a cycle: b1 -> b2 -> b3 -> b1",
    ]
    assert [i.node_id for i in issues] == ["a1", "b1"]


def test_nodes_downstream_of_a_cycle_are_not_named_in_it() -> None:
    nodes = [resize("x"), resize("y"), node("out", "output:image")]
    edges = [
        edge("x", "image", "y", "image"),
        edge("y", "image", "x", "image"),
        edge("y", "image", "out", "image"),
    ]

    issues = issues_of(workflow(nodes, edges))

    assert [i.message for i in issues] == ["workflow has a cycle: x -> y -> x"]


def test_a_knot_of_loops_is_reported_once_naming_one_loop() -> None:
    # a -> c -> grid -> a and b -> c -> grid -> b share nodes: one issue, one simple loop.
    nodes = [
        resize("a"),
        resize("b"),
        node("c", "control:collect"),
        node("grid", "image:grid"),
        node("out", "output:image"),
    ]
    edges = [
        edge("b", "image", "c", "images"),
        edge("a", "image", "c", "images"),
        edge("c", "images", "grid", "images"),
        edge("grid", "image", "b", "image"),
        edge("grid", "image", "a", "image"),
        edge("grid", "image", "out", "image"),
    ]

    issues = issues_of(workflow(nodes, edges))

    assert [i.code for i in issues] == ["cycle"]
    assert issues[0].message == "workflow has a cycle: a -> c -> grid -> a"


# control:branch


def branch_doc(routed: str) -> dict[str, Any]:
    """A branch on a number, routing `routed` ("text", "image" or "value") to an output."""
    nodes = [
        node("count", "input:number", value=5),
        node("prompt", "input:text", text="fox"),
        node("gen", "generate:sandbox", seed=1, width=64, height=64),
        node("branch", "control:branch", operator="gt", compareTo=3),
        node("out", "output:image"),
    ]
    edges = [
        edge("prompt", "text", "gen", "prompt"),
        edge("count", "number", "branch", "value"),
        edge("branch", "true", "out", "image", "e-out"),
    ]
    if routed == "text":
        edges.append(edge("prompt", "text", "branch", "input"))
    elif routed == "image":
        edges.append(edge("gen", "image", "branch", "input"))
    return workflow(nodes, edges)


def test_a_branch_routing_an_image_may_feed_an_output() -> None:
    plan = plan_of(branch_doc("image"))

    assert plan.nodes["branch"].output_types == {
        "true": PortType.IMAGE,
        "false": PortType.IMAGE,
    }


def test_a_branch_routing_text_into_an_image_output_is_incompatible() -> None:
    issues = issues_of(branch_doc("text"))

    assert locations(issues) == [("incompatible_types", "out", "e-out", "image", None)]
    assert "branch.true gives text" in issues[0].message


def test_a_branch_without_input_routes_its_value_type() -> None:
    issues = issues_of(branch_doc("value"))

    assert locations(issues) == [("incompatible_types", "out", "e-out", "image", None)]
    assert "gives number" in issues[0].message


def test_a_numeric_branch_needs_a_number_to_compare_to() -> None:
    doc = branch_doc("image")
    doc["nodes"][3]["data"]["params"]["compareTo"] = "three"

    issues = issues_of(doc)

    assert only(issues, "invalid_param").field == "params.compareTo"
    assert only(issues, "invalid_param").node_id == "branch"


def test_a_branch_with_a_broken_regular_expression_is_reported() -> None:
    doc = branch_doc("image")
    doc["nodes"][3]["data"]["params"].update({"operator": "matches", "compareTo": "(unclosed"})

    issues = issues_of(doc)

    assert locations(issues) == [("invalid_param", "branch", None, None, "params.compareTo")]
    assert "regular expression" in issues[0].message


# prompt:template


def template_doc(template: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """A template (fed `subject` when it has it) -> generator -> output."""
    params: dict[str, Any] = {"template": template}
    if variables is not None:
        params["variables"] = variables
    nodes = [
        node("subject", "input:text", text="fox"),
        node("tpl", "prompt:template", **params),
        node("gen", "generate:sandbox", seed=1, width=64, height=64),
        node("out", "output:image"),
    ]
    edges = [
        edge("subject", "text", "tpl", "subject"),
        edge("tpl", "text", "gen", "prompt"),
        edge("tpl", "negativePrompt", "gen", "negativePrompt"),
        edge("gen", "image", "out", "image"),
    ]
    return workflow(nodes, edges)


def test_template_variables_become_input_ports() -> None:
    plan = plan_of(template_doc("a ${subject} in ${place}", {"place": "snow"}))

    tpl = plan.nodes["tpl"]
    ports = tpl.node.input_ports(tpl.params)
    assert [(p.name, p.required) for p in ports] == [
        ("subject", True),
        ("place", False),
        ("negativePrompt", False),
    ]


def test_an_edge_into_an_unknown_template_variable_is_an_unknown_port() -> None:
    doc = template_doc("a ${animal}")
    doc["edges"][0]["id"] = "e-subject"

    issues = issues_of(doc)

    issue = only(issues, "unknown_port")
    assert where(issue) == ("unknown_port", "tpl", "e-subject", "subject", None)
    assert "inputs: animal, negativePrompt" in issue.message


def test_a_template_variable_without_a_default_is_required() -> None:
    issues = issues_of(template_doc("a ${subject} in ${place}"))

    assert locations(issues) == [("missing_input", "tpl", None, "place", None)]


def test_a_template_variable_with_a_default_is_not_required() -> None:
    plan = plan_of(template_doc("a ${subject} in ${place}", {"place": "the snow"}))

    assert set(plan.nodes["tpl"].inputs) == {"subject"}


def test_defaults_for_variables_the_template_does_not_use_are_reported() -> None:
    issues = issues_of(template_doc("a ${subject}", {"colour": "red"}))

    assert locations(issues) == [("invalid_param", "tpl", None, None, "params.variables")]
    assert "['colour']" in issues[0].message


def test_the_negative_prompt_variable_name_is_reserved() -> None:
    issues = issues_of(template_doc("a ${subject} ${negativePrompt}"))

    assert ("invalid_param", "tpl", None, None, "params.template") in locations(issues)


# Many problems at once


def test_all_problems_are_reported_in_one_error() -> None:
    doc = workflow(
        [
            node("prompt", "input:text", text="fox"),
            node("gen", "generate:sandbox", width=5),
            node("gen2", "generate:sandbox", seed=1),
            node("gen2", "generate:sandbox", seed=2),
            node("mystery", "magic:wand"),
            node("out", "output:image"),
            resize("r1"),
            resize("r2"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "out", "image"),
            edge("prompt", "text", "gen2", "negativePrompt"),
            edge("ghost", "image", "out", "image", "e-ghost"),
            edge("gen2", "pixels", "r1", "image", "e-pixels"),
            edge("r1", "image", "r2", "image"),
            edge("r2", "image", "r1", "image"),
        ],
    )

    with pytest.raises(WorkflowInvalid) as info:
        plan_of(doc)

    found = {(i.code, i.node_id) for i in info.value.issues}
    assert {
        ("invalid_param", "gen"),
        ("duplicate_node_id", "gen2"),
        ("unknown_node_type", "mystery"),
        ("dangling_edge", "ghost"),
        ("unknown_port", "gen2"),
        ("missing_input", "gen2"),
        ("cycle", "r1"),
    } <= found
    count = len(info.value.issues)
    assert info.value.message.endswith(f"(and {count - 1} more)")
    assert info.value.code == "workflow_invalid"
    assert [e["code"] for e in info.value.problem()["errors"]] == [
        i.code for i in info.value.issues
    ]


# The plan


def test_the_plan_order_is_topological() -> None:
    plan = plan_of(fan_in(4))

    position = {node_id: index for index, node_id in enumerate(plan.order)}
    assert sorted(plan.order) == sorted(plan.nodes)
    for plan_node in plan.nodes.values():
        for refs in plan_node.inputs.values():
            for ref in refs:
                assert position[ref.source] < position[ref.target], ref


def test_the_plan_knows_predecessors_and_successors() -> None:
    plan = plan_of(fan_in(3))

    assert plan.nodes["prompt"].predecessors == ()
    assert plan.nodes["prompt"].successors == ("gen0", "gen1", "gen2")
    assert plan.nodes["collect"].predecessors == ("gen0", "gen1", "gen2")
    assert plan.nodes["collect"].successors == ("grid",)
    assert plan.nodes["out"].successors == ()
    assert plan.sources == ("prompt",)


def test_a_node_feeding_two_ports_of_one_node_is_one_predecessor() -> None:
    plan = plan_of(template_doc("${subject}"))

    assert plan.nodes["gen"].predecessors == ("tpl",)
    assert plan.nodes["tpl"].successors == ("gen",)
    assert set(plan.nodes["gen"].inputs) == {"prompt", "negativePrompt"}


def test_fan_in_edges_are_grouped_by_port_in_document_order() -> None:
    plan = plan_of(fan_in(3, order=[2, 0, 1]))

    assert plan.nodes["collect"].inputs["images"] == (
        EdgeRef("c2", "gen2", "image", "collect", "images"),
        EdgeRef("c0", "gen0", "image", "collect", "images"),
        EdgeRef("c1", "gen1", "image", "collect", "images"),
    )
    assert plan.nodes["collect"].predecessors == ("gen2", "gen0", "gen1")


# Size


def chain(length: int) -> dict[str, Any]:
    """input:text -> `length` templates -> generator -> output."""
    nodes = [node("prompt", "input:text", text="fox")]
    edges = []
    previous = "prompt"
    for i in range(length):
        nodes.append(node(f"t{i}", "prompt:template"))
        edges.append(edge(previous, "text", f"t{i}", "subject"))
        previous = f"t{i}"
    nodes += [node("gen", "generate:sandbox", seed=1), node("out", "output:image")]
    edges += [edge(previous, "text", "gen", "prompt"), edge("gen", "image", "out", "image")]
    return workflow(nodes, edges)


def test_a_two_thousand_node_chain_validates() -> None:
    plan = plan_of(chain(1997), max_nodes=5000)

    assert len(plan.order) == 2000
    assert plan.order[0] == "prompt"
    assert plan.order[1:4] == ("t0", "t1", "t2")
    assert plan.order[-2:] == ("gen", "out")


def test_a_two_thousand_node_cycle_is_found() -> None:
    doc = chain(1997)
    doc["edges"].append(edge("t1996", "text", "t0", "subject", "e-back"))
    doc["edges"] = [e for e in doc["edges"] if e["source"] != "prompt"]

    issues = issues_of(doc, max_nodes=5000)

    assert [i.code for i in issues] == ["cycle"]
    names = issues[0].message.removeprefix("workflow has a cycle: ").split(" -> ")
    assert names == [f"t{i}" for i in range(1997)] + ["t0"]
