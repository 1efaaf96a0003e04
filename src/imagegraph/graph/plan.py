"""A validated workflow, shaped for running: typed params, edges by input port, topology."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from imagegraph.graph.ports import PortType

if TYPE_CHECKING:
    from imagegraph.nodes.base import Node, NodeParams


@dataclass(frozen=True)
class EdgeRef:
    edge_id: str
    source: str
    source_port: str
    target: str
    target_port: str


@dataclass(frozen=True)
class PlanNode:
    id: str
    label: str | None
    node: Node[Any]
    params: NodeParams
    # Edges into each input port, in document order (fan-in order is the edge order).
    inputs: Mapping[str, tuple[EdgeRef, ...]]
    output_types: Mapping[str, PortType]
    predecessors: tuple[str, ...]
    successors: tuple[str, ...]

    @property
    def type(self) -> str:
        return self.node.type

    @cached_property
    def params_json(self) -> dict[str, Any]:
        """The params as JSON (camelCase), as recorded on assets and hashed into cache keys."""
        return self.params.model_dump(mode="json", by_alias=True)

    def input_values(self, outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """This node's inputs by port, from its predecessors' outputs (by node, then port).
        A port with several edges into it (`multiple`) gets a list, in edge order; a port no
        live edge feeds is left out."""
        inputs: dict[str, Any] = {}
        for port in self.node.input_ports(self.params):
            values = [
                outputs[edge.source][edge.source_port]
                for edge in self.inputs.get(port.name, ())
                if edge.source_port in outputs.get(edge.source, {})
            ]
            if not values:
                continue
            if port.multiple:
                flat: list[Any] = []
                for value in values:
                    flat.extend(value if isinstance(value, list) else [value])
                inputs[port.name] = flat
            else:
                inputs[port.name] = values[0]
        return inputs


@dataclass(frozen=True)
class Plan:
    nodes: Mapping[str, PlanNode]
    order: tuple[str, ...]  # a topological order

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if not self.nodes[n].predecessors)

    def price(self) -> float:
        return sum(n.node.price(n.params) for n in self.nodes.values())

    def between(self, first: str, last: str) -> tuple[str, ...]:
        """The nodes on some path from `first` to `last`, both included (none if `last` is
        not downstream of `first`), in topological order."""
        below = self._reach(first, lambda n: n.successors)
        above = self._reach(last, lambda n: n.predecessors)
        return tuple(n for n in self.order if n in below and n in above)

    def _reach(self, start: str, step: Callable[[PlanNode], tuple[str, ...]]) -> set[str]:
        seen = {start}
        work = [start]
        while work:
            for nxt in step(self.nodes[work.pop()]):
                if nxt not in seen:
                    seen.add(nxt)
                    work.append(nxt)
        return seen
