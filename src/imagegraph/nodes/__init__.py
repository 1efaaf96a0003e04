"""Node types: one module per family, each node a small typed class.

Nodes see only a `NodeContext`; they never touch the database, the HTTP layer or settings.
`builtin_registry()` is the registry every entry point starts from.
"""

from __future__ import annotations

from imagegraph.catalog import Catalog
from imagegraph.nodes.base import (
    ImageOperation,
    Inputs,
    Node,
    NodeContext,
    NodeParams,
    NodeRegistry,
    NoParams,
    Outputs,
)
from imagegraph.nodes.catalog import CatalogNode
from imagegraph.nodes.control import Branch, Collect
from imagegraph.nodes.gate import QualityGate
from imagegraph.nodes.image_ops import ConvertFormat, Crop, Grid, Resize, UpscaleLanczos
from imagegraph.nodes.inputs import InputImage, InputNumber, InputText
from imagegraph.nodes.local import LocalGenerate
from imagegraph.nodes.output import OutputImage
from imagegraph.nodes.prompt import PromptTemplateNode
from imagegraph.nodes.quality import QualityCheck, QualityDedupe, QualitySimilarity
from imagegraph.nodes.sandbox import SandboxGenerate
from imagegraph.nodes.values import ImageValue


def builtin_registry() -> NodeRegistry:
    """Every node type that ships with imagegraph and needs no configuration (the catalog's
    hosted models come on top: see `registry_for`)."""
    return NodeRegistry(
        [
            InputText(),
            InputNumber(),
            InputImage(),
            PromptTemplateNode(),
            SandboxGenerate(),
            Resize(),
            Crop(),
            UpscaleLanczos(),
            ConvertFormat(),
            Grid(),
            QualityCheck(),
            QualitySimilarity(),
            QualityDedupe(),
            QualityGate(),
            Branch(),
            Collect(),
            OutputImage(),
        ]
    )


def registry_for(catalog: Catalog, local: LocalGenerate | None = None) -> NodeRegistry:
    """The built-in node types, `generate:local`, and one node type per catalog model."""
    registry = builtin_registry()
    registry.register(local or LocalGenerate())
    for spec in catalog.values():
        registry.register(CatalogNode(spec))
    return registry


__all__ = [
    "ImageOperation",
    "ImageValue",
    "Inputs",
    "LocalGenerate",
    "NoParams",
    "Node",
    "NodeContext",
    "NodeParams",
    "NodeRegistry",
    "Outputs",
    "builtin_registry",
    "registry_for",
]
