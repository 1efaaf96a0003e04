"""A validated workflow, shaped for running: typed params, edges by input port, topology."""

from __future__ import annotations

from collections.abc import Mapping
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


@dataclass(frozen=True)
class Plan:
    nodes: Mapping[str, PlanNode]
    order: tuple[str, ...]  # a topological order

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if not self.nodes[n].predecessors)

    def price(self) -> float:
        return sum(n.node.price(n.params) for n in self.nodes.values())
