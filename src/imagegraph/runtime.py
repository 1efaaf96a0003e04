"""Assembling one process from settings: database, blob store, node registry, engine.

The API app factory and the CLI both start here, so every entry point runs the same engine
on the same storage.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imagegraph import keys
from imagegraph.batches import Batches
from imagegraph.blobs import BlobStore, LocalBlobStore
from imagegraph.catalog import load_catalog
from imagegraph.engine.engine import Engine
from imagegraph.engine.lru import LRU
from imagegraph.errors import InvalidInput
from imagegraph.graph.model import WorkflowDoc, parse_workflow
from imagegraph.nodes import LocalGenerate, NodeRegistry, registry_for
from imagegraph.plans import Plan, load_plans
from imagegraph.providers.hub import ProviderHub
from imagegraph.ratelimit import RateLimiter
from imagegraph.settings import Settings
from imagegraph.store import idempotency, migrate, workflows, workspaces
from imagegraph.store.db import Database
from imagegraph.webhooks import Webhooks

log = logging.getLogger("imagegraph.runtime")

ADMIN_KEY_FILE = "admin.key"
MAINTENANCE_SECONDS = 600.0


@dataclass
class Runtime:
    settings: Settings
    db: Database
    blobs: BlobStore
    registry: NodeRegistry
    engine: Engine
    plans: dict[str, Plan]
    limiter: RateLimiter
    webhooks: Webhooks
    providers: ProviderHub
    batches: Batches = field(init=False)
    keys: workspaces.KeyCache = field(default_factory=workspaces.KeyCache)
    # The admin key made on this start, when the database had none (shown once).
    bootstrap_key: str | None = None
    # Saved workflow versions never change, so their parsed documents can be kept.
    _versions: LRU[tuple[str, str, int], WorkflowDoc] = field(
        default_factory=lambda: LRU(max_weight=512)
    )
    _maintenance: asyncio.Task[None] = field(init=False)

    def __post_init__(self) -> None:
        self.batches = Batches(self.db, self.engine, self.workflow_version)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        run_worker: bool = True,
        registry: NodeRegistry | None = None,
    ) -> Runtime:
        """Open (and migrate) the database and storage named by `settings`. On a database
        without any API key, make the default workspace's admin key and write it to
        `<data-dir>/admin.key` (see `bootstrap_key`)."""
        plans = load_plans(settings.plans_file)
        if settings.default_plan not in plans:
            raise InvalidInput(
                f"IMAGEGRAPH_DEFAULT_PLAN={settings.default_plan!r} is not a plan; "
                f"known plans: {', '.join(sorted(plans))}"
            )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(
            settings.database_url_or_default(),
            threads=settings.db_threads,
            sqlite_synchronous=settings.sqlite_synchronous,
        )
        migrate.upgrade(db)
        bootstrap_key = _bootstrap(db, settings)
        blobs = LocalBlobStore(settings.blob_dir, fsync=settings.sqlite_synchronous == "FULL")
        registry = registry or node_registry(settings)
        providers = ProviderHub(settings)
        engine = Engine(settings, db, blobs, registry, run_worker=run_worker, providers=providers)
        limiter = RateLimiter(settings.rate_limit_storage)
        webhooks = Webhooks(settings, db)
        engine.bus.on_end(lambda _event: webhooks.wake())
        return cls(
            settings,
            db,
            blobs,
            registry,
            engine,
            plans,
            limiter,
            webhooks,
            providers,
            bootstrap_key=bootstrap_key,
        )

    def plan(self, name: str) -> Plan:
        """A workspace's plan; one no longer configured falls back to the default plan."""
        plan = self.plans.get(name)
        if plan is None:
            log.warning("plan %r is not configured; using %r", name, self.settings.default_plan)
            plan = self.plans[self.settings.default_plan]
        return plan

    async def workflow_version(
        self, workspace_id: str, workflow_id: str, version: int | None = None
    ) -> tuple[int, WorkflowDoc]:
        """A saved workflow of the workspace (the latest version unless `version`), parsed."""
        number = await self.db.run(
            workflows.resolve_version, self.db, workspace_id, workflow_id, version
        )
        doc = self._versions.get((workspace_id, workflow_id, number))
        if doc is None:
            record = await self.db.run(
                workflows.get_workflow, self.db, workspace_id, workflow_id, number
            )
            doc = parse_workflow(record.graph)
            self._versions.put((workspace_id, workflow_id, number), doc)
        return number, doc

    async def start(self) -> None:
        await self.engine.start()
        await self.batches.start()
        await self.webhooks.start()
        self._maintenance = asyncio.create_task(self._maintain(), name="imagegraph-maintenance")

    async def stop(self) -> None:
        self._maintenance.cancel()
        await asyncio.gather(self._maintenance, return_exceptions=True)
        await self.webhooks.stop()
        await self.batches.stop()
        await self.engine.stop()
        await self.providers.aclose()
        await self.limiter.aclose()
        self.db.close()

    async def _maintain(self) -> None:
        """Housekeeping: forget idempotency keys past their retention."""
        while True:
            try:
                before = datetime.now(UTC) - timedelta(hours=self.settings.idempotency_hours)
                reaped = await self.db.run(idempotency.reap, self.db, before)
                if reaped:
                    log.info("forgot %d expired idempotency keys", reaped)
            except Exception:
                log.exception("housekeeping failed; trying again later")
            await asyncio.sleep(MAINTENANCE_SECONDS)


def admin_key_path(settings: Settings) -> Path:
    return settings.data_dir / ADMIN_KEY_FILE


def _bootstrap(db: Database, settings: Settings) -> str | None:
    """The default workspace's first admin key, if the database has no key yet."""
    if workspaces.count_keys(db):
        return None
    key = keys.generate("live")
    made = workspaces.bootstrap(
        db, key, settings.default_plan, settings.bootstrap_credits, datetime.now(UTC)
    )
    if made is None:
        return None  # another process got there first
    write_secret(admin_key_path(settings), key.secret)
    return key.secret


def write_secret(path: Path, secret: str) -> None:
    """Write a secret readable only by its owner (0600), atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_admin_key(settings: Settings) -> str | None:
    """The bootstrap admin key from the data directory, if it is there."""
    try:
        return admin_key_path(settings).read_text().strip() or None
    except FileNotFoundError:
        return None


def node_registry(settings: Settings) -> NodeRegistry:
    """Every node type this installation offers: the built-ins, generate:local configured
    from `settings`, and one type per model in the catalog."""
    local = LocalGenerate(
        cache_bytes=settings.local_cache_bytes,
        device=settings.local_device,
        models_dir=settings.local_models_dir,
    )
    return registry_for(load_catalog(settings.catalog_file), local)


# Allocations between two collections of young objects, for a long-running server (Python's
# default is 700).
GC_YOUNG_THRESHOLD = 20_000


def settle_for_serving() -> None:
    """Once a server has started: what startup made (modules, schemas, the app, the catalog)
    lives as long as the process, so it is frozen out of the garbage collector's passes,
    and young objects are collected less often. Otherwise every full collection walks all
    of it: with 500 executions in flight that paused the event loop for up to 0.16 s, and
    collections took about 5 % of its time."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
