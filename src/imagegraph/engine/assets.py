"""The asset rows of the images a node run makes, built in memory and inserted with the
run's outcome."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from imagegraph.ids import new_id
from imagegraph.nodes.base import AssetKind
from imagegraph.nodes.values import ImageValue, inherited_generation


class AssetRecorder:
    """Builds the asset rows of one node run's images (inserted with its outcome). Without
    a blob store it can only record images that are stored already (`keep_image`): what a
    node settled without running (`Node.settle`) may do."""

    def __init__(
        self,
        workspace_id: str,
        execution_id: str,
        node_id: str,
        node_type: str,
        params_json: Mapping[str, Any],
    ) -> None:
        self._workspace_id = workspace_id
        self._execution_id = execution_id
        self._node_id = node_id
        self._node_type = node_type
        self._params_json = params_json
        self.new_assets: list[dict[str, Any]] = []

    def keep_image(
        self,
        image: ImageValue,
        *,
        parents: Sequence[ImageValue] = (),
        generation: Mapping[str, Any] | None = None,
        kind: AssetKind = "intermediate",
    ) -> ImageValue | None:
        if image.size_bytes is None:
            return None  # its size would have to be read from the store
        return self.record(
            image.sha256,
            image.format,
            image.width,
            image.height,
            image.size_bytes,
            parents,
            generation,
            kind,
        )

    def record(
        self,
        sha: str,
        fmt: str,
        width: int,
        height: int,
        size: int,
        parents: Sequence[ImageValue],
        generation: Mapping[str, Any] | None,
        kind: AssetKind,
    ) -> ImageValue:
        """A new asset of stored bytes; its generation and quality come from its parents
        unless given."""
        gen = inherited_generation(generation, parents)
        measured, review = inherited_quality(parents)
        asset_id = new_id("asset")
        self.new_assets.append(
            {
                "id": asset_id,
                "workspace_id": self._workspace_id,
                "kind": kind,
                "sha256": sha,
                "format": fmt,
                "width": width,
                "height": height,
                "size_bytes": size,
                "execution_id": self._execution_id,
                "node_id": self._node_id,
                "prompt": gen.get("prompt"),
                "negative_prompt": gen.get("negativePrompt"),
                "seed": gen.get("seed"),
                "model": gen.get("model"),
                "params": gen.get("params"),
                "meta": {
                    "generation": gen,
                    "parents": [p.asset_id for p in parents],
                    "operation": {
                        "nodeId": self._node_id,
                        "nodeType": self._node_type,
                        "params": self._params_json,
                    },
                },
                "filename": None,
                # Present even when empty: a node's new assets are inserted by one statement,
                # compiled for the columns of the first row.
                "quality": measured or None,
                "review_state": review,
                "created_at": datetime.now(UTC),
            }
        )
        return ImageValue(
            asset_id, sha, fmt, width, height, gen, quality=measured, review=review, size_bytes=size
        )


def inherited_quality(parents: Sequence[ImageValue]) -> tuple[dict[str, Any], str | None]:
    """A new image's quality measurements (its parents', merged; the first parent's win) and
    review state (that of the first parent with one)."""
    measured: dict[str, Any] = {}
    for parent in reversed(parents):
        if parent.quality:
            measured.update(parent.quality)
    review = next((p.review for p in parents if p.review), None)
    return measured, review
