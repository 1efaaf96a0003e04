"""A batch's manifest and its delivery as a directory or a zip.

The layout is the same everywhere (API export, zip download, CLI):

    batch-<date>-<batchId>/
      manifest.json
      approved/00000-out_1.png
      rejected/...
      pending-review/...

`manifest.json` maps each item's inputs to its output files and to how each was made:
workflow id and version, model and model version, provider, seed, params, quality scores,
credits, timings and review state. Each entry carries what `imagegraph reproduce` needs to
run that exact generation again.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import RowMapping

from imagegraph.blobs import BlobStore
from imagegraph.quality import near_duplicate_groups
from imagegraph.store import batches as store
from imagegraph.store.batches import PENDING_REVIEW, REVIEW_STATES
from imagegraph.store.db import Database

MANIFEST_VERSION = 1
# Perceptual hashes at most this many bits apart mark near-duplicate outputs.
NEAR_DUPLICATE_BITS = 6
EXTENSIONS = {"jpeg": "jpg"}


def folder_name(batch: Mapping[Any, Any]) -> str:
    created: datetime = batch["created_at"]
    return f"batch-{created.astimezone(UTC).date().isoformat()}-{batch['id']}"


def build(db: Database, workspace_id: str, batch_id: str) -> dict[str, Any]:
    """The manifest of a batch as it stands (a running batch's manifest lists what is done)."""
    batch = store.get_batch(db, workspace_id, batch_id)
    items, outputs, runs = store.all_items(db, batch_id)
    entries = [_entry(batch, item, outputs, runs) for item in items]
    near = _near_duplicates(entries)
    return {
        "manifestVersion": MANIFEST_VERSION,
        "batchId": batch["id"],
        "name": batch["name"],
        "folder": folder_name(batch),
        "status": batch["status"],
        "workflowId": batch["workflow_id"],
        "workflowVersion": batch["workflow_version"],
        "mode": batch["mode"],
        "options": batch["options"],
        "counts": counts(batch),
        "credits": round(batch["credits"], 6),
        "createdAt": _iso(batch["created_at"]),
        "startedAt": _iso(batch["started_at"]),
        "finishedAt": _iso(batch["finished_at"]),
        "nearDuplicates": near,
        "items": entries,
    }


def _near_duplicates(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outputs of different items whose perceptual hashes (measured by quality:dedupe or
    quality:similarity) are within NEAR_DUPLICATE_BITS: each is flagged in its entry
    (`nearDuplicateOf`) and listed. Outputs shared by deduped items count once."""
    hashed: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry in entries:
        for output in entry["outputs"]:
            phash = (output.get("quality") or {}).get("phash")
            if isinstance(phash, str) and output["assetId"] not in seen:
                seen.add(output["assetId"])
                hashed.append(output)
    found = []
    for group in near_duplicate_groups(
        [o["quality"]["phash"] for o in hashed], NEAR_DUPLICATE_BITS
    ):
        keeper = hashed[group.keeper]
        for duplicate in group.duplicates:
            output = hashed[duplicate.index]
            output["nearDuplicateOf"] = keeper["assetId"]
            found.append(
                {
                    "assetId": output["assetId"],
                    "file": output["file"],
                    "nearDuplicateOf": keeper["assetId"],
                    "keeperFile": keeper["file"],
                    "distance": duplicate.distance,
                }
            )
    return found


def counts(batch: Mapping[Any, Any]) -> dict[str, int]:
    return {
        "total": batch["total"],
        "pending": batch["pending"],
        "running": batch["running"],
        "completed": batch["completed"],
        "failed": batch["failed"],
        "cancelled": batch["cancelled"],
        "deduplicated": batch["deduplicated"],
    }


def _entry(
    batch: Mapping[Any, Any],
    item: RowMapping,
    outputs: Mapping[str, list[RowMapping]],
    runs: Mapping[str, RowMapping],
) -> dict[str, Any]:
    execution_id = item["execution_id"]
    execution = runs.get(execution_id) if execution_id else None
    files = []
    for asset in outputs.get(execution_id or "", []):
        generation = (asset["meta"] or {}).get("generation") or {}
        files.append(
            {
                "assetId": asset["id"],
                "nodeId": asset["node_id"],
                "file": output_path(item, asset),
                "sha256": asset["sha256"],
                "format": asset["format"],
                "width": asset["width"],
                "height": asset["height"],
                "reviewState": asset["review_state"] or PENDING_REVIEW,
                "reviewNote": asset["review_note"],
                "quality": asset["quality"] or {},
                "prompt": asset["prompt"],
                "negativePrompt": asset["negative_prompt"],
                "seed": asset["seed"],
                "model": asset["model"],
                "modelVersion": generation.get("modelVersion"),
                "provider": generation.get("provider"),
                "providerRequestId": generation.get("providerRequestId"),
                "params": asset["params"],
            }
        )
    timings = None
    if execution is not None:
        started, finished = execution["started_at"], execution["finished_at"]
        timings = {
            "queuedAt": _iso(execution["created_at"]),
            "startedAt": _iso(started),
            "finishedAt": _iso(finished),
            "durationMs": round((finished - started).total_seconds() * 1000, 3)
            if started and finished
            else None,
        }
    return {
        "itemId": item["id"],
        "index": item["item_index"],
        "variant": item["variant"] or None,
        "run": item["run"],
        "inputs": item["inputs"],
        "seed": item["seed"],
        "status": item["status"],
        "duplicateOf": item["duplicate_of"],
        "attempts": item["attempts"],
        "executionId": execution_id,
        "workflowId": batch["workflow_id"],
        "workflowVersion": batch["workflow_version"],
        "credits": round(execution["credits"], 6) if execution is not None else 0.0,
        "error": item["error"],
        "timings": timings,
        "outputs": files,
    }


def output_path(item: Mapping[Any, Any], asset: Mapping[Any, Any]) -> str:
    """Where an output goes in the layout: its review state's folder, then a name that
    sorts by item (`00042-B-r1-out_1.png` is item 42, variant B, run 1, node out_1)."""
    parts = [f"{item['item_index']:05d}"]
    if item["variant"]:
        parts.append(str(item["variant"]))
    if item["run"]:
        parts.append(f"r{item['run']}")
    parts.append(str(asset["node_id"] or "image"))
    ext = EXTENSIONS.get(asset["format"], asset["format"])
    state = asset["review_state"] if asset["review_state"] in REVIEW_STATES else PENDING_REVIEW
    return f"{state}/{'-'.join(parts)}.{ext}"


def _files(manifest: Mapping[Any, Any]) -> Iterator[tuple[str, str]]:
    """(path in the layout, sha256) of every output, once per path."""
    seen: set[str] = set()
    for entry in manifest["items"]:
        for output in entry["outputs"]:
            if output["file"] not in seen:
                seen.add(output["file"])
                yield output["file"], output["sha256"]


def export_to(manifest: Mapping[Any, Any], blobs: BlobStore, parent: Path) -> Path:
    """Write the layout under `parent`; returns the batch's folder. Files already there with
    the right size are kept (an export can be repeated or resumed); files in a review
    folder that no longer holds them (their review changed) are removed."""
    root: Path = parent / str(manifest["folder"])
    wanted = dict(_files(manifest))
    for state in REVIEW_STATES:
        (root / state).mkdir(parents=True, exist_ok=True)
        for present in (root / state).iterdir():
            if f"{state}/{present.name}" not in wanted and present.is_file():
                present.unlink()
    for relative, sha in wanted.items():
        target = root / relative
        data = blobs.get(sha)
        if target.exists() and target.stat().st_size == len(data):
            continue
        _write_atomic(target, data)
    _write_atomic(root / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return root


def write_zip(manifest: Mapping[Any, Any], blobs: BlobStore, out: IO[bytes]) -> None:
    """The same layout as one zip (images stored as they are: they are compressed already)."""
    folder = manifest["folder"]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for state in REVIEW_STATES:
            archive.writestr(f"{folder}/{state}/", b"")
        for relative, sha in _files(manifest):
            archive.writestr(f"{folder}/{relative}", blobs.get(sha))
        archive.writestr(
            f"{folder}/manifest.json",
            json.dumps(manifest, indent=2) + "\n",
            compress_type=zipfile.ZIP_DEFLATED,
        )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
