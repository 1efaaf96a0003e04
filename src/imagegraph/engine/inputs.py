"""Applying an execution's `inputs` and param overrides to a saved workflow, and test
mode's stand-ins. Pure.

`inputs` are keyed by an input node's id or label: `{"inputs": {"Prompt": "a red fox"}}`
sets the `text` param of the `input:text` node labelled "Prompt". `nodes` are partial nodes
whose `data.params` are merged over the saved ones, the shape the editor and the seeds use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imagegraph.errors import InvalidInput, Issue
from imagegraph.graph.model import WorkflowDoc
from imagegraph.nodes.base import NodeRegistry


def apply_execution_inputs(
    doc: WorkflowDoc,
    registry: NodeRegistry,
    inputs: Mapping[str, Any] | None = None,
    overrides: Sequence[Mapping[str, Any]] | None = None,
) -> WorkflowDoc:
    """`doc` with inputs and overrides applied; every bad key is reported at once.

    `doc` is left as it is; nodes whose params change are copied, the others shared.
    """
    issues: list[Issue] = []
    by_id = {node.id: node for node in doc.nodes}
    params: dict[str, dict[str, Any]] = {node.id: node.data.params for node in doc.nodes}

    for index, override in enumerate(overrides or []):
        where = f"nodes[{index}]"
        node_id = override.get("id") if isinstance(override, Mapping) else None
        if not isinstance(node_id, str):
            issues.append(
                Issue(
                    "invalid_field",
                    f"{where}.id: each override needs the id of a node of the workflow",
                    field=f"{where}.id",
                )
            )
            continue
        target = by_id.get(node_id)
        if target is None:
            issues.append(
                Issue(
                    "unknown_node",
                    f"{where}: workflow has no node {node_id!r}",
                    node_id=node_id,
                    field=f"{where}.id",
                )
            )
            continue
        data = override.get("data") or {}
        node_type = data.get("nodeType") if isinstance(data, Mapping) else None
        if node_type is not None and node_type != target.node_type:
            issues.append(
                Issue(
                    "invalid_field",
                    f"{where}: node {node_id} is a "
                    f"{target.node_type}; an execution cannot change it to "
                    f"{node_type}",
                    node_id=node_id,
                    field=f"{where}.data.nodeType",
                )
            )
            continue
        new_params = data.get("params", {}) if isinstance(data, Mapping) else None
        if not isinstance(new_params, Mapping):
            issues.append(
                Issue(
                    "invalid_field",
                    f"{where}.data.params must be an object",
                    node_id=node_id,
                    field=f"{where}.data.params",
                )
            )
            continue
        params[node_id] = {**params[node_id], **new_params}

    input_nodes = [n for n in doc.nodes if _input_param(registry, n.node_type) is not None]
    for key, value in (inputs or {}).items():
        matches = [n for n in input_nodes if n.id == key]
        if not matches:
            matches = [n for n in input_nodes if (n.label or "").strip() == key]
        if not matches:
            known = (
                ", ".join(f"{n.id}" + (f" ({n.label!r})" if n.label else "") for n in input_nodes)
                or "none"
            )
            issues.append(
                Issue(
                    "unknown_input",
                    f"inputs.{key}: no input node has id or label {key!r} (input nodes: {known})",
                    field=f"inputs.{key}",
                )
            )
            continue
        if len(matches) > 1:
            ids = ", ".join(n.id for n in matches)
            issues.append(
                Issue(
                    "ambiguous_input",
                    f"inputs.{key}: several input nodes are "
                    f"labelled {key!r} ({ids}); use a node id",
                    field=f"inputs.{key}",
                )
            )
            continue
        node = matches[0]
        param = _input_param(registry, node.node_type)
        assert param is not None
        params[node.id] = {**params[node.id], param: value}

    if issues:
        raise InvalidInput(f"execution request is invalid: {issues[0].message}", issues)
    nodes = [
        node
        if params[node.id] is node.data.params
        else node.model_copy(
            update={"data": node.data.model_copy(update={"params": params[node.id]})}
        )
        for node in doc.nodes
    ]
    return doc.model_copy(update={"nodes": nodes})


def _input_param(registry: NodeRegistry, node_type: str) -> str | None:
    node = registry.get(node_type)
    return None if node is None else node.input_param


def sandboxed(doc: WorkflowDoc, registry: NodeRegistry) -> WorkflowDoc:
    """`doc` as a test key runs it: every node with a stand-in (a paid generation) replaced
    by it. Edges into inputs the stand-in lacks (a reference image, say) are dropped."""
    replaced: dict[str, frozenset[str]] = {}
    nodes = []
    for node in doc.nodes:
        impl = registry.get(node.node_type)
        stand_in = impl.test_stand_in(node.data.params) if impl is not None else None
        target = registry.get(stand_in[0]) if stand_in is not None else None
        if stand_in is None or target is None:
            nodes.append(node)
            continue
        node_type, params = stand_in
        replaced[node.id] = frozenset(port.name for port in target.inputs)
        data = node.data.model_copy(update={"node_type": node_type, "params": params})
        nodes.append(node.model_copy(update={"data": data}))
    if not replaced:
        return doc
    edges = [
        edge
        for edge in doc.edges
        if edge.target not in replaced
        or edge.target_handle is None
        or edge.target_handle in replaced[edge.target]
    ]
    return doc.model_copy(update={"nodes": nodes, "edges": edges})
