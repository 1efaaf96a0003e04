"""Running batches: accept one, keep its executions flowing, stop or retry it.

A batch's items wait in `batch_items` as PENDING. The dispatcher turns them into executions
while the batch has free slots (its `concurrency`): one transaction marks each item
RUNNING with its execution and records that execution, so an item is never started twice
and never lost, whatever happens to the process. The transaction that ends an execution
records its item's outcome and the batch's counters (`store.batches.item_ended`); the
dispatcher wakes on every execution end and tops the batch up. On start it picks up every
batch still RUNNING: that is all resuming takes, since unfinished executions resume on
their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from imagegraph.batches.expand import (
    BatchOptions,
    Columns,
    Item,
    Variant,
    batch_overrides,
    expand,
)
from imagegraph.engine.engine import Engine, prices
from imagegraph.engine.events import Event
from imagegraph.engine.transitions import (
    Claim,
    InsufficientCredits,
    Lease,
    NewExecution,
    Txn,
    add_execution,
)
from imagegraph.errors import InvalidInput, Issue, PaymentRequired
from imagegraph.graph.model import WorkflowDoc, parse_workflow
from imagegraph.graph.plan import Plan
from imagegraph.ids import new_id
from imagegraph.keys import Mode
from imagegraph.store import batches as store
from imagegraph.store import workflows as workflow_store
from imagegraph.store.batches import BatchStatus
from imagegraph.store.db import Database
from imagegraph.store.tables import negative_prompts, workspaces

log = logging.getLogger("imagegraph.batches")

# How many items one dispatch transaction starts at most (a big batch's first items start a
# chunk at a time, each while the next is planned), and how often batches are looked at when
# nothing wakes the dispatcher (items ended by another process).
DISPATCH_CHUNK = 16
TICK_SECONDS = 1.0
WAKE_PAUSE_SECONDS = 0.05
MAX_ISSUES = 20

LoadWorkflow = Callable[[str, str, int | None], Awaitable[tuple[int, WorkflowDoc]]]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Prepared:
    """What dispatching a batch's items needs, worked out once per batch."""

    workspace_id: str
    mode: Mode
    workflow_id: str
    version: int
    doc: WorkflowDoc
    options: BatchOptions
    columns: Columns
    variants: dict[str, Variant]
    negative: str
    webhook_url: str | None


@dataclass
class _Dispatched:
    events: list[Event] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    started: int = 0
    backlog: int = 0  # runnable runs the lease had no room for


class Batches:
    """Create, run, cancel and retry batches (the API and the CLI both use this).

    batches = Batches(db, engine, runtime.workflow_version)
    await batches.start()
    batch_id = await batches.create("ws_default", "live", options, items)
    """

    def __init__(self, db: Database, engine: Engine, load_workflow: LoadWorkflow) -> None:
        self.db = db
        self.engine = engine
        self._load_workflow = load_workflow
        self._active: set[str] = set()
        self._prepared: dict[str, _Prepared] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._active.update(await self.db.run(store.active_batches, self.db))
        if self._active:
            log.info("resuming %d running batches", len(self._active))
        self.engine.bus.on_end(lambda _event: self._wake.set())
        if self.engine.worker is not None:
            self.engine.worker.follow_up = self
        self._task = asyncio.create_task(self._loop(), name="imagegraph-batches")
        self._wake.set()

    async def stop(self) -> None:
        if self.engine.worker is not None and self.engine.worker.follow_up is self:
            self.engine.worker.follow_up = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self, batch_id: str | None = None) -> None:
        if batch_id is not None:
            self._active.add(batch_id)
        self._wake.set()

    # -- requests ---------------------------------------------------------------------------

    async def create(
        self,
        workspace_id: str,
        mode: Mode,
        options: BatchOptions,
        items: Sequence[Item],
    ) -> str:
        """Check every item, then record the batch and all its items in one transaction.
        Raises InvalidInput naming each bad item (nothing is queued then), PaymentRequired
        when the workspace's credits do not cover the batch."""
        version, doc = await self._load_workflow(
            workspace_id, options.workflow_id, options.workflow_version
        )
        columns = Columns(doc, self.engine.registry, batch_overrides(options))
        runs = expand(items, options, columns)
        negative = await self.db.run(
            _negative_text, self.db, workspace_id, options.negative_prompts
        )
        prepared = _Prepared(
            workspace_id,
            mode,
            options.workflow_id,
            version,
            doc,
            options,
            columns,
            {v.name: v for v in options.variants},
            negative,
            options.webhook_url,
        )
        where = {index: item.where for index, item in enumerate(items)}
        # Planning every distinct run checks its values against the node params; in a thread,
        # so a big batch does not stall the event loop.
        price = await asyncio.to_thread(self._check_runs, prepared, runs, where)
        if price > 0:
            available = await self.db.run(_available_credits, self.db, workspace_id)
            if price > available:
                raise PaymentRequired(
                    f"this batch costs up to {price:g} credits and the workspace has "
                    f"{available:g} available",
                    requiredCredits=price,
                    availableCredits=available,
                )
        batch_id = new_id("batch")
        stored = options.model_dump(mode="json", by_alias=True)
        stored["negativeText"] = negative
        await self.db.run(
            store.create_batch,
            self.db,
            {
                "id": batch_id,
                "workspace_id": workspace_id,
                "workflow_id": options.workflow_id,
                "workflow_version": version,
                "name": options.name,
                "mode": mode,
                "status": BatchStatus.RUNNING.value,
                "options": stored,
                "concurrency": options.concurrency,
                "total": len(runs),
                "webhook_url": options.webhook_url,
                "created_at": utcnow(),
            },
            runs,
            dedupe=options.dedupe,
        )
        self._prepared[batch_id] = prepared
        self.wake(batch_id)
        return batch_id

    def _check_runs(
        self, prepared: _Prepared, runs: Sequence[store.NewItem], where: Mapping[int, str]
    ) -> float:
        issues: list[Issue] = []
        total = 0.0
        seen: set[str] = set()
        for new in runs:
            if new.dedupe_key in seen and prepared.options.dedupe:
                continue
            seen.add(new.dedupe_key)
            try:
                _graph, plan = self._plan(prepared, new.inputs, new.seed, new.variant)
            except InvalidInput as exc:
                for issue in dict.fromkeys(exc.issues or [Issue(exc.code, exc.message)]):
                    issues.append(
                        Issue(
                            issue.code,
                            f"{where[new.item_index]}: {issue.message}",
                            node_id=issue.node_id,
                            port=issue.port,
                            field=issue.field,
                        )
                    )
                if len(issues) >= MAX_ISSUES:
                    break
                continue
            total += sum(prices(plan, prepared.mode).values())
        if issues:
            raise InvalidInput(
                f"batch items are invalid: {issues[0].message}; nothing was queued",
                issues[:MAX_ISSUES],
            )
        return round(total, 6)

    def _plan(
        self, prepared: _Prepared, values: Mapping[str, Any], seed: int | None, variant: str
    ) -> tuple[WorkflowDoc, Plan]:
        run = prepared.columns.run(
            {**prepared.options.inputs, **values},
            seed,
            prepared.variants.get(variant),
            prepared.options.nodes,
            prepared.negative,
        )
        return self.engine.plan(prepared.doc, run.inputs, run.overrides, prepared.mode)

    async def cancel(self, workspace_id: str, batch_id: str) -> None:
        """Cancel the pending items and the executions under way."""
        running = await self.db.run(store.cancel_batch, self.db, workspace_id, batch_id, utcnow())
        self._active.discard(batch_id)
        for execution_id in running:
            try:
                await self.engine.cancel(execution_id, workspace_id)
            except Exception as exc:  # it ended meanwhile; its end counted the item
                log.debug("execution %s of batch %s: %s", execution_id, batch_id, exc)

    async def retry_failed(
        self, workspace_id: str, batch_id: str, item_ids: Sequence[int] | None = None
    ) -> int:
        count = await self.db.run(
            store.retry_failed, self.db, workspace_id, batch_id, utcnow(), item_ids
        )
        if count:
            self.wake(batch_id)
        return count

    # -- dispatching ------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(TICK_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass
            # Items ending in this process start the next ones themselves (`after_item`):
            # the dispatcher is for the rest, so ends that come together wake it once.
            await asyncio.sleep(WAKE_PAUSE_SECONDS)
            self._wake.clear()
            for batch_id in sorted(self._active):
                try:
                    await self._top_up(batch_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("dispatching batch %s failed; trying again shortly", batch_id)

    async def _top_up(self, batch_id: str) -> None:
        """Start pending items while the batch has free slots."""
        while True:
            batch, rows = await self.db.run(store.next_items, self.db, batch_id, DISPATCH_CHUNK)
            if batch is None or batch["status"] != BatchStatus.RUNNING.value:
                self._active.discard(batch_id)
                self._prepared.pop(batch_id, None)
                return
            if not rows:
                return
            prepared = await self._prepare(batch)
            planned, invalid = self._plan_items(prepared, batch_id, rows)
            worker = self.engine.worker
            wanted = sum(len(spec.plan.sources) for _, spec in planned)
            lease = worker.reserve(wanted) if worker is not None else None
            try:
                done = await self.db.run(
                    _dispatch, self.db, batch_id, planned, invalid, utcnow(), lease
                )
            finally:
                if worker is not None and lease is not None:
                    worker.release(lease)
            self.engine.bus.publish(done.events)
            if worker is not None:
                worker.adopt_started(done.claims, [spec for _, spec in planned])
                if len(done.claims) < wanted or done.backlog:
                    worker.note_backlog()
            if done.started + len(invalid) < len(rows):
                return
            await asyncio.sleep(0)  # the runs just claimed get going before the next chunk

    def _plan_items(
        self, prepared: _Prepared, batch_id: str, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[list[tuple[int, NewExecution]], list[tuple[int, dict[str, Any]]]]:
        """Each pending item planned as the execution that runs it, or the reason it
        cannot run (its values do not fit the workflow)."""
        planned: list[tuple[int, NewExecution]] = []
        invalid: list[tuple[int, dict[str, Any]]] = []
        for row in rows:
            try:
                graph, plan = self._plan(prepared, row["inputs"], row["seed"], row["variant"])
            except InvalidInput as exc:
                invalid.append((row["id"], _error(exc)))
                continue
            spec = NewExecution(
                execution_id=new_id("exec"),
                workspace_id=prepared.workspace_id,
                workflow_id=prepared.workflow_id,
                workflow_version=prepared.version,
                graph=graph.to_json(),
                inputs=dict(row["inputs"]),
                plan=plan,
                mode=prepared.mode,
                prices=prices(plan, prepared.mode),
                batch_id=batch_id,
                batch_item_id=row["id"],
            )
            planned.append((row["id"], spec))
        return planned, invalid

    def after_item(self, txn: Txn, batch_id: str, free: int) -> None:
        """In the transaction that ended one of the batch's items: start its next ones at
        once, so a slot never waits for the dispatcher (`transitions.BatchFollowUp`). A
        batch this process has not prepared yet is left to the dispatcher."""
        prepared = self._prepared.get(batch_id)
        if prepared is None:
            return
        rows = store.pending_items(txn.conn, batch_id, free)
        planned, invalid = self._plan_items(prepared, batch_id, rows)
        _start_items(txn, batch_id, planned, invalid, free)

    async def _prepare(self, batch: Mapping[Any, Any]) -> _Prepared:
        prepared = self._prepared.get(batch["id"])
        if prepared is None:
            options = BatchOptions.model_validate(
                {k: v for k, v in batch["options"].items() if k != "negativeText"}
            )
            # The version the batch pinned, even if the workflow was deleted since: a batch
            # runs to its end with what it started with.
            version = batch["workflow_version"]
            graph = await self.db.run(
                workflow_store.version_graph, self.db, batch["workflow_id"], version
            )
            doc = parse_workflow(graph)
            prepared = _Prepared(
                batch["workspace_id"],
                batch["mode"],
                batch["workflow_id"],
                version,
                doc,
                options,
                Columns(doc, self.engine.registry, batch_overrides(options)),
                {v.name: v for v in options.variants},
                str(batch["options"].get("negativeText") or ""),
                batch["webhook_url"],
            )
            self._prepared[batch["id"]] = prepared
        return prepared


def _dispatch(
    db: Database,
    batch_id: str,
    planned: Sequence[tuple[int, NewExecution]],
    invalid: Sequence[tuple[int, Mapping[str, Any]]],
    now: datetime,
    lease: Lease | None,
) -> _Dispatched:
    """One transaction: start items (each with its execution) while the batch has room;
    items that cannot start (no credits left, invalid) fail with the reason."""
    done = _Dispatched()
    with db.write() as conn:
        batch = store.lock_batch(conn, batch_id)
        if batch is None or batch.status != BatchStatus.RUNNING.value:
            return done
        txn = Txn(conn, now, lease)
        done.started = _start_items(
            txn, batch_id, planned, invalid, batch.concurrency - batch.running
        )
        done.events = txn.flush()
        done.claims = txn.claims
        done.backlog = txn.backlog
    return done


def _start_items(
    txn: Txn,
    batch_id: str,
    planned: Sequence[tuple[int, NewExecution]],
    invalid: Sequence[tuple[int, Mapping[str, Any]]],
    room: int,
) -> int:
    """In the caller's transaction (holding the batch's row): start up to `room` items,
    each with its execution; items that cannot start (no credits left, invalid) fail with
    the reason. Returns how many started."""
    conn, now = txn.conn, txn.now
    failed = 0
    started = 0
    for item_id, error in invalid:
        failed += store.fail_item(conn, batch_id, item_id, error, now)
    for item_id, spec in planned:
        if started >= room:
            break
        if not store.start_item(conn, item_id, spec.execution_id, now):
            continue
        try:
            add_execution(txn, spec)
        except InsufficientCredits as exc:
            failed += store.fail_item(
                conn,
                batch_id,
                item_id,
                {
                    "code": "insufficient_credits",
                    "message": f"the workspace has {exc.available:g} credits available; "
                    f"this item costs {sum(spec.prices.values()):g}",
                },
                now,
            )
            continue
        started += 1
    store.count_started(conn, batch_id, started, failed, now)
    return started


def _error(exc: InvalidInput) -> dict[str, Any]:
    return {
        "code": exc.code,
        "message": exc.message,
        "issues": [issue.to_json() for issue in exc.issues or []],
    }


def _negative_text(db: Database, workspace_id: str, names: Sequence[str]) -> str:
    """The library's negative prompts named, joined in the order given."""
    if not names:
        return ""
    with db.read() as conn:
        found = dict(
            conn.execute(
                select(negative_prompts.c.name, negative_prompts.c.text).where(
                    negative_prompts.c.workspace_id == workspace_id,
                    negative_prompts.c.name.in_(names),
                )
            ).all()
        )
    missing = [n for n in names if n not in found]
    if missing:
        raise InvalidInput(
            f"negativePrompts: the library has no entry {missing[0]!r}",
            [
                Issue(
                    "unknown_negative_prompt",
                    f"the library has no entry {n!r}",
                    field="negativePrompts",
                )
                for n in missing
            ],
        )
    return ", ".join(found[n].strip() for n in names if found[n].strip())


def _available_credits(db: Database, workspace_id: str) -> float:
    with db.read() as conn:
        row = conn.execute(
            select(workspaces.c.credits_balance, workspaces.c.credits_held).where(
                workspaces.c.id == workspace_id
            )
        ).one()
    return round(float(row.credits_balance - row.credits_held), 6)
