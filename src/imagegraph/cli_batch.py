"""`imagegraph batch`: a workflow over every item of a CSV, JSON Lines or JSON file, in this
process or on a server, with a progress bar; the images and manifest land in --out.

The --out directory remembers its batch (`.imagegraph-batch.json`), so the same command run
again follows that batch instead of starting another. In this process the batch stops with
the process and goes on when the command runs again (the runtime resumes every RUNNING
batch when it starts); on a server it never stopped.

Exit codes: 0 every item completed; 1 some failed, or the batch was cancelled; 2 bad input
(nothing was queued); 130 interrupted (the batch is left as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from imagegraph.cli import (
    KeyOption,
    _print_issues,
    app,
    err,
    load_workflow_file,
    out,
)
from imagegraph.cli import print_error as error
from imagegraph.cli_batch_backends import (
    Backend,
    WorkflowSource,
    doc_sha256,
    in_process,
    on_server,
)
from imagegraph.errors import ImagegraphError, InvalidInput

if TYPE_CHECKING:
    from imagegraph.batches.expand import Item
    from imagegraph.client import Batch, ValidationFailed

STATE_FILE = ".imagegraph-batch.json"
OK, FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
# The strategies of `imagegraph.batches.expand.Seeds` (named here so that `imagegraph
# --help` does not import the engine).
SeedStrategy = Literal["hash", "increment", "fixed", "random", "workflow"]
SEED_LIMIT = 2**31 - 1
# Without a terminal (logs, CI), progress is a line at most this often.
LOG_SECONDS = 5.0
# Options that do not change what a batch makes: a resumed batch keeps its own.
_FREE_OPTIONS = frozenset({"concurrency", "name"})


@dataclass(frozen=True)
class Wanted:
    """What this command asks for, as `.imagegraph-batch.json` records it."""

    server: str | None
    data_dir: str | None
    workflow: WorkflowSource
    items_file: Path
    items_sha256: str
    options: dict[str, Any]

    def differences(self, state: Mapping[str, Any]) -> list[str]:
        """How a recorded batch differs from this request (empty: it is this batch)."""
        found = []
        if state.get("server") != self.server or state.get("dataDir") != self.data_dir:
            recorded = state.get("server") or f"in-process on {state.get('dataDir')}"
            asked = self.server or f"in-process on {self.data_dir}"
            found.append(f"it runs {recorded}, this command asks for {asked}")
        workflow = state.get("workflow") or {}
        if self.workflow.doc is None:
            same_workflow = workflow.get("id") == self.workflow.given
        else:
            same_workflow = workflow.get("sha256") == self.workflow.sha256
        if not same_workflow:
            found.append(f"the workflow is not the same (it was {workflow.get('source')})")
        items = state.get("items") or {}
        if items.get("sha256") != self.items_sha256:
            found.append(f"the items file is not the same (it was {items.get('file')})")
        recorded_options = state.get("options") or {}
        for name in sorted(set(recorded_options) | set(self.options)):
            if name in _FREE_OPTIONS:
                continue
            if recorded_options.get(name) != self.options.get(name):
                found.append(
                    f"{name} was {json.dumps(recorded_options.get(name))}, "
                    f"now {json.dumps(self.options.get(name))}"
                )
        return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _exit(
            f"cannot read {path}: {exc}; remove it or pick a new --out", BAD_INPUT
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("batchId"), str):
        raise _exit(f"{path} does not name a batch; remove it or pick a new --out", BAD_INPUT)
    return state


def write_state(
    out_dir: Path, wanted: Wanted, batch_id: str, workflow_id: str, version: int
) -> None:
    state = {
        "batchId": batch_id,
        "server": wanted.server,
        "dataDir": wanted.data_dir,
        "workflow": {**wanted.workflow.record(), "id": workflow_id, "version": version},
        "items": {"file": str(wanted.items_file), "sha256": wanted.items_sha256},
        "options": wanted.options,
        "createdAt": datetime.now(UTC).isoformat(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{STATE_FILE}.part"
    partial.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(partial, out_dir / STATE_FILE)


def _exit(message: str, code: int) -> typer.Exit:
    error(message)
    return typer.Exit(code)


# -- following it ----------------------------------------------------------------------------


class Interrupts:
    """The first Ctrl-C (or SIGTERM) asks to stop following, leaving the batch as it is (a
    batch being created is created first, and recorded); a second one stops at once."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._task = asyncio.current_task()
        self._installed: list[signal.Signals] = []

    def __enter__(self) -> Interrupts:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._received)
            except (NotImplementedError, RuntimeError):  # not on this platform or thread
                continue
            self._installed.append(signum)
        return self

    def __exit__(self, *_exc: object) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._installed:
            loop.remove_signal_handler(signum)

    def _received(self) -> None:
        if self.stop.is_set() and self._task is not None:
            self._task.cancel()
        self.stop.set()


class ProgressView:
    """A live progress bar on a terminal; elsewhere (logs, CI) a line every few seconds."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console,
            )
        self._task: TaskID | None = None
        self._said: tuple[int, int] | None = None
        self._said_at = 0.0

    def __enter__(self) -> ProgressView:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def show(self, batch: Batch) -> None:
        counts = batch.counts
        ended = counts.completed + counts.failed + counts.cancelled
        detail = describe(batch)
        if self.bar is not None:
            if self._task is None:
                self._task = self.bar.add_task(batch.batch_id, total=counts.total, detail="")
            self.bar.update(self._task, completed=ended, total=counts.total, detail=detail)
            return
        now = time.monotonic()
        said = (ended, counts.running)
        if said != self._said and (now - self._said_at >= LOG_SECONDS or batch.done):
            self.console.print(
                f"{batch.batch_id}: {ended}/{counts.total} ended, {counts.completed} completed, "
                f"{detail}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            self._said, self._said_at = said, now


def describe(batch: Batch) -> str:
    counts = batch.counts
    rate = "-" if batch.images_per_minute is None else f"{batch.images_per_minute:.1f}"
    return (
        f"{counts.failed} failed, {counts.running} running · {rate} img/min · "
        f"{batch.credits:g} credits · ETA {_duration(batch.eta_seconds)}"
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


async def follow(backend: Backend, batch_id: str, stop: asyncio.Event) -> Batch:
    """Show the batch's progress until it ends, or until `stop` is set."""
    from imagegraph.client import RateLimited

    last: Batch | None = None
    with ProgressView(err) as view:
        while True:
            wait = backend.poll_seconds
            try:
                last = await backend.progress(batch_id)
            except RateLimited as exc:
                wait = exc.retry_after or 10.0
            else:
                view.show(last)
                if last.done:
                    return last
            if stop.is_set() and last is not None:
                return last
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()


async def drive(
    wanted: Wanted,
    state: Mapping[str, Any] | None,
    open_backend: Callable[[], contextlib.AbstractAsyncContextManager[Backend]],
    out_dir: Path,
    retry: bool,
) -> int:
    """Start (or find again) the batch, follow it, deliver it; returns the exit code."""
    from imagegraph.client import ImagegraphClientError, NotFound, ValidationFailed
    from imagegraph.errors import NotFound as NoSuch

    with Interrupts() as interrupts:
        try:
            async with open_backend() as backend:
                if state is None:
                    workflow_id, version = await backend.workflow(wanted.workflow)
                    batch_id = await backend.create(
                        workflow_id, version, wanted.items_file, wanted.options
                    )
                    write_state(out_dir, wanted, batch_id, workflow_id, version)
                    err.print(
                        f"started batch {batch_id} (workflow {workflow_id} v{version})",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                else:
                    batch_id = str(state["batchId"])
                    err.print(f"following batch {batch_id} again", markup=False, highlight=False)
                    if retry:
                        retried = await backend.retry_failed(batch_id)
                        err.print(
                            f"{retried} failed items run again", markup=False, highlight=False
                        )
                batch = await follow(backend, batch_id, interrupts.stop)
                if not batch.done:
                    _say_how_to_resume(batch_id, wanted.server)
                    return INTERRUPTED
                folder = await backend.deliver(batch_id, out_dir)
        except InvalidInput as exc:
            _print_issues(exc)
            return BAD_INPUT
        except ValidationFailed as exc:
            _print_problems(exc)
            return BAD_INPUT
        except (NotFound, NoSuch) as exc:  # a workflow id, or the batch --out names
            message = exc.message if isinstance(exc, NoSuch) else exc.detail
            if state is not None:
                message += (
                    f" (named in {out_dir / STATE_FILE}: remove that file or pick a new --out "
                    "to start a new batch)"
                )
            error(message)
            return BAD_INPUT
        except ImagegraphError as exc:
            error(exc.message)
            return FAILED
        except ImagegraphClientError as exc:
            error(str(exc))
            return FAILED
    return outcome(batch, folder)


def _print_problems(exc: ValidationFailed) -> None:
    error(exc.detail)
    messages = [str(e.get("message") or e) for e in exc.errors]
    if len(messages) > 1:
        for message in messages:
            err.print(f"  - {message}", markup=False, highlight=False, soft_wrap=True)


def _say_how_to_resume(batch_id: str, server: str | None) -> None:
    again = "imagegraph " + shlex.join(sys.argv[1:])
    if server is None:
        what = "stops with this process and goes on where it was when you run the same command"
    else:
        what = f"goes on at {server}; run the same command to follow it and collect its files"
    err.print(
        f"interrupted: batch {batch_id} {what} again:\n  {again}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def outcome(batch: Batch, folder: Path) -> int:
    counts = batch.counts
    err.print(
        f"batch {batch.batch_id} {batch.status.lower()}: {counts.completed} completed, "
        f"{counts.failed} failed, {counts.cancelled} cancelled of {counts.total} "
        f"({counts.deduplicated} deduplicated), {batch.credits:g} credits; "
        f"images and manifest.json in {folder}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    out.print(str(folder), markup=False, highlight=False, soft_wrap=True)
    if batch.status == "CANCELLED":
        error(f"the batch was cancelled ({counts.cancelled} items)")
        return FAILED
    if counts.failed:
        error(
            f"{counts.failed} of {counts.total} items failed (each one's error is in "
            f"{folder / 'manifest.json'}); run the same command with --retry-failed to run "
            "them again"
        )
        return FAILED
    return OK


# -- the command -----------------------------------------------------------------------------


def _workflow_source(given: str, on_server: bool) -> WorkflowSource:
    path = Path(given)
    if path.is_file():
        try:
            doc = load_workflow_file(path)
        except InvalidInput as exc:
            _print_issues(exc)
            raise typer.Exit(BAD_INPUT) from None
        return WorkflowSource(given, doc, doc_sha256(doc))
    if on_server and not path.suffix:
        return WorkflowSource(given, None, None)
    raise _exit(
        f"cannot read {given}: no such file"
        + ("" if on_server else " (a saved workflow's id only works with --server)"),
        BAD_INPUT,
    )


def _read_items(path: Path) -> list[Item]:
    from imagegraph.batches.sources import guess_format, read_items

    fmt = guess_format(path.name, None)
    assert fmt is not None
    try:
        return read_items(path.read_bytes(), fmt, path.name)
    except InvalidInput as exc:
        _print_issues(exc)
        raise typer.Exit(BAD_INPUT) from None


@app.command()
def batch(
    workflow: Annotated[
        str,
        typer.Argument(
            help="Workflow file (JSON or YAML); with --server also a saved workflow's id.",
            show_default=False,
        ),
    ],
    items: Annotated[
        Path,
        typer.Argument(
            help="Items: .csv (first row names the columns), .jsonl or .json. Columns are "
            "input node ids or labels, template variables, `seed` or `<nodeId>.<param>`.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Where the images and manifest go (DIR/batch-<date>-<id>/); also remembers "
            "the batch, so the same command run again resumes it.",
            show_default=False,
        ),
    ],
    concurrency: Annotated[
        int, typer.Option(min=1, max=1000, help="Executions running at a time.")
    ] = 10,
    runs: Annotated[
        int, typer.Option(min=1, max=100, help="Runs per item, each with its own seed.")
    ] = 1,
    seed_strategy: Annotated[
        SeedStrategy,
        typer.Option(
            help="hash: from the item's values (same item, same seed); increment: base + "
            "position; fixed: base; random: drawn once and recorded; workflow: the "
            "workflow's own seeds. A `seed` column wins.",
        ),
    ] = "hash",
    seed_base: Annotated[int, typer.Option(min=0, max=SEED_LIMIT, help="Base seed.")] = 0,
    dedupe: Annotated[
        bool, typer.Option("--dedupe/--no-dedupe", help="Run identical items once.")
    ] = True,
    negative: Annotated[
        list[str] | None,
        typer.Option(
            "--negative",
            help="A negative prompt of the library, by name, added to every "
            "prompt:template's; repeat for several.",
            show_default=False,
        ),
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed", help="When the batch in --out has ended: run its failed items again."
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="In-process: the database and images (default: <out>/.imagegraph).",
            show_default=False,
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="Run the batch on this server (http://host:port) instead of in this process.",
            show_default=False,
        ),
    ] = None,
    key: KeyOption = None,
) -> None:
    """Run a workflow over every item of a file, with a progress bar; write the images and a
    manifest to --out. Run the same command again to resume it.

    Exit codes: 0 all completed, 1 some failed, 2 bad input (nothing queued), 130 interrupted.
    """
    from imagegraph.batches.sources import guess_format

    if guess_format(items.name, None) is None:
        raise _exit(f"{items}: name the items file .csv, .jsonl or .json", BAD_INPUT)
    source = _workflow_source(workflow, server is not None)
    directory = None if server else (data_dir or out_dir / ".imagegraph").resolve()
    wanted = Wanted(
        server=server.rstrip("/") if server else None,
        data_dir=str(directory) if directory else None,
        workflow=source,
        items_file=items,
        items_sha256=file_sha256(items),
        options={
            "name": items.name,
            "concurrency": concurrency,
            "dedupe": dedupe,
            "runsPerItem": runs,
            "seeds": {"strategy": seed_strategy, "base": seed_base},
            "negativePrompts": list(negative or []),
        },
    )
    state = read_state(out_dir)
    if state is not None:
        differences = wanted.differences(state)
        if differences:
            raise _exit(
                f"{out_dir} already holds batch {state['batchId']}, which is not this one: "
                f"{'; '.join(differences)}. Pick a new --out to start a new batch (or run "
                "the command as before to follow that one).",
                BAD_INPUT,
            )
        recorded = (state.get("options") or {}).get("concurrency")
        if recorded != concurrency:
            err.print(
                f"note: batch {state['batchId']} keeps its concurrency of {recorded}",
                markup=False,
                highlight=False,
            )

    open_backend: Callable[[], contextlib.AbstractAsyncContextManager[Backend]]
    if server is None:
        assert directory is not None
        parsed = _read_items(items) if state is None else None
        open_backend = functools.partial(in_process, directory, parsed)
    else:
        from imagegraph.client import default_api_key

        api_key = key or default_api_key()
        if not api_key:
            raise _exit("no API key: pass --key or set IMAGEGRAPH_API_KEY", BAD_INPUT)
        open_backend = functools.partial(on_server, server, api_key)
    try:
        code = asyncio.run(drive(wanted, state, open_backend, out_dir, retry_failed))
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted", markup=False, highlight=False)
        code = INTERRUPTED
    raise typer.Exit(code)
