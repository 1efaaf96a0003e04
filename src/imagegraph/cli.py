"""The `imagegraph` command: serve the API, run a workflow in-process, validate, list nodes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import mimetypes
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from imagegraph import __version__
from imagegraph.blobs import BlobStore
from imagegraph.engine.states import ExecutionStatus
from imagegraph.errors import ImagegraphError, InvalidInput
from imagegraph.graph.model import WorkflowDoc, parse_workflow
from imagegraph.graph.validate import validate_workflow
from imagegraph.nodes import NodeRegistry, imaging
from imagegraph.settings import Settings

if TYPE_CHECKING:
    from imagegraph.client import Client, Key

app = typer.Typer(
    name="imagegraph",
    help="A self-hosted engine for AI image workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
keys_app = typer.Typer(
    help="API keys of a workspace, through a running server (needs an admin key).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
credits_app = typer.Typer(help="Credits, through a running server.", no_args_is_help=True)
app.add_typer(credits_app, name="credits")
workspaces_app = typer.Typer(
    help="Workspaces, on the database directly (an operator's task).", no_args_is_help=True
)
app.add_typer(workspaces_app, name="workspaces")
out = Console()
err = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory [env: IMAGEGRAPH_DATA_DIR; default ~/.imagegraph].",
        show_default=False,
    ),
]


UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="IMAGEGRAPH_URL", help="The server [env: IMAGEGRAPH_URL]."),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="IMAGEGRAPH_API_KEY",
        help="API key [env: IMAGEGRAPH_API_KEY; default: <data-dir>/admin.key].",
        show_default=False,
    ),
]


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _registry() -> NodeRegistry:
    """Every node type this installation knows: built-in ones and the catalog's models."""
    from imagegraph.runtime import node_registry

    return node_registry(_settings())


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def print_error(message: str) -> None:
    """An error line on stderr; the message is shown as it is (not read as rich markup)."""
    err.print(Text.assemble(("error:", "red"), f" {message}"), highlight=False, soft_wrap=True)


def _print_issues(exc: InvalidInput) -> None:
    err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
    if len(exc.issues) > 1:
        for issue in exc.issues:
            err.print(f"  - {issue.message}", highlight=False, soft_wrap=True)


def load_workflow_file(path: Path) -> WorkflowDoc:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from None
    return parse_workflow(raw, "yaml" if path.suffix.lower() in (".yaml", ".yml") else "auto")


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to bind [env: IMAGEGRAPH_HOST; default 127.0.0.1].", show_default=False
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port [env: IMAGEGRAPH_PORT; default 8000].", show_default=False),
    ] = None,
    data_dir: DataDirOption = None,
    log_format: Annotated[
        str | None, typer.Option(help="json or console [env: IMAGEGRAPH_LOG_FORMAT].")
    ] = None,
) -> None:
    """Run the API server with an embedded worker (SQLite and local files by default).

    Every setting can also come from an IMAGEGRAPH_* environment variable; see the README.
    """
    import uvicorn

    from imagegraph.api.app import create_app
    from imagegraph.logs import configure_logging
    from imagegraph.runtime import Runtime, admin_key_path, settle_for_serving

    settings = _settings(host=host, port=port, data_dir=data_dir, log_format=log_format)
    configure_logging(settings.log_level, settings.log_format)
    err.print(
        f"imagegraph {__version__} serving http://{settings.host}:{settings.port} "
        f"(data in {settings.data_dir})",
        highlight=False,
        soft_wrap=True,
    )

    def started(runtime: Runtime) -> None:
        settle_for_serving()
        if runtime.bootstrap_key:
            err.print(
                "Made the default workspace and its admin API key (shown this once; also saved "
                f"to {admin_key_path(settings)}, mode 0600):\n  {runtime.bootstrap_key}",
                highlight=False,
                soft_wrap=True,
            )

    uvicorn.run(
        create_app(settings, on_start=started),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def validate(
    workflow: Annotated[Path, typer.Argument(help="Workflow file (JSON or YAML).")],
) -> None:
    """Check a workflow file and list every problem."""
    try:
        doc = load_workflow_file(workflow)
        plan = validate_workflow(doc, _registry())
    except InvalidInput as exc:
        _print_issues(exc)
        raise typer.Exit(1) from None
    edges = sum(len(refs) for n in plan.nodes.values() for refs in n.inputs.values())
    out.print(f"ok: {doc.name!r} has {len(plan.nodes)} nodes and {edges} edges", highlight=False)


@app.command()
def nodes(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List node types with their ports."""
    described = [node.describe() for node in _registry()]
    if as_json:
        out.print_json(json.dumps(described))
        return
    table = Table("type", "version", "inputs", "outputs", "description")
    for d in described:
        inputs = ", ".join(
            f"{p['name']}:{p['type']}" + ("" if p["required"] else "?") for p in d["inputs"]
        )
        outputs = ", ".join(f"{p['name']}:{p['type']}" for p in d["outputs"])
        table.add_row(d["type"], d["version"], inputs or "-", outputs or "-", d["description"])
    out.print(table)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the hosted models of the catalog and whether each route is configured here
    (IMAGEGRAPH_<PROVIDER>_API_KEY in this environment)."""
    from imagegraph.api.routes.models import model_entries
    from imagegraph.catalog import load_catalog
    from imagegraph.nodes.catalog import CatalogNode
    from imagegraph.providers.hub import ProviderHub

    settings = _settings()
    nodes = [CatalogNode(spec) for spec in load_catalog(settings.catalog_file).values()]
    entries = model_entries(ProviderHub(settings), nodes)
    if as_json:
        out.print_json(json.dumps([e.model_dump(mode="json", by_alias=True) for e in entries]))
        return
    table = Table("type", "credits", "routes (first configured one serves)")
    for entry in entries:
        price = entry.price
        credits = (
            f"{price['perImage']:g}/image"
            if "perImage" in price
            else f"{price['perMegapixel']:g}/MP (min {price.get('minimum', 0):g})"
        )
        routes = Text("\n").join(
            Text(f"{r.provider}:{r.model}", style="green")
            if r.configured
            else Text(f"{r.provider}:{r.model} (set {r.key_variable})", style="dim")
            for r in entry.routes
        )
        table.add_row(entry.type, credits, routes)
    out.print(table)


def parse_input(raw: str) -> tuple[str, Any]:
    """`key=value`: numbers and booleans become JSON values; `@file` reads a file (an image
    file becomes a data URI, anything else its text)."""
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise _fail(f"--input {raw!r} must look like key=value")
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _fail(f"--input {key}: cannot read {path}: {exc.strerror}") from None
        mime = mimetypes.guess_type(path.name)[0] or ""
        if mime.startswith("image/"):
            return key, f"data:{mime};base64,{base64.b64encode(data).decode()}"
        try:
            return key, data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _fail(f"--input {key}: {path} is neither an image nor UTF-8 text") from None
    try:
        parsed = json.loads(value)
    except ValueError:
        return key, value
    return key, parsed if isinstance(parsed, int | float | bool) else value


@app.command()
def run(
    workflow: Annotated[Path, typer.Argument(help="Workflow file (JSON or YAML).")],
    input_: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="key=value for an input node (id or label); @path for an image.",
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write outputs.")] = Path(
        "out"
    ),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Keep the run's database and cache here (default: a temporary "
            "directory, removed afterwards).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600,
) -> None:
    """Run a workflow once, in this process (no server), and write its outputs to a directory."""
    doc = None
    try:
        doc = load_workflow_file(workflow)
    except InvalidInput as exc:
        _print_issues(exc)
        raise typer.Exit(1) from None
    inputs = dict(parse_input(item) for item in input_ or [])
    temporary = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="imagegraph-run-")) if temporary else data_dir
    assert directory is not None
    try:
        code = asyncio.run(_run(doc, inputs, out_dir, _settings(data_dir=directory), timeout))
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
    raise typer.Exit(code)


async def _run(
    doc: WorkflowDoc,
    inputs: Mapping[str, Any],
    out_dir: Path,
    settings: Settings,
    max_wait: float,
) -> int:
    from imagegraph.runtime import Runtime
    from imagegraph.store import assets as asset_store
    from imagegraph.store import executions as execution_store
    from imagegraph.store.tables import DEFAULT_WORKSPACE

    runtime = Runtime.build(settings)
    await runtime.start()
    try:
        try:
            execution_id = await runtime.engine.submit(doc, inputs=inputs)
        except InvalidInput as exc:
            _print_issues(exc)
            return 1
        status = await runtime.engine.wait(execution_id, max_wait=max_wait)
        row, runs = await runtime.db.run(
            execution_store.get_execution, runtime.db, DEFAULT_WORKSPACE, execution_id
        )
        for r in runs:
            mark = {"SUCCEEDED": "[green]ok[/green]", "FAILED": "[red]failed[/red]"}.get(
                r["state"], r["state"].lower()
            )
            cached = " (cached)" if r["cached"] else ""
            took = f"{r['duration_ms']:.0f} ms" if r["duration_ms"] is not None else ""
            err.print(
                f"  {r['node_id']:<24} {r['node_type']:<20} {mark} {took}{cached}", highlight=False
            )
        if status is not ExecutionStatus.COMPLETED:
            if status in (ExecutionStatus.QUEUED, ExecutionStatus.RUNNING):
                await runtime.engine.cancel(execution_id)
                err.print(f"[red]error:[/red] gave up after {max_wait:g} s", highlight=False)
                return 1
            message = (row["error"] or {}).get("message", status.value)
            err.print(
                f"[red]error:[/red] execution {status.value.lower()}: {message}",
                highlight=False,
                soft_wrap=True,
            )
            return 1
        outputs = await runtime.db.run(asset_store.execution_outputs, runtime.db, execution_id)
        names = _output_names(doc)
        files = {
            out_dir / f"{names.get(a['node_id']) or a['node_id'] or a['id']}."
            f"{imaging.extension(a['format'])}": a["sha256"]
            for a in outputs
        }
        await asyncio.to_thread(_write_outputs, runtime.blobs, out_dir, files)
        for path in files:
            out.print(str(path), highlight=False, soft_wrap=True)
        return 0
    except ImagegraphError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        return 1
    finally:
        await runtime.stop()


def _write_outputs(blobs: BlobStore, out_dir: Path, files: Mapping[Path, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, sha in files.items():
        path.write_bytes(blobs.get(sha))


def _output_names(doc: WorkflowDoc) -> dict[str, str]:
    names = {}
    for node in doc.nodes:
        filename = node.data.params.get("filename")
        if node.node_type == "output:image" and isinstance(filename, str):
            names[node.id] = filename
    return names


@contextlib.contextmanager
def _client(url: str, key: str | None, data_dir: Path | None) -> Iterator[Client]:
    """A client of the server at `url`; API errors become one clear line and exit 1."""
    from imagegraph.client import Client, ImagegraphClientError, default_api_key

    key = key or default_api_key(data_dir)
    if not key:
        raise _fail(
            "no API key: pass --key, set IMAGEGRAPH_API_KEY, or run where the server's "
            "data directory holds admin.key (--data-dir)"
        )
    try:
        with Client(url, key, max_retries=1) as client:
            yield client
    except ImagegraphClientError as exc:
        raise _fail(str(exc)) from None


def _keys_table(items: Sequence[Key]) -> Table:
    table = Table("name", "key", "scopes", "last used")
    table.add_column("id", no_wrap=True)
    for k in items:
        name = f"{k.name} ({k.mode})" + (" [revoked]" if k.revoked_at else "")
        table.add_row(
            name,
            f"{k.prefix}…{k.last4}",
            " ".join(k.scopes),
            f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "-",
            k.id,
        )
    return table


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            "-s",
            help="workflows:read, workflows:write, executions:write or admin; repeat for "
            "several [default: workflows:read workflows:write executions:write].",
            show_default=False,
        ),
    ] = None,
    test: Annotated[
        bool, typer.Option("--test", help="A test key: every generation on the sandbox, free.")
    ] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    key: KeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create an API key and print its secret (shown this once)."""
    scopes = scope or ["workflows:read", "workflows:write", "executions:write"]
    with _client(url, key, data_dir) as client:
        created = client.create_key(name, scopes, "test" if test else "live")
    err.print(f"created key {created.id} ({created.mode}, {' '.join(created.scopes)})")
    err.print("the secret is shown this once; store it now:", highlight=False)
    out.print(created.key, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    key: KeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """List the workspace's keys (prefix and last four characters only)."""
    with _client(url, key, data_dir) as client:
        found = client.list_keys()
    if as_json:
        out.print_json(json.dumps([k.model_dump(mode="json") for k in found]))
        return
    out.print(_keys_table(found))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `keys list`).")],
    url: UrlOption = "http://127.0.0.1:8000",
    key: KeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key; requests with it are refused from now on."""
    with _client(url, key, data_dir) as client:
        revoked = client.revoke_key(key_id)
    out.print(f"revoked {revoked.id} ({revoked.prefix}…{revoked.last4})", highlight=False)


@credits_app.command("add")
def credits_add(
    amount: Annotated[float, typer.Argument(help="Credits to add.", min=0.000001)],
    note: Annotated[str | None, typer.Option(help="Why (kept in the ledger).")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    key: KeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add credits to the key's workspace (admin)."""
    with _client(url, key, data_dir) as client:
        workspace = client.add_credits(amount, note)
    credits = workspace.credits
    out.print(
        f"{workspace.id}: balance {credits.balance:g}, available {credits.available:g}",
        highlight=False,
    )


@credits_app.command("show")
def credits_show(
    url: UrlOption = "http://127.0.0.1:8000", key: KeyOption = None, data_dir: DataDirOption = None
) -> None:
    """The workspace's plan, credits and the last 30 days of usage."""
    with _client(url, key, data_dir) as client:
        workspace = client.workspace()
        usage = client.usage()
    credits = workspace.credits
    out.print(
        f"{workspace.id} ({workspace.plan.name}): balance {credits.balance:g}, held "
        f"{credits.held:g}, available {credits.available:g}",
        highlight=False,
    )
    table = Table("model", "generations", "images", "credits", "per image")
    for row in usage.by_model:
        per_image = "-" if row.cost_per_image is None else f"{row.cost_per_image:g}"
        table.add_row(
            row.model or "-", str(row.generations), str(row.images), f"{row.credits:g}", per_image
        )
    out.print(table)


@workspaces_app.command("create")
def workspaces_create(
    name: Annotated[str, typer.Argument(help="A name people will recognise.")],
    plan: Annotated[
        str | None,
        typer.Option(help="Plan [default: IMAGEGRAPH_DEFAULT_PLAN].", show_default=False),
    ] = None,
    credits: Annotated[float, typer.Option(help="Starting credits.", min=0)] = 0.0,
    data_dir: DataDirOption = None,
) -> None:
    """Create a workspace with an admin key, on the database directly; prints the key once."""
    from datetime import UTC, datetime

    from imagegraph import keys
    from imagegraph.plans import load_plans
    from imagegraph.store import migrate, workspaces
    from imagegraph.store.db import Database

    settings = _settings(data_dir=data_dir)
    plans = load_plans(settings.plans_file)
    chosen = plan or settings.default_plan
    if chosen not in plans:
        raise _fail(f"unknown plan {chosen!r}; known plans: {', '.join(sorted(plans))}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url_or_default(), threads=1)
    try:
        migrate.upgrade(db)
        now = datetime.now(UTC)
        workspace = workspaces.create_workspace(db, name, chosen, now)
        if credits:
            workspaces.grant_credits(db, workspace.id, credits, "starting credits", now)
        new = keys.generate("live")
        workspaces.add_key(db, workspace.id, new, "admin", ["admin"], now)
    finally:
        db.close()
    err.print(
        f"created workspace {workspace.id} ({chosen}) with an admin key, shown this once:",
        highlight=False,
        soft_wrap=True,
    )
    out.print(new.secret, highlight=False, soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOption = None) -> None:
    """Apply database migrations (IMAGEGRAPH_DATABASE_URL, or SQLite in the data directory)."""
    from imagegraph.store import migrate
    from imagegraph.store.db import Database

    settings = _settings(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url_or_default(), threads=1)
    try:
        migrate.upgrade(db)
        out.print(f"database at revision {migrate.current_revision(db)}", highlight=False)
    finally:
        db.close()


def main() -> None:
    try:
        app()
    except ImagegraphError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(1)


# The batch and reproduce commands live in their own modules; importing them registers them.
from imagegraph import cli_batch, cli_reproduce  # noqa: E402, F401
