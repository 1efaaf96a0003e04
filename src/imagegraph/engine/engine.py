"""The engine of one process: queue executions, cancel them, wait for them.

`Engine` is what the API and the CLI talk to. It validates before anything is queued,
records the execution in one transaction (so a 201 means the work is committed), and owns
the worker that runs node runs in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from imagegraph.blobs import BlobStore
from imagegraph.engine import queries, transitions
from imagegraph.engine.events import Event, EventBus, Subscription
from imagegraph.engine.inputs import apply_execution_inputs, sandboxed
from imagegraph.engine.states import TERMINAL_EXECUTION, ExecutionStatus
from imagegraph.engine.transitions import IdempotentResponse, InsufficientCredits
from imagegraph.engine.worker import Worker
from imagegraph.errors import ImagegraphError, InvalidInput, Issue, NotFound, PaymentRequired
from imagegraph.graph.model import WorkflowDoc
from imagegraph.graph.plan import Plan
from imagegraph.graph.validate import validate_workflow
from imagegraph.ids import new_id
from imagegraph.keys import Mode
from imagegraph.netguard import SafeFetcher
from imagegraph.nodes.base import NodeRegistry
from imagegraph.providers.base import Route
from imagegraph.providers.hub import ProviderHub
from imagegraph.settings import Settings
from imagegraph.store import assets as asset_store
from imagegraph.store.db import Database
from imagegraph.store.tables import DEFAULT_WORKSPACE

log = logging.getLogger("imagegraph.engine")


def utcnow() -> datetime:
    return datetime.now(UTC)


class IdempotencyKeyTaken(Exception):
    """The execution's Idempotency-Key was claimed by an earlier request; nothing was done."""


def prices(plan: Plan, mode: Mode) -> dict[str, float]:
    """What each node of the plan costs to run, in credits (nothing for test keys)."""
    if mode == "test":
        return {}
    found = {pnode.id: float(pnode.node.price(pnode.params)) for pnode in plan.nodes.values()}
    return {node_id: price for node_id, price in found.items() if price}


class Engine:
    """Queue, cancel and await executions; run them with an embedded worker.

    engine = Engine(settings, db, blobs, builtin_registry())
    await engine.start()
    execution_id = await engine.submit(doc, inputs={"Prompt": "a fox"})
    status = await engine.wait(execution_id, max_wait=30)  # ExecutionStatus.COMPLETED
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        registry: NodeRegistry,
        *,
        run_worker: bool = True,
        providers: ProviderHub | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.registry = registry
        self.providers = providers
        self.bus = EventBus()
        self.fetcher = SafeFetcher(
            allow_private=settings.allow_private_urls, max_bytes=settings.max_download_bytes
        )
        self.worker: Worker | None = (
            Worker(
                settings=settings,
                db=db,
                blobs=blobs,
                registry=registry,
                bus=self.bus,
                fetcher=self.fetcher,
                providers=providers,
            )
            if run_worker
            else None
        )
        # Executions someone is waiting for (`wait`), with their waiters' subscriptions.
        self._waited: dict[str, set[Subscription]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.bus.bind(asyncio.get_running_loop())
        if self.worker is not None:
            await self.worker.start()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()
        await self.fetcher.aclose()

    def plan(
        self,
        doc: WorkflowDoc,
        inputs: Mapping[str, Any] | None = None,
        overrides: Sequence[Mapping[str, Any]] | None = None,
        mode: Mode = "live",
    ) -> tuple[WorkflowDoc, Plan]:
        """The graph an execution would run, validated; raises listing every problem.
        In test mode every generation runs on the sandbox."""
        graph = apply_execution_inputs(doc, self.registry, inputs, overrides)
        if mode == "test":
            graph = sandboxed(graph, self.registry)
        return graph, validate_workflow(graph, self.registry, self.settings.max_graph_nodes)

    async def submit(
        self,
        doc: WorkflowDoc,
        *,
        workspace_id: str = DEFAULT_WORKSPACE,
        mode: Mode = "live",
        workflow_id: str | None = None,
        workflow_version: int | None = None,
        inputs: Mapping[str, Any] | None = None,
        overrides: Sequence[Mapping[str, Any]] | None = None,
        webhook_url: str | None = None,
        execution_id: str | None = None,
        idempotency: IdempotentResponse | None = None,
    ) -> str:
        """Validate, price and queue an execution; returns its id once it is committed.

        Raises PaymentRequired (with the price of each node) when the workspace's credits
        do not cover it, and IdempotencyKeyTaken when `idempotency.key` was used already.
        """
        graph, plan = self.plan(doc, inputs, overrides, mode)
        await self._preflight(plan, workspace_id)
        execution_id = execution_id or new_id("exec")
        costs = prices(plan, mode)
        worker = self.worker
        lease = worker.reserve(len(plan.sources)) if worker is not None else None
        try:
            events, claims, backlog = await self.db.run(
                transitions.create_execution,
                self.db,
                execution_id=execution_id,
                workspace_id=workspace_id,
                workflow_id=workflow_id,
                workflow_version=workflow_version,
                graph=graph.to_json(),
                inputs=dict(inputs or {}),
                plan=plan,
                now=utcnow(),
                mode=mode,
                prices=costs,
                webhook_url=webhook_url,
                idempotency=idempotency,
                lease=lease,
            )
        except InsufficientCredits as exc:
            raise _payment_required(plan, costs, exc.available) from None
        except IntegrityError:
            if idempotency is None:
                raise
            raise IdempotencyKeyTaken(idempotency.key) from None
        finally:
            if worker is not None and lease is not None:
                worker.release(lease)
        self.bus.publish(events)
        if worker is not None:
            # Source nodes (or the runs settled sources feed) were claimed in the same
            # transaction: start them now, with the plan already in hand; anything not
            # claimed here the claim loop picks up.
            worker.adopt(claims, plan, workspace_id, mode)
            if not claims or backlog:
                worker.note_backlog()
        return execution_id

    async def _preflight(self, plan: Plan, workspace_id: str) -> None:
        """Checks that need I/O: referenced assets exist, URLs pass the outbound rules."""
        issues: list[Issue] = []
        wanted: dict[str, tuple[str, str]] = {}
        for pnode in plan.nodes.values():
            problem = pnode.node.unavailable()
            if problem is None and pnode.node.routes:
                problem = self._unserved(pnode.type, pnode.node.routes)
            if problem is not None:
                issues.append(
                    Issue(
                        "node_unavailable",
                        f"node {pnode.id}: {problem}",
                        node_id=pnode.id,
                        field="data.nodeType",
                    )
                )
            for field, asset_id in pnode.node.asset_refs(pnode.params).items():
                wanted[asset_id] = (pnode.id, field)
            for field, url in pnode.node.url_refs(pnode.params).items():
                try:
                    await self.fetcher.check(url)
                except ImagegraphError as exc:
                    issues.append(
                        Issue(
                            exc.code,
                            f"node {pnode.id}: {exc.message}",
                            node_id=pnode.id,
                            field=field,
                        )
                    )
        if wanted:
            found = await self.db.run(asset_store.existing_ids, self.db, workspace_id, list(wanted))
            for asset_id, (node_id, field) in wanted.items():
                if asset_id not in found:
                    issues.append(
                        Issue(
                            "asset_not_found",
                            f"node {node_id}: asset {asset_id} does not exist",
                            node_id=node_id,
                            field=field,
                        )
                    )
        if issues:
            raise InvalidInput(f"execution request is invalid: {issues[0].message}", issues)

    def _unserved(self, node_type: str, routes: Sequence[Route]) -> str | None:
        """Why no route of a hosted model could serve it here (no provider configured)."""
        hub = self.providers
        if hub is None:
            return f"{node_type} needs a hosted-model provider, which this process lacks"
        if any(hub.configured(route.provider) for route in routes):
            return None
        return hub.unconfigured_message(node_type, routes) + " (a test key runs it on the sandbox)"

    async def cancel(self, execution_id: str, workspace_id: str = DEFAULT_WORKSPACE) -> None:
        events = await self.db.run(
            transitions.cancel_execution, self.db, workspace_id, execution_id, utcnow()
        )
        self.bus.publish(events)
        if self.worker is not None:
            self.worker.cancel_local(execution_id)

    async def wait(
        self,
        execution_id: str,
        max_wait: float | None = None,
        workspace_id: str = DEFAULT_WORKSPACE,
    ) -> ExecutionStatus:
        """Wait until the execution ends (or `max_wait` seconds pass); returns its status then."""
        with self.bus.subscribe(execution_id) as subscription, self._waiting(subscription):
            status = await self.db.run(
                queries.execution_status, self.db, workspace_id, execution_id
            )
            if status is None:
                raise NotFound(f"execution {execution_id} does not exist")
            loop = asyncio.get_running_loop()
            deadline = None if max_wait is None else loop.time() + max_wait
            while status not in TERMINAL_EXECUTION:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        event = await subscription.queue.get()
                except TimeoutError:
                    break
                if event.terminal:
                    status = ExecutionStatus(event.data["status"])
            if status not in TERMINAL_EXECUTION:  # out of time: as it is now
                status = (
                    await self.db.run(queries.execution_status, self.db, workspace_id, execution_id)
                    or status
                )
            return status

    @contextlib.contextmanager
    def _waiting(self, subscription: Subscription) -> Iterator[None]:
        """Count `subscription` among those the sweep (`_sweep`) looks after."""
        execution_id = subscription.execution_id
        self._waited.setdefault(execution_id, set()).add(subscription)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="imagegraph-wait-sweep")
        try:
            yield
        finally:
            waiting = self._waited.get(execution_id)
            if waiting is not None:
                waiting.discard(subscription)
                if not waiting:
                    del self._waited[execution_id]

    async def _sweep(self) -> None:
        """Another process may end an execution waited for here (its events do not reach
        this bus): every poll interval, one read of all of them tells their waiters."""
        while self._waited:
            await asyncio.sleep(self.settings.poll_interval_seconds)
            waited = list(self._waited)
            try:
                ended = await self.db.run(queries.ended_among, self.db, waited)
            except Exception:
                log.exception("looking for ended executions failed; trying again")
                continue
            now = datetime.now(UTC)
            for execution_id, status in ended.items():
                notice = Event(
                    None,
                    execution_id,
                    f"execution.{status.value.lower()}",
                    None,
                    {"status": status.value},
                    now,
                    recorded=False,
                )
                for subscription in self._waited.get(execution_id, ()):
                    subscription.offer(notice)


def _payment_required(plan: Plan, costs: Mapping[str, float], available: float) -> PaymentRequired:
    required = round(sum(costs.values()), 6)
    breakdown = [
        {"nodeId": node_id, "nodeType": plan.nodes[node_id].type, "credits": costs[node_id]}
        for node_id in plan.nodes  # in the order of the document
        if node_id in costs
    ]
    return PaymentRequired(
        f"this execution costs {required:g} credits and the workspace has {available:g} available",
        requiredCredits=required,
        availableCredits=available,
        nodes=breakdown,
    )
