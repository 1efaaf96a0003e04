"""Parsing workflow documents: JSON and YAML, errors that say where, editor fields kept."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from imagegraph.errors import InvalidInput, Issue
from imagegraph.graph.model import GraphEdge, WorkflowDoc, format_loc, parse_workflow
from tests.builders import edge, linear, node, workflow


def _refused(raw: Any, **kwargs: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_workflow(raw, **kwargs)
    return info.value


def _editor_document() -> dict[str, Any]:
    """A workflow as the React Flow editor saves it, with fields only the editor reads."""
    doc = linear()
    doc["viewport"] = {"x": 12.5, "y": -40.0, "zoom": 0.75}
    first = doc["nodes"][0]
    first.update({"width": 180, "height": 64, "selected": True, "dragging": False})
    first["position"]["positionAbsolute"] = {"x": 3, "y": 4}
    first["data"]["color"] = "#ff0000"
    doc["edges"][0]["animated"] = True
    doc["edges"][0]["style"] = {"stroke": "#333"}
    return doc


# Parsing


def test_json_and_yaml_of_the_same_document_parse_equal() -> None:
    doc = _editor_document()

    from_json = parse_workflow(json.dumps(doc))
    from_yaml = parse_workflow(yaml.safe_dump(doc, sort_keys=False))

    assert from_json == from_yaml
    assert from_json.name == "linear"
    assert [n.id for n in from_json.nodes] == ["prompt", "gen", "out"]
    assert [n.node_type for n in from_json.nodes] == [
        "input:text",
        "generate:sandbox",
        "output:image",
    ]
    assert from_json.nodes[0].label == "Prompt"
    assert from_json.edges[1].source_handle == "image"
    assert from_json.edges[1].target_handle == "image"


def test_bytes_and_explicit_formats_parse_like_text() -> None:
    doc = linear()
    expected = parse_workflow(doc)

    assert parse_workflow(json.dumps(doc).encode(), fmt="json") == expected
    assert parse_workflow(yaml.safe_dump(doc).encode(), fmt="yaml") == expected
    # JSON is YAML too, so an explicit yaml format still reads a JSON document.
    assert parse_workflow(json.dumps(doc), fmt="yaml") == expected


def test_node_params_keep_their_values_and_types() -> None:
    parsed = parse_workflow(json.dumps(linear(seed=42, size=96)))

    gen = parsed.node("gen")
    assert gen is not None
    assert gen.data.params == {"width": 96, "height": 96, "delayMs": 0, "seed": 42}
    assert parsed.node("missing") is None


def test_name_is_stripped_and_blank_falls_back_to_default() -> None:
    assert parse_workflow({"name": "  spaced  "}).name == "spaced"
    assert parse_workflow({"name": "   "}).name == "Untitled workflow"
    assert parse_workflow({}).name == "Untitled workflow"


def test_edge_key_is_its_id_or_a_description_of_its_ends() -> None:
    with_id = GraphEdge.model_validate({"id": "e1", "source": "a", "target": "b"})
    without_id = GraphEdge.model_validate(
        {"source": "a", "sourceHandle": "text", "target": "b", "targetHandle": None}
    )

    assert with_id.key == "e1"
    assert without_id.key == "a.text->b.?"


# Syntax errors


def test_malformed_json_names_line_and_column() -> None:
    text = '{\n  "name": "broken",\n  "nodes": [,]\n}'

    error = _refused(text)

    assert "invalid JSON at line 3, column 13" in error.message
    assert [i.code for i in error.issues] == ["invalid_json"]
    assert error.issues[0].message == error.message


def test_malformed_json_with_explicit_format_is_not_retried_as_yaml() -> None:
    error = _refused("name: not json", fmt="json")

    assert error.issues[0].code == "invalid_json"
    assert "line 1, column 1" in error.message


def test_malformed_yaml_names_the_line() -> None:
    text = "name: broken\nnodes:\n  - id: a\n    data: [unclosed\nedges: []\n"

    error = _refused(text)

    assert error.message.startswith("invalid YAML at line 5")
    assert [i.code for i in error.issues] == ["invalid_yaml"]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("[1, 2, 3]", id="json-array"),
        pytest.param("just a sentence", id="yaml-scalar"),
        pytest.param("- a\n- b\n", id="yaml-list"),
        pytest.param("", id="empty"),
    ],
)
def test_a_document_that_is_not_an_object_is_refused(raw: str) -> None:
    error = _refused(raw)

    assert error.message == "a workflow must be an object with 'nodes' and 'edges'"
    assert [i.code for i in error.issues] == ["invalid_document"]


# Field errors


def test_a_missing_field_is_named_by_path_with_the_node_id() -> None:
    doc = workflow(
        [node("a", "input:text"), {"id": "b", "data": {"label": "no type"}}],
        [],
    )

    error = _refused(doc)

    assert error.issues == [
        Issue(
            "invalid_field",
            "nodes[1].data.nodeType: Field required",
            node_id="b",
            field="nodes[1].data.nodeType",
        )
    ]
    assert error.message == "workflow document is malformed: nodes[1].data.nodeType: Field required"


def test_a_bad_node_id_is_reported_with_that_id() -> None:
    doc = workflow([node("has space", "input:text")], [])

    error = _refused(doc)

    assert len(error.issues) == 1
    assert error.issues[0].field == "nodes[0].id"
    assert error.issues[0].node_id == "has space"
    assert "pattern" in error.issues[0].message


def test_a_node_without_an_id_has_no_node_id_in_its_issue() -> None:
    error = _refused({"nodes": [{"data": {"nodeType": "input:text"}}]})

    assert [(i.field, i.node_id) for i in error.issues] == [("nodes[0].id", None)]


def test_every_field_error_is_reported_with_its_own_path() -> None:
    doc = {
        "name": 123,
        "nodes": [{"id": "a", "data": {"nodeType": ""}}],
        "edges": [{"source": "a"}],
    }

    error = _refused(doc)

    assert [(i.field, i.node_id) for i in error.issues] == [
        ("name", None),
        ("nodes[0].data.nodeType", "a"),
        ("edges[0].target", None),
    ]
    assert all(i.code == "invalid_field" for i in error.issues)


def test_unknown_top_level_keys_are_refused() -> None:
    doc = {**linear(), "colour": "blue"}

    error = _refused(doc)

    assert [(i.code, i.field) for i in error.issues] == [("invalid_field", "colour")]
    assert "Extra inputs are not permitted" in error.issues[0].message


def test_read_only_fields_sent_back_after_a_get_are_ignored() -> None:
    doc = {
        **linear(),
        "id": "wf_123",
        "version": 7,
        "createdAt": "2024-01-01T00:00:00Z",
        "updatedAt": "2024-01-02T00:00:00Z",
        "latestVersion": 9,
    }

    parsed = parse_workflow(doc)

    assert parsed == parse_workflow(linear())
    out = parsed.to_json()
    for key in ("id", "version", "createdAt", "updatedAt", "latestVersion"):
        assert key not in out


# Round trip


def test_editor_fields_are_preserved_by_to_json() -> None:
    doc = _editor_document()

    out = parse_workflow(json.dumps(doc)).to_json()

    assert out["viewport"] == {"x": 12.5, "y": -40.0, "zoom": 0.75}
    first = out["nodes"][0]
    assert (first["width"], first["height"], first["selected"], first["dragging"]) == (
        180,
        64,
        True,
        False,
    )
    assert first["position"]["positionAbsolute"] == {"x": 3, "y": 4}
    assert first["data"]["color"] == "#ff0000"
    assert out["edges"][0]["animated"] is True
    assert out["edges"][0]["style"] == {"stroke": "#333"}


def test_to_json_uses_the_editor_spelling_of_aliased_fields() -> None:
    out = parse_workflow(linear()).to_json()

    assert out["nodes"][1]["data"]["nodeType"] == "generate:sandbox"
    assert "node_type" not in out["nodes"][1]["data"]
    assert out["edges"][0]["sourceHandle"] == "text"
    assert out["edges"][0]["targetHandle"] == "prompt"


def test_to_json_round_trips_to_an_equal_document() -> None:
    parsed = parse_workflow(_editor_document())

    again = parse_workflow(json.dumps(parsed.to_json()))

    assert again == parsed
    assert again.to_json() == parsed.to_json()


def test_a_document_built_in_python_matches_a_parsed_one() -> None:
    direct = WorkflowDoc.model_validate(
        {"name": "one", "nodes": [node("a", "input:text", text="hi")], "edges": []}
    )

    assert parse_workflow(json.dumps(direct.to_json())) == direct


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("nodes", 2, "data", "nodeType"), "nodes[2].data.nodeType"),
        (("name",), "name"),
        ((0, "x"), "[0].x"),
        ((), ""),
    ],
)
def test_format_loc(loc: tuple[int | str, ...], expected: str) -> None:
    assert format_loc(loc) == expected


def test_an_edge_builder_edge_parses_with_both_handles() -> None:
    parsed = parse_workflow(workflow([], [edge("a", "text", "b", "prompt", "e1")]))

    assert parsed.edges[0].id == "e1"
    assert (parsed.edges[0].source_handle, parsed.edges[0].target_handle) == ("text", "prompt")


def test_explicit_nulls_from_an_editor_are_kept() -> None:
    doc = linear()
    doc["nodes"][0]["parentNode"] = None
    doc["nodes"][0]["data"]["label"] = None
    doc["edges"][0]["label"] = None

    out = parse_workflow(doc).to_json()

    assert out["nodes"][0]["parentNode"] is None
    assert out["nodes"][0]["data"]["label"] is None
    assert out["edges"][0]["label"] is None
    assert "label" not in out["nodes"][1]["data"]  # never sent, so not invented


def test_a_document_without_a_name_is_saved_with_the_default_one() -> None:
    out = parse_workflow({"nodes": [], "edges": []}).to_json()

    assert out["name"] == "Untitled workflow"


def test_yaml_flow_mapping_is_not_mistaken_for_broken_json() -> None:
    parsed = parse_workflow("{name: flow style, nodes: [], edges: []}")

    assert parsed.name == "flow style"


def test_broken_json_is_reported_as_json_even_in_auto_mode() -> None:
    error = _refused('{"name": "x", "nodes": [')

    assert error.issues[0].code == "invalid_json"


def test_an_edge_error_names_the_edge_id() -> None:
    doc = linear()
    del doc["edges"][1]["target"]

    error = _refused(doc)

    [issue] = error.issues
    assert issue.field == "edges[1].target"
    assert issue.edge_id == doc["edges"][1]["id"]
