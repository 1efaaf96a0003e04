"""Validation of a workflow before anything runs.

Every check adds issues to one list, so a user sees every problem at once, each located by
node id, edge id, port or field. Checks that need a sound structure (types, cycles) skip the
parts that earlier checks already found broken instead of reporting the same thing twice.
Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from imagegraph.errors import Issue, WorkflowInvalid
from imagegraph.graph.model import GraphEdge, WorkflowDoc, error_message, format_loc
from imagegraph.graph.plan import EdgeRef, Plan, PlanNode
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import Node, NodeParams, NodeRegistry


@dataclass
class _Checked:
    """What the node-level checks learned, for the graph-level checks to use."""

    nodes: dict[str, tuple[Node[Any], NodeParams]] = field(default_factory=dict)
    labels: dict[str, str | None] = field(default_factory=dict)
    edges: list[EdgeRef] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)


def validate_workflow(doc: WorkflowDoc, registry: NodeRegistry, max_nodes: int = 1000) -> Plan:
    """Check a workflow and return its plan, or raise `WorkflowInvalid` listing every issue."""
    checked = _Checked()
    if len(doc.nodes) > max_nodes:
        checked.issues.append(
            Issue(
                "too_many_nodes", f"workflow has {len(doc.nodes)} nodes; the limit is {max_nodes}"
            )
        )
    _check_nodes(doc, registry, checked)
    _check_edges(doc, checked)
    order = _check_cycles(checked)
    output_types = _check_types(checked, order)
    _check_required_inputs(doc, checked)
    if not any(node.is_output for node, _ in checked.nodes.values()) and not any(
        i.code == "unknown_node_type" for i in checked.issues
    ):
        checked.issues.append(
            Issue("no_output", "workflow has no output node (add an 'output:image' node)")
        )
    if checked.issues:
        raise WorkflowInvalid(checked.issues)
    assert order is not None
    plan = _build_plan(checked, order, output_types)
    _check_plan(plan, checked)
    if checked.issues:
        raise WorkflowInvalid(checked.issues)
    return plan


def _check_nodes(doc: WorkflowDoc, registry: NodeRegistry, checked: _Checked) -> None:
    seen: set[str] = set()
    for graph_node in doc.nodes:
        if graph_node.id in seen:
            checked.issues.append(
                Issue(
                    "duplicate_node_id",
                    f"node id {graph_node.id!r} is used twice",
                    node_id=graph_node.id,
                )
            )
            continue
        seen.add(graph_node.id)
        checked.labels[graph_node.id] = graph_node.label
        node = registry.get(graph_node.node_type)
        if node is None:
            checked.issues.append(
                Issue(
                    "unknown_node_type",
                    f"node {graph_node.id}: unknown node type {graph_node.node_type!r}",
                    node_id=graph_node.id,
                    field="data.nodeType",
                )
            )
            continue
        try:
            params = node.parse_params(graph_node.data.params)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                where = format_loc(("params", *error["loc"]))
                checked.issues.append(
                    Issue(
                        "invalid_param",
                        f"node {graph_node.id} ({node.type}): {where}: {error_message(error)}",
                        node_id=graph_node.id,
                        field=where,
                    )
                )
            if _has_static_ports(node):
                # Its edges can still be checked against the ports, which params don't change.
                checked.nodes[graph_node.id] = (node, node.params_model.model_construct())
            continue
        for issue in node.check(params):
            checked.issues.append(
                Issue(
                    issue.code,
                    f"node {graph_node.id} ({node.type}): {issue.message}",
                    node_id=graph_node.id,
                    field=issue.field,
                    port=issue.port,
                )
            )
        checked.nodes[graph_node.id] = (node, params)


def _has_static_ports(node: Node[Any]) -> bool:
    cls = type(node)
    return cls.input_ports is Node.input_ports and cls.output_ports is Node.output_ports


def _check_edges(doc: WorkflowDoc, checked: _Checked) -> None:
    all_ids = {n.id for n in doc.nodes}
    seen_edges: set[str] = set()
    for edge in doc.edges:
        if edge.id is not None:
            if edge.id in seen_edges:
                checked.issues.append(
                    Issue(
                        "duplicate_edge_id", f"edge id {edge.id!r} is used twice", edge_id=edge.id
                    )
                )
                continue
            seen_edges.add(edge.id)
        dangling = False
        for end, node_id in (("source", edge.source), ("target", edge.target)):
            if node_id not in all_ids:
                dangling = True
                checked.issues.append(
                    Issue(
                        "dangling_edge",
                        f"edge {edge.key}: {end} node {node_id!r} does not exist",
                        edge_id=edge.key,
                        node_id=node_id,
                    )
                )
        if dangling or edge.source not in checked.nodes or edge.target not in checked.nodes:
            continue
        ref = _resolve_handles(edge, checked)
        if ref is not None:
            checked.edges.append(ref)

    # One value per port unless the port collects several (fan-in).
    by_port: dict[tuple[str, str], list[EdgeRef]] = defaultdict(list)
    for ref in checked.edges:
        by_port[(ref.target, ref.target_port)].append(ref)
    for (target, port_name), refs in by_port.items():
        port = _input_port(checked, target, port_name)
        if port is not None and not port.multiple and len(refs) > 1:
            edges = ", ".join(r.edge_id for r in refs)
            checked.issues.append(
                Issue(
                    "too_many_edges",
                    f"node {target}: input {port_name!r} takes one edge but has {len(refs)} "
                    f"({edges})",
                    node_id=target,
                    port=port_name,
                )
            )


def _resolve_handles(edge: GraphEdge, checked: _Checked) -> EdgeRef | None:
    source_node, source_params = checked.nodes[edge.source]
    target_node, target_params = checked.nodes[edge.target]
    outputs = source_node.output_ports(source_params, {})
    inputs = target_node.input_ports(target_params)
    ok = True

    source_port = edge.source_handle
    if source_port is None:
        if len(outputs) == 1:
            source_port = outputs[0].name
        else:
            ok = False
            names = ", ".join(p.name for p in outputs) or "none"
            checked.issues.append(
                Issue(
                    "missing_handle",
                    f"edge {edge.key}: sourceHandle is required because "
                    f"node {edge.source} has outputs: {names}",
                    edge_id=edge.key,
                    node_id=edge.source,
                )
            )
    elif source_port not in {p.name for p in outputs}:
        ok = False
        names = ", ".join(p.name for p in outputs) or "none"
        checked.issues.append(
            Issue(
                "unknown_port",
                f"edge {edge.key}: node {edge.source} ({source_node.type}) has "
                f"no output {source_port!r} (outputs: {names})",
                edge_id=edge.key,
                node_id=edge.source,
                port=source_port,
            )
        )

    target_port = edge.target_handle
    if target_port is None:
        if len(inputs) == 1:
            target_port = inputs[0].name
        else:
            ok = False
            names = ", ".join(p.name for p in inputs) or "none"
            checked.issues.append(
                Issue(
                    "missing_handle",
                    f"edge {edge.key}: targetHandle is required because "
                    f"node {edge.target} has inputs: {names}",
                    edge_id=edge.key,
                    node_id=edge.target,
                )
            )
    elif target_port not in {p.name for p in inputs}:
        ok = False
        names = ", ".join(p.name for p in inputs) or "none"
        checked.issues.append(
            Issue(
                "unknown_port",
                f"edge {edge.key}: node {edge.target} ({target_node.type}) has "
                f"no input {target_port!r} (inputs: {names})",
                edge_id=edge.key,
                node_id=edge.target,
                port=target_port,
            )
        )
    if not ok or source_port is None or target_port is None:
        return None
    return EdgeRef(edge.key, edge.source, source_port, edge.target, target_port)


def _input_port(checked: _Checked, node_id: str, name: str) -> InputPort | None:
    node, params = checked.nodes[node_id]
    for port in node.input_ports(params):
        if port.name == name:
            return port
    return None


def _check_cycles(checked: _Checked) -> list[str] | None:
    """Kahn's algorithm; on a cycle, name its nodes in order and return None."""
    successors: dict[str, list[str]] = defaultdict(list)
    indegree = dict.fromkeys(checked.nodes, 0)
    for ref in checked.edges:
        successors[ref.source].append(ref.target)
        indegree[ref.target] += 1
    ready = [n for n, d in indegree.items() if d == 0]
    order: list[str] = []
    while ready:
        node_id = ready.pop()
        order.append(node_id)
        for succ in successors[node_id]:
            indegree[succ] -= 1
            if indegree[succ] == 0:
                ready.append(succ)
    if len(order) == len(checked.nodes):
        return order
    for cycle in _find_cycles(successors, {n for n, d in indegree.items() if d > 0}):
        path = " -> ".join([*cycle, cycle[0]])
        checked.issues.append(Issue("cycle", f"workflow has a cycle: {path}", node_id=cycle[0]))
    return None


def _find_cycles(successors: Mapping[str, list[str]], candidates: set[str]) -> list[list[str]]:
    """One simple cycle per strongly connected component that loops, in edge order."""
    cycles = []
    for component in _strongly_connected(successors, candidates):
        first = min(component)
        if len(component) == 1 and first not in successors.get(first, []):
            continue
        # Inside a component every node has a successor in it, so this walk closes a loop.
        path: list[str] = []
        position: dict[str, int] = {}
        node = first
        while node not in position:
            position[node] = len(path)
            path.append(node)
            node = min(s for s in successors.get(node, []) if s in component)
        cycles.append(path[position[node] :])
    return sorted(cycles)


def _strongly_connected(successors: Mapping[str, list[str]], nodes: set[str]) -> list[set[str]]:
    """Tarjan's algorithm, iterative so that long chains cannot exhaust the stack."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = [s for s in successors.get(node, []) if s in nodes]
            if child < len(children):
                work.append((node, child + 1))
                nxt = children[child]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _check_types(checked: _Checked, order: list[str] | None) -> dict[str, dict[str, PortType]]:
    """Check every edge's types; resolve outputs that depend on inputs (in topological order)."""
    incoming: dict[str, list[EdgeRef]] = defaultdict(list)
    for ref in checked.edges:
        incoming[ref.target].append(ref)
    resolved: dict[str, dict[str, PortType]] = {}
    sequence = order if order is not None else list(checked.nodes)
    for node_id in sequence:
        node, params = checked.nodes[node_id]
        input_types: dict[str, PortType] = {}
        for ref in incoming[node_id]:
            source_type = _source_type(checked, resolved, ref)
            port = _input_port(checked, node_id, ref.target_port)
            if port is None or source_type is None:
                continue
            if not port.can_take(source_type):
                checked.issues.append(
                    Issue(
                        "incompatible_types",
                        f"edge {ref.edge_id}: {ref.source}.{ref.source_port} gives "
                        f"{source_type.value} but {node_id}.{ref.target_port} takes "
                        f"{port.type_label()}",
                        edge_id=ref.edge_id,
                        node_id=node_id,
                        port=ref.target_port,
                    )
                )
                continue
            input_types[ref.target_port] = source_type
        ports: tuple[OutputPort, ...] = node.output_ports(params, input_types)
        resolved[node_id] = {p.name: p.type for p in ports}
    return resolved


def _source_type(
    checked: _Checked, resolved: Mapping[str, Mapping[str, PortType]], ref: EdgeRef
) -> PortType | None:
    if ref.source in resolved:
        return resolved[ref.source].get(ref.source_port)
    node, params = checked.nodes[ref.source]
    for port in node.output_ports(params, {}):
        if port.name == ref.source_port:
            return port.type
    return None


def _check_required_inputs(doc: WorkflowDoc, checked: _Checked) -> None:
    connected = {(ref.target, ref.target_port) for ref in checked.edges}
    # Ports whose edges were rejected above are not reported missing a second time. (Keyed by
    # the edges' targets: an issue's node and port may be the source end of an edge.)
    attempted = {(e.target, e.target_handle) for e in doc.edges if e.target_handle}
    # An edge with no targetHandle was reported already; which port it meant is unknown.
    unclear = {e.target for e in doc.edges if not e.target_handle}
    for node_id, (node, params) in checked.nodes.items():
        if node_id in unclear:
            continue
        for port in node.input_ports(params):
            key = (node_id, port.name)
            if port.required and key not in connected and key not in attempted:
                checked.issues.append(
                    Issue(
                        "missing_input",
                        f"node {node_id} ({node.type}): required input {port.name!r} "
                        f"({port.type_label()}) is not connected",
                        node_id=node_id,
                        port=port.name,
                    )
                )


def _check_plan(plan: Plan, checked: _Checked) -> None:
    """What each node finds wrong with the rest of the workflow (a quality gate's target
    that is not upstream of it, say); only asked of workflows sound in every other way."""
    for node_id, pnode in plan.nodes.items():
        for issue in pnode.node.check_plan(pnode, plan):
            checked.issues.append(
                Issue(
                    issue.code,
                    f"node {node_id} ({pnode.type}): {issue.message}",
                    node_id=node_id,
                    field=issue.field,
                    port=issue.port,
                )
            )


def _build_plan(
    checked: _Checked, order: list[str], output_types: Mapping[str, Mapping[str, PortType]]
) -> Plan:
    inputs: dict[str, dict[str, list[EdgeRef]]] = {n: defaultdict(list) for n in checked.nodes}
    preds: dict[str, list[str]] = {n: [] for n in checked.nodes}
    succs: dict[str, list[str]] = {n: [] for n in checked.nodes}
    for ref in checked.edges:
        inputs[ref.target][ref.target_port].append(ref)
        if ref.source not in preds[ref.target]:
            preds[ref.target].append(ref.source)
        if ref.target not in succs[ref.source]:
            succs[ref.source].append(ref.target)
    nodes = {
        node_id: PlanNode(
            id=node_id,
            label=checked.labels.get(node_id),
            node=node,
            params=params,
            inputs={port: tuple(refs) for port, refs in inputs[node_id].items()},
            output_types=dict(output_types.get(node_id, {})),
            predecessors=tuple(preds[node_id]),
            successors=tuple(succs[node_id]),
        )
        for node_id, (node, params) in checked.nodes.items()
    }
    return Plan(nodes=nodes, order=tuple(order))
