"""One run of a batch again, from its manifest entry: the execution's inputs and overrides.

A batch records what each run needs to be made again: the batch's options (with the
negative prompt text it resolved) at the top of the manifest, and each item's own values,
variant and seed in its entry. This rebuilds the execution's `inputs` and `nodes` from
them exactly as the dispatcher did, so running them on the same workflow version makes
the same generation. Pure: no I/O.

    run = item_run(doc, registry, manifest["options"], entry["inputs"], entry["seed"],
                   entry["variant"])
    await engine.submit(doc, inputs=run.inputs, overrides=run.overrides)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagegraph.batches.expand import BatchOptions, Columns, Run
from imagegraph.graph.model import WorkflowDoc
from imagegraph.nodes.base import NodeRegistry

# Stored with a batch's options: the library's negative prompts it named, resolved.
NEGATIVE_TEXT = "negativeText"


def item_run(
    doc: WorkflowDoc,
    registry: NodeRegistry,
    options: Mapping[str, Any],
    values: Mapping[str, Any],
    seed: int | None,
    variant: str | None,
) -> Run:
    """The inputs and param overrides of one run: `options` as stored with the batch (the
    manifest's `options`), `values` the item's own columns, `seed` and `variant` the run's."""
    parsed = BatchOptions.model_validate({k: v for k, v in options.items() if k != NEGATIVE_TEXT})
    chosen = next((v for v in parsed.variants if v.name == variant), None) if variant else None
    if variant and chosen is None:
        raise ValueError(f"the batch has no variant {variant!r}")
    return Columns(doc, registry).run(
        {**parsed.inputs, **values},
        seed,
        chosen,
        parsed.nodes,
        str(options.get(NEGATIVE_TEXT) or ""),
    )
