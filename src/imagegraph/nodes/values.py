"""Values that flow along edges, and how they are written to and read from node run records.

Text, numbers, booleans and JSON travel as themselves. Images travel as `ImageValue`: a
reference to stored bytes (by sha256) plus what a reader needs without opening them. Every
value has a content hash, which is what the node output cache keys on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagegraph.graph.ports import PortType


@dataclass(frozen=True)
class ImageValue:
    """A stored image as it travels between nodes.

    `generation` says how the pixels were first made (prompt, negative prompt, seed, model,
    params, node id); image operations carry it forward unchanged, and the asset's parent
    links record the operations in between.
    """

    asset_id: str
    sha256: str
    format: str
    width: int
    height: int
    generation: Mapping[str, Any] = field(default_factory=dict)
    # Measurements of quality nodes so far, by metric; carried forward like `generation`
    # and stored on the output asset made from this image.
    quality: Mapping[str, Any] = field(default_factory=dict)
    # A quality gate's decision for this image (approved, rejected, pending-review), which
    # becomes the review state of the output asset made from it.
    review: str | None = None
    # How many bytes are stored (None in records made before it was kept).
    size_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": PortType.IMAGE.value,
            "assetId": self.asset_id,
            "sha256": self.sha256,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "generation": dict(self.generation),
            **({"quality": dict(self.quality)} if self.quality else {}),
            **({"review": self.review} if self.review else {}),
            **({"sizeBytes": self.size_bytes} if self.size_bytes is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageValue:
        return cls(
            asset_id=data["assetId"],
            sha256=data["sha256"],
            format=data["format"],
            width=int(data["width"]),
            height=int(data["height"]),
            generation=data.get("generation") or {},
            quality=data.get("quality") or {},
            review=data.get("review"),
            size_bytes=data.get("sizeBytes"),
        )


def inherited_generation(
    generation: Mapping[str, Any] | None, parents: Sequence[ImageValue]
) -> dict[str, Any]:
    """How a new image was made: as given, else as its first parent was."""
    if generation is not None:
        return dict(generation)
    return dict(parents[0].generation) if parents else {}


def encode_value(value: Any) -> dict[str, Any]:
    """A node output value as JSON for the node run record."""
    if isinstance(value, ImageValue):
        return value.to_json()
    if isinstance(value, list) and all(isinstance(v, ImageValue) for v in value):
        return {"type": PortType.IMAGE_LIST.value, "items": [v.to_json() for v in value]}
    if isinstance(value, bool):
        return {"type": PortType.BOOLEAN.value, "value": value}
    if isinstance(value, int | float):
        return {"type": PortType.NUMBER.value, "value": value}
    if isinstance(value, str):
        return {"type": PortType.TEXT.value, "value": value}
    return {"type": PortType.JSON.value, "value": value}


def decode_value(data: Mapping[str, Any]) -> Any:
    kind = data.get("type")
    if kind == PortType.IMAGE.value:
        return ImageValue.from_json(data)
    if kind == PortType.IMAGE_LIST.value:
        return [ImageValue.from_json(item) for item in data["items"]]
    return data.get("value")


def content_hash(value: Any) -> str:
    """A hash of what a value *is*: images by their bytes, everything else by canonical JSON."""
    if isinstance(value, ImageValue):
        return "img:" + value.sha256
    if isinstance(value, list) and value and all(isinstance(v, ImageValue) for v in value):
        return "imgs:" + ",".join(v.sha256 for v in value)
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
