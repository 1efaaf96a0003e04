"""`imagegraph reproduce`: make one generation of a batch again from its manifest entry, and
check that each image is byte for byte the one the manifest records.

The run gets what the batch gave it: the same workflow id and version, the same inputs,
seed, variant overrides and negative prompt text (`imagegraph.batches.replay`). In this
process it needs the data directory the batch ran in; on a server, the server it ran on.

Exit codes: 0 every output is identical; 1 the run failed; 2 bad arguments or manifest;
3 an output differs from the manifest's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from imagegraph.cli import KeyOption, _client, _registry, _settings, app, err, out
from imagegraph.cli import print_error as error
from imagegraph.errors import ImagegraphError
from imagegraph.settings import Settings

OK, FAILED, BAD_INPUT, DIFFERS = 0, 1, 2, 3


@dataclass(frozen=True)
class Made:
    """An output of the run made again."""

    node_id: str | None
    sha256: str
    format: str
    data: bytes


class RunFailed(Exception):
    """The run made again did not complete."""


def pick(
    manifest: Mapping[str, Any],
    item: int | None,
    item_id: int | None,
    run: int,
    variant: str | None,
) -> dict[str, Any]:
    """The manifest entry named by `--item-id`, or by `--item` with `--run` and `--variant`
    (a manifest with a single entry needs neither)."""
    entries: list[dict[str, Any]] = list(manifest.get("items") or [])
    if item_id is not None:
        found = [e for e in entries if e.get("itemId") == item_id]
        named = f"item id {item_id}"
    elif item is not None:
        found = [
            e
            for e in entries
            if e.get("index") == item
            and e.get("run") == run
            and (variant is None or e.get("variant") == variant)
        ]
        named = f"item {item}, run {run}" + (f", variant {variant!r}" if variant else "")
    elif len(entries) == 1:
        return entries[0]
    else:
        raise ValueError(f"the manifest has {len(entries)} entries: name one with --item INDEX")
    if not found:
        raise ValueError(f"the manifest has no {named}")
    if len(found) > 1:
        variants = ", ".join(str(e.get("variant")) for e in found)
        raise ValueError(f"{named} has variants {variants}: choose one with --variant")
    return found[0]


def _load(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or not {"workflowId", "options", "items"} <= set(manifest):
        raise ValueError(f"{path} is not a batch manifest")
    return manifest


async def make_in_process(
    settings: Settings, manifest: Mapping[str, Any], entry: Mapping[str, Any], max_wait: float
) -> list[Made]:
    from imagegraph.batches.replay import item_run
    from imagegraph.engine.states import ExecutionStatus
    from imagegraph.runtime import Runtime
    from imagegraph.store import assets as asset_store
    from imagegraph.store import executions as execution_store
    from imagegraph.store.tables import DEFAULT_WORKSPACE

    runtime = Runtime.build(settings)
    await runtime.start()
    try:
        version, doc = await runtime.workflow_version(
            DEFAULT_WORKSPACE, manifest["workflowId"], manifest["workflowVersion"]
        )
        again = item_run(
            doc,
            runtime.registry,
            manifest["options"],
            entry["inputs"],
            entry["seed"],
            entry["variant"],
        )
        execution_id = await runtime.engine.submit(
            doc,
            workspace_id=DEFAULT_WORKSPACE,
            mode=manifest.get("mode") or "live",
            workflow_id=manifest["workflowId"],
            workflow_version=version,
            inputs=again.inputs,
            overrides=again.overrides,
        )
        status = await runtime.engine.wait(execution_id, max_wait=max_wait)
        if status is not ExecutionStatus.COMPLETED:
            if status in (ExecutionStatus.QUEUED, ExecutionStatus.RUNNING):
                await runtime.engine.cancel(execution_id)
                raise RunFailed(f"gave up after {max_wait:g} s")
            row, _runs = await runtime.db.run(
                execution_store.get_execution, runtime.db, DEFAULT_WORKSPACE, execution_id
            )
            message = (row["error"] or {}).get("message", status.value)
            raise RunFailed(f"execution {status.value.lower()}: {message}")
        assets = await runtime.db.run(asset_store.execution_outputs, runtime.db, execution_id)
        return [
            Made(a["node_id"], a["sha256"], a["format"], runtime.blobs.get(a["sha256"]))
            for a in assets
        ]
    finally:
        await runtime.stop()


def make_on_server(
    url: str,
    key: str | None,
    manifest: Mapping[str, Any],
    entry: Mapping[str, Any],
    timeout: float,
) -> list[Made]:
    from imagegraph.batches.replay import item_run
    from imagegraph.graph.model import parse_workflow

    with _client(url, key, None) as client:
        mode = client.workspace().mode
        if manifest.get("mode") and mode != manifest["mode"]:
            err.print(
                f"note: the batch ran with a {manifest['mode']} key and this key is {mode}; "
                "its images may differ",
                markup=False,
                highlight=False,
            )
        saved = client.get_workflow(manifest["workflowId"], manifest["workflowVersion"])
        again = item_run(
            parse_workflow(saved.document()),
            _registry(),
            manifest["options"],
            entry["inputs"],
            entry["seed"],
            entry["variant"],
        )
        result = client.run(
            saved.id, again.inputs, nodes=again.overrides, version=saved.version, timeout=timeout
        )
        if result.status != "COMPLETED":
            message = (result.error or {}).get("message", result.status)
            raise RunFailed(f"execution {result.status.lower()}: {message}")
        return [Made(o.node_id, o.sha256, o.format, client.download(o)) for o in result.outputs]


def compare(
    entry: Mapping[str, Any], made: Sequence[Made], out_dir: Path
) -> tuple[list[Path], list[str]]:
    """Write the outputs made again; returns their paths, and how each differs from the
    manifest's output of the same node (empty: all identical)."""
    from imagegraph.nodes import imaging

    expected: dict[str | None, list[Mapping[str, Any]]] = {}
    for output in entry.get("outputs") or []:
        expected.setdefault(output.get("nodeId"), []).append(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    differences: list[str] = []
    for output in made:
        recorded = expected.get(output.node_id) or []
        before = recorded.pop(0) if recorded else None
        if before is not None:
            name = Path(str(before["file"])).name
        else:
            name = f"{entry['index']:05d}-{output.node_id or 'image'}"
            name += f".{imaging.extension(output.format)}"
        path = out_dir / name
        path.write_bytes(output.data)
        paths.append(path)
        if before is None:
            differences.append(f"{path}: the manifest records no such output")
        elif before["sha256"] != output.sha256:
            differences.append(
                f"{path}: sha256 {output.sha256}, the manifest has {before['sha256']}"
            )
        else:
            err.print(
                f"identical: {path} (sha256 {output.sha256[:16]}…)", markup=False, highlight=False
            )
    for node_id, left in expected.items():
        differences.extend(f"{o['file']}: not made again (node {node_id})" for o in left)
    return paths, differences


@app.command()
def reproduce(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="A batch's manifest.json.", exists=True, dir_okay=False, show_default=False
        ),
    ],
    item: Annotated[
        int | None,
        typer.Option(
            "--item", min=0, help="The item's index (its row, from 0).", show_default=False
        ),
    ] = None,
    item_id: Annotated[
        int | None,
        typer.Option(
            "--item-id", help="The entry's itemId (instead of --item).", show_default=False
        ),
    ] = None,
    run: Annotated[int, typer.Option("--run", min=0, help="Which run of the item.")] = 0,
    variant: Annotated[
        str | None,
        typer.Option("--variant", help="Which prompt variant of the item.", show_default=False),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the images made again.")
    ] = Path("reproduced"),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The data directory the batch ran in (default: the .imagegraph directory "
            "next to the batch's folder, where `imagegraph batch` keeps it).",
            show_default=False,
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option("--server", help="Make it on this server (the batch's).", show_default=False),
    ] = None,
    key: KeyOption = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600,
) -> None:
    """Make one image of a batch again (same workflow version, inputs, seed and overrides)
    and check that it is byte for byte the one in the manifest.

    Exit codes: 0 identical, 1 the run failed, 2 bad arguments, 3 an output differs.
    """
    try:
        found = _load(manifest)
        entry = pick(found, item, item_id, run, variant)
    except ValueError as exc:
        error(str(exc))
        raise typer.Exit(BAD_INPUT) from None
    label = f"item {entry['index']}, run {entry['run']}" + (
        f", variant {entry['variant']}" if entry.get("variant") else ""
    )
    try:
        if server is not None:
            made = make_on_server(server, key, found, entry, timeout)
        else:
            directory = data_dir or manifest.resolve().parent.parent / ".imagegraph"
            settings = _settings(data_dir=directory)
            if settings.database_url is None and not (directory / "imagegraph.db").is_file():
                error(
                    f"no imagegraph database in {directory}: pass the data directory the "
                    "batch ran in (--data-dir) or its server (--server)"
                )
                raise typer.Exit(BAD_INPUT)
            made = asyncio.run(make_in_process(settings, found, entry, timeout))
    except (RunFailed, ValueError) as exc:
        error(f"{label}: {exc}")
        raise typer.Exit(FAILED) from None
    except ImagegraphError as exc:
        error(exc.message)
        raise typer.Exit(FAILED) from None
    paths, differences = compare(entry, made, out_dir)
    for path in paths:
        out.print(str(path), markup=False, highlight=False, soft_wrap=True)
    if differences:
        for difference in differences:
            err.print(f"differs: {difference}", markup=False, highlight=False, soft_wrap=True)
        if entry.get("seed") is None:
            err.print(
                "note: the batch gave this run no seed (--seed-strategy workflow): a "
                "generator without a seed of its own draws a new one every time",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        error(
            f"{label} did not come out the same: {len(differences)} output(s) differ from "
            "the manifest"
        )
        raise typer.Exit(DIFFERS)
    err.print(
        f"{label}: reproduced exactly; {len(paths)} output(s) identical to the manifest's",
        markup=False,
        highlight=False,
    )
