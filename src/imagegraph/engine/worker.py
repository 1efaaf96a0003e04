"""The embedded worker: claims runnable node runs under a lease and executes them.

A node run reaches this worker in one of three ways: claimed in the transaction that created
its execution (source nodes), claimed in the transaction that finished its last predecessor
(so a chain costs one transaction per node), or claimed by the claim loop, which wakes when
something became runnable and every `poll_interval_seconds` for work other processes queued
or retries that came due. Each run is an asyncio task; CPU-heavy image work goes to a thread
pool. The worker renews the leases it holds and returns expired leases of dead workers to the
queue. Everything it knows for sure is in the database; what it keeps in memory (plans,
recent outputs, decoded images) only saves work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image
from pydantic import ValidationError

from imagegraph.blobs import BlobStore
from imagegraph.engine import queries, transitions
from imagegraph.engine.cache import cache_key
from imagegraph.engine.context import RunContext
from imagegraph.engine.events import EventBus
from imagegraph.engine.lru import LRU
from imagegraph.engine.processes import shared_pool
from imagegraph.engine.transitions import (
    BatchFollowUp,
    Claim,
    Completion,
    Failure,
    Finished,
    Lease,
    NewExecution,
    Regeneration,
    Success,
)
from imagegraph.errors import ImagegraphError, NodeError
from imagegraph.graph.model import parse_workflow
from imagegraph.graph.plan import Plan, PlanNode
from imagegraph.graph.validate import validate_workflow
from imagegraph.netguard import SafeFetcher
from imagegraph.nodes.base import (
    EXECUTION_CANCELLED,
    NodeParams,
    NodeRegistry,
    Regenerate,
    RegenerationTarget,
)
from imagegraph.nodes.values import decode_value, encode_value
from imagegraph.providers.hub import ProviderHub
from imagegraph.settings import Settings
from imagegraph.store.db import Database

log = logging.getLogger("imagegraph.worker")

CLAIM_BATCH = 64
# Outcomes recorded together in one transaction at most.
GROUP_COMMIT = 4
# Room a completion reserves beyond its successors, for the first runs of the executions it
# may start (a batch's next items).
FOLLOW_UP_ROOM = 4


def utcnow() -> datetime:
    return datetime.now(UTC)


def _image_weight(image: Image.Image) -> int:
    return image.width * image.height * max(1, len(image.getbands()))


@dataclass
class _InFlight:
    claim: Claim
    task: asyncio.Task[None]


@dataclass(frozen=True)
class _Execution:
    """What running an execution's nodes needs to know about it."""

    plan: Plan
    workspace_id: str
    mode: str


@dataclass
class _Attempt:
    outcome: Success | Failure | Regeneration
    values: Mapping[str, Any] | None = None  # the outputs as Python values, on success


class Worker:
    """Runs node runs for every execution in the database it can claim.

    `owner` identifies this worker in leases: `host:pid:token`, so a restarted server on the
    same host can tell that the previous process is gone and take its runs back at once
    instead of waiting for their leases to expire.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        registry: NodeRegistry,
        bus: EventBus,
        fetcher: SafeFetcher,
        providers: ProviderHub | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.db = db
        self.blobs = blobs
        self.registry = registry
        self.bus = bus
        self.fetcher = fetcher
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._inflight: dict[int, _InFlight] = {}
        self._reserved = 0
        # Set when runnable work may be waiting for a free slot: the claim loop then looks
        # again as soon as a run ends, instead of at its next poll.
        self._backlog = False
        self._finished: list[
            tuple[Finished, Mapping[str, Any] | None, asyncio.Future[Completion]]
        ] = []
        self._flusher: asyncio.Task[None] | None = None
        # Starts a batch's next items in the transaction that ends one (set by the batches).
        self.follow_up: BatchFollowUp | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executions: LRU[str, _Execution] = LRU(max_weight=2048)
        # Recent node outputs as Python values, by execution then node.
        self._outputs: LRU[str, dict[str, Mapping[str, Any]]] = LRU(max_weight=5_000)
        self._images: LRU[str, Image.Image] = LRU(
            max_weight=settings.image_cache_bytes, weigh=_image_weight
        )
        threads = settings.cpu_threads or os.cpu_count() or 2
        self._cpu = ThreadPoolExecutor(threads, thread_name_prefix="imagegraph-cpu")
        # Work with time to spare (run_cpu(urgent=False)) queues here, not ahead of work
        # executions are waiting for.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="imagegraph-background")
        # Work that holds the interpreter lock (see `processes`): shared by every worker of
        # this process, its children ready with the drawing code imported.
        self._processes = (
            shared_pool(settings.cpu_processes, preload=("imagegraph.drawing",))
            if settings.cpu_processes
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.bus.bind(asyncio.get_running_loop())
        if self._processes is not None:
            self._processes.start()  # children boot meanwhile
        await self._recover_dead_owners()
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="imagegraph-claim"),
            asyncio.create_task(self._lease_loop(), name="imagegraph-leases"),
            asyncio.create_task(self._sweep_loop(), name="imagegraph-sweep"),
        ]

    async def stop(self) -> None:
        """Stop claiming, interrupt running nodes and give their runs back to the queue."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)  # finish what ended
        for task in self._tasks:
            task.cancel()
        running = [f.task for f in self._inflight.values()]
        for task in running:
            task.cancel()
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)
        events = await self.db.run(transitions.requeue_runs, self.db, utcnow(), owners=[self.owner])
        self.bus.publish(events)
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self._background.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> int:
        return len(self._inflight)

    def reserve(self, wanted: int = CLAIM_BATCH, finishing: int = 0) -> Lease:
        """Room for up to `wanted` more runs, held until `release`; claims made in one
        transaction never overrun `max_concurrent_nodes`, even with several in flight.
        `finishing` counts runs that end in the same transaction and so free their slots."""
        busy = len(self._inflight) - finishing + self._reserved
        free = self.settings.max_concurrent_nodes - busy
        limit = max(0, min(free, wanted))
        self._reserved += limit
        return Lease(self.owner, self.settings.lease_seconds, limit)

    def release(self, lease: Lease) -> None:
        self._reserved -= lease.limit

    def note_backlog(self) -> None:
        """Runnable work was left in the queue for want of a free slot: claim it as soon as a
        run ends instead of at the next poll."""
        self._backlog = True
        self._wake.set()

    def adopt(
        self,
        claims: Iterable[Claim],
        plan: Plan | None = None,
        workspace_id: str | None = None,
        mode: str = "live",
    ) -> None:
        """Start runs claimed for this worker by a transaction (execution created, or a
        predecessor finished)."""
        for claim in claims:
            if plan is not None and workspace_id is not None:
                self._executions.put(claim.execution_id, _Execution(plan, workspace_id, mode))
            task = asyncio.create_task(self._execute(claim), name=f"node-run-{claim.run_id}")
            self._inflight[claim.run_id] = _InFlight(claim, task)
            # Not in `_execute`'s `finally`: a task cancelled before its first step never
            # enters its body.
            task.add_done_callback(functools.partial(self._ended, claim.run_id))

    def adopt_started(self, claims: Iterable[Claim], started: Iterable[NewExecution]) -> None:
        """Start runs claimed by a transaction that may also have started executions: those
        executions' plans are at hand, so nothing is read back to run them."""
        for spec in started:
            self._executions.put(
                spec.execution_id, _Execution(spec.plan, spec.workspace_id, spec.mode)
            )
        self.adopt(claims)

    def _ended(self, run_id: int, task: asyncio.Task[None]) -> None:
        flight = self._inflight.get(run_id)
        if flight is not None and flight.task is task:  # not a new attempt's
            del self._inflight[run_id]
        if self._backlog:
            self._wake.set()

    def cancel_local(self, execution_id: str) -> None:
        """Interrupt this worker's running nodes of an execution (already CANCELLED in the DB)."""
        for flight in list(self._inflight.values()):
            if flight.claim.execution_id == execution_id:
                flight.task.cancel(EXECUTION_CANCELLED)

    async def _recover_dead_owners(self) -> None:
        owners = await self.db.run(queries.lease_owners, self.db)
        dead = [o for o in owners if _is_dead_local_owner(o, self.owner)]
        if dead:
            events = await self.db.run(transitions.requeue_runs, self.db, utcnow(), owners=dead)
            log.info("requeued %d node runs of stopped workers %s", len(events), dead)
            self.bus.publish(events)

    # -- loops -----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()
            lease = self.reserve()
            claims: list[Claim] = []
            try:
                if lease.limit > 0:
                    claims, events = await self.db.run(
                        transitions.claim,
                        self.db,
                        self.owner,
                        lease.limit,
                        lease.seconds,
                        utcnow(),
                    )
                    self.bus.publish(events)
            except Exception:
                log.exception("claiming node runs failed; retrying shortly")
                await asyncio.sleep(self.settings.poll_interval_seconds)
                continue
            finally:
                self.release(lease)
            self.adopt(claims)
            if lease.limit == 0:
                self._backlog = True  # no free slot: look again when a run ends
            elif len(claims) == lease.limit:
                continue  # there may be more
            else:
                self._backlog = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_seconds):
                    await self._wake.wait()

    async def _lease_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            run_ids = list(self._inflight)
            if not run_ids:
                continue
            try:
                held = await self.db.run(
                    transitions.renew_leases,
                    self.db,
                    self.owner,
                    run_ids,
                    self.settings.lease_seconds,
                    utcnow(),
                )
            except Exception:
                log.exception("renewing leases failed")
                continue
            lost = [run_id for run_id in run_ids if run_id not in held]
            if not lost:
                continue
            try:
                cancelled = await self.db.run(queries.cancelled_runs, self.db, lost)
            except Exception:
                log.exception("looking up lost leases failed")
                cancelled = set()
            for run_id in lost:
                flight = self._inflight.get(run_id)
                if flight is not None:
                    # Cancelled (perhaps by another process), or our lease lapsed and another
                    # worker took the run over: only the first may cancel a provider job.
                    flight.task.cancel(EXECUTION_CANCELLED if run_id in cancelled else None)

    async def _sweep_loop(self) -> None:
        interval = max(1.0, self.settings.lease_seconds / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                events = await self.db.run(
                    transitions.requeue_runs, self.db, utcnow(), expired=True
                )
            except Exception:
                log.exception("returning expired leases failed")
                continue
            if events:
                self.bus.publish(events)
                self.wake()

    # -- one node run ----------------------------------------------------------------------

    async def _execute(self, claim: Claim) -> None:
        try:
            try:
                execution = await self._execution(claim.execution_id)
            except ImagegraphError as exc:
                # The stored graph no longer validates (a node type this version lacks).
                events = await self.db.run(
                    transitions.fail_execution,
                    self.db,
                    claim.execution_id,
                    {"code": exc.code, "message": f"workflow can no longer run: {exc.message}"},
                    utcnow(),
                )
                self.bus.publish(events)
                return
            plan = execution.plan
            attempt = await self._attempt(claim, execution, plan.nodes[claim.node_id])
            if isinstance(attempt.outcome, Regeneration):
                await self._regenerate(claim, execution, attempt.outcome)
                return
            room = len(plan.nodes[claim.node_id].successors) + FOLLOW_UP_ROOM
            lease = self.reserve(room, finishing=1)
            try:
                finished = Finished(
                    claim, plan, attempt.outcome, lease, workspace_id=execution.workspace_id
                )
                await self._record(finished, attempt.values)
            finally:
                self.release(lease)
        except asyncio.CancelledError:
            # Cancelled execution (already recorded) or shutdown (stop() requeues our runs).
            pass
        except Exception:
            log.exception(
                "node run %s of %s could not be recorded", claim.node_id, claim.execution_id
            )

    async def _record(self, finished: Finished, values: Mapping[str, Any] | None) -> Completion:
        """Record an outcome together with the others that arrive in the same turn of the
        event loop: one transaction for all of them (group commit).

        What follows from a commit (publishing its events, starting the runs it claimed)
        happens in the flusher, right after the commit: a run cancelled while it waits here
        must not strand the successors its completion claimed.
        """
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._finished.append((finished, values, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="imagegraph-commit")
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let this turn's other completions join the batch
        while self._finished:
            # A few at a time: what the first ones make runnable starts while the rest are
            # recorded, instead of every one waiting for the longest transaction.
            batch, self._finished = self._finished[:GROUP_COMMIT], self._finished[GROUP_COMMIT:]
            items = [item for item, _, _ in batch]
            try:
                completions = await self.db.run(
                    transitions.complete_many, self.db, self.owner, items, utcnow(), self.follow_up
                )
            except Exception:
                # One bad outcome must not sink the others: record them one by one.
                log.exception("group commit of %d node runs failed; recording each", len(batch))
                for item, values, future in batch:
                    try:
                        [single] = await self.db.run(
                            transitions.complete_many,
                            self.db,
                            self.owner,
                            [item],
                            utcnow(),
                            self.follow_up,
                        )
                    except Exception as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        self._after(item.claim, single, values)
                        if not future.done():
                            future.set_result(single)
                continue
            for (item, values, future), completion in zip(batch, completions, strict=True):
                self._after(item.claim, completion, values)
                if not future.done():
                    future.set_result(completion)
            if self._finished:
                await asyncio.sleep(0)  # the runs just started get going first

    def _after(
        self, claim: Claim, completion: Completion, values: Mapping[str, Any] | None
    ) -> None:
        if not completion.accepted:
            log.info(
                "discarded result of %s/%s: run was cancelled or its lease lost",
                claim.execution_id,
                claim.node_id,
            )
            return
        self.bus.publish(completion.events)
        if values is not None:
            self._remember_outputs(claim.execution_id, claim.node_id, values)
        self.adopt_started(completion.claims, completion.started)
        if completion.queued > len(completion.claims):
            self.note_backlog()  # runnable successors this worker had no room for
        if completion.finished is not None:
            execution_id = claim.execution_id
            self._executions.pop(execution_id)
            self._outputs.pop(execution_id)

    def _remember_outputs(self, execution_id: str, node_id: str, values: Mapping[str, Any]) -> None:
        nodes = self._outputs.get(execution_id)
        if nodes is None:
            nodes = {}
            self._outputs.put(execution_id, nodes)
        nodes[node_id] = values

    async def _execution(self, execution_id: str) -> _Execution:
        execution = self._executions.get(execution_id)
        if execution is None:
            graph, workspace_id, mode = await self.db.run(
                queries.load_execution, self.db, execution_id
            )
            doc = parse_workflow(graph)
            plan = validate_workflow(doc, self.registry, self.settings.max_graph_nodes)
            execution = _Execution(plan, workspace_id, mode)
            self._executions.put(execution_id, execution)
        return execution

    async def _attempt(self, claim: Claim, execution: _Execution, pnode: PlanNode) -> _Attempt:
        started = time.perf_counter()
        node = pnode.node
        key: str | None = None
        try:
            params, params_json = _adjusted(pnode, claim.adjust)
            inputs = await self._inputs(claim.execution_id, execution.plan, pnode)
            if node.is_cacheable(params, inputs):
                key = cache_key(
                    execution.workspace_id, node.type, node.version, params_json, inputs
                )
                hit = await self.db.run(queries.lookup_cache, self.db, key)
                if hit is not None:
                    outcome = Success(
                        outputs=hit,
                        duration_ms=_ms(started),
                        cached=True,
                        cache_key=key,
                        model=node.model(params),
                    )
                    return _Attempt(outcome, {port: decode_value(v) for port, v in hit.items()})
            ctx = RunContext(
                providers=self.providers,
                provider_job=claim.provider_job,
                save_provider_job=lambda job: self._save_provider_job(claim, job),
                workspace_id=execution.workspace_id,
                execution_id=claim.execution_id,
                node_id=claim.node_id,
                node_type=node.type,
                params_json=params_json,
                attempt=claim.attempt,
                db=self.db,
                blobs=self.blobs,
                images=self._images,
                cpu=self._cpu,
                background=self._background,
                processes=self._processes,
                fetcher=self.fetcher,
                bus=self.bus,
                max_pixels=self.settings.max_image_pixels,
                regeneration_target=await self._regeneration_target(claim, execution.plan, pnode),
            )
            try:
                async with asyncio.timeout(self.settings.node_timeout_seconds):
                    outputs = await node.run(ctx, params, inputs)
            except Regenerate as signal:
                return _Attempt(_regeneration(ctx, pnode, signal, started))
            _check_outputs(pnode, outputs)
            outcome = Success(
                outputs={port: encode_value(value) for port, value in outputs.items()},
                duration_ms=_ms(started),
                credits=node.price(params) if execution.mode == "live" else 0.0,
                assets=ctx.new_assets,
                cache_key=key,
                model=node.model(params),
            )
            return _Attempt(outcome, outputs)
        except TimeoutError:
            error = NodeError(
                f"node did not finish within {self.settings.node_timeout_seconds:g} s",
                code="timeout",
            )
            return _Attempt(self._failure(claim, error, started, retryable=True))
        except NodeError as exc:
            return _Attempt(self._failure(claim, exc, started, retryable=exc.retryable))
        except ImagegraphError as exc:
            return _Attempt(self._failure(claim, exc, started, retryable=False))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("node %s (%s) of %s raised", claim.node_id, node.type, claim.execution_id)
            error = NodeError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
            return _Attempt(self._failure(claim, error, started, retryable=False))

    async def _regeneration_target(
        self, claim: Claim, plan: Plan, pnode: PlanNode
    ) -> RegenerationTarget | None:
        """For a node that may send a generation back (a quality gate): how that
        generation's latest run went."""
        target_id = pnode.node.regeneration_target(pnode, plan)
        if target_id is None:
            return None
        regenerations, adjust = await self.db.run(
            queries.regeneration_state, self.db, claim.execution_id, target_id
        )
        target = plan.nodes[target_id]
        return RegenerationTarget(
            node_id=target_id,
            node_type=target.type,
            regenerations=regenerations,
            params={**target.params_json, **(adjust or {})},
            params_model=target.node.params_model,
        )

    async def _regenerate(self, claim: Claim, execution: _Execution, request: Regeneration) -> None:
        """Send a generation back (one transaction), then start what it made runnable."""
        lease = self.reserve(1, finishing=1)
        try:
            completion = await self.db.run(
                transitions.regenerate,
                self.db,
                self.owner,
                claim,
                execution.plan,
                request,
                utcnow(),
                lease,
                workspace_id=execution.workspace_id,
            )
        finally:
            self.release(lease)
        remembered = self._outputs.get(claim.execution_id)
        if remembered is not None:
            for node_id in completion.reset:
                remembered.pop(node_id, None)  # read again: kept, or made anew
        self._after(claim, completion, None)

    async def _save_provider_job(self, claim: Claim, job: Mapping[str, Any]) -> None:
        saved = await self.db.run(
            transitions.save_provider_job, self.db, self.owner, claim, job, utcnow()
        )
        if not saved:
            raise NodeError(
                "this node run was cancelled or taken over by another worker",
                code="lease_lost",
            )

    def _failure(
        self, claim: Claim, exc: ImagegraphError, started: float, *, retryable: bool
    ) -> Failure:
        error: dict[str, Any] = {"code": exc.code, "message": exc.message, "attempt": claim.attempt}
        error.update({k: v for k, v in exc.extra.items() if _jsonable(v)})
        retry_at = None
        provider = exc.extra.get("provider")
        # Each generation a quality gate asked for has attempts of its own.
        max_attempts = self.settings.node_max_attempts * (1 + claim.regenerations)
        if (
            retryable
            and claim.attempt < max_attempts
            and isinstance(provider, str)
            and self.providers is not None
            and not self.providers.budget(provider).allow_retry()
        ):
            # Retries of this provider are over their share of its traffic (an outage):
            # fail now rather than add to the load.
            retryable = False
            error["retryBudgetExhausted"] = True
        if retryable and claim.attempt < max_attempts:
            retry_after = exc.retry_after if isinstance(exc, NodeError) else None
            retry_at = utcnow() + timedelta(seconds=self._backoff(claim.attempt, retry_after))
        carried = None
        if retry_at is not None and exc.extra.get("submitInDoubt"):
            carried = {"provider": provider, "previousAttemptInDoubt": True, "job": None}
        return Failure(
            error=error, duration_ms=_ms(started), retry_at=retry_at, provider_job=carried
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))]. A Retry-After
        replaces it, within the same cap, so no server can park a node indefinitely."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.settings.retry_cap_seconds)
        ceiling = min(
            self.settings.retry_cap_seconds, self.settings.retry_base_seconds * 2 ** (attempt - 1)
        )
        return random.uniform(0, ceiling)

    async def _inputs(self, execution_id: str, plan: Plan, pnode: PlanNode) -> dict[str, Any]:
        outputs: dict[str, Mapping[str, Any]] = {}
        missing = []
        remembered = self._outputs.get(execution_id) or {}
        for pred in pnode.predecessors:
            known = remembered.get(pred)
            if known is None:
                # Outputs that follow from params alone need no reading back.
                source = plan.nodes[pred]
                known = source.node.settled_outputs(source.params)
            if known is None:
                missing.append(pred)
            else:
                outputs[pred] = known
        if missing:
            loaded = await self.db.run(queries.load_outputs, self.db, execution_id, missing)
            for pred, raw in loaded.items():
                decoded = {port: decode_value(v) for port, v in (raw or {}).items()}
                outputs[pred] = decoded
                self._remember_outputs(execution_id, pred, decoded)
        return pnode.input_values(outputs)


def _adjusted(
    pnode: PlanNode, adjust: Mapping[str, Any] | None
) -> tuple[NodeParams, Mapping[str, Any]]:
    """The params a run uses: the node's, with what a quality gate changed merged over them
    (so the cache key and the assets record what really ran)."""
    if not adjust:
        return pnode.params, pnode.params_json
    params_json = {**pnode.params_json, **adjust}
    try:
        params = pnode.node.parse_params(params_json)
    except ValidationError as exc:
        raise NodeError(
            f"params changed by a quality gate are invalid: {exc.errors()[0]['msg']}",
            code="invalid_param",
        ) from None
    return params, params.model_dump(mode="json", by_alias=True)


def _check_outputs(pnode: PlanNode, outputs: Mapping[str, Any]) -> None:
    unknown = set(outputs) - set(pnode.output_types)
    if unknown:
        raise NodeError(
            f"node produced undeclared outputs {sorted(unknown)}", code="internal_error"
        )


def _regeneration(
    ctx: RunContext, pnode: PlanNode, signal: Regenerate, started: float
) -> Regeneration:
    target = ctx.regeneration_target
    if target is None:
        raise NodeError(
            f"{pnode.type} asked to make a generation again but has none", code="internal_error"
        )
    _check_outputs(pnode, signal.outputs)
    duration = _ms(started)
    instead = Success(
        outputs={port: encode_value(value) for port, value in signal.outputs.items()},
        duration_ms=duration,
        assets=ctx.new_assets,
        model=pnode.node.model(pnode.params),
    )
    return Regeneration(
        target=target.node_id,
        seen=target.regenerations,
        adjust=dict(signal.adjust),
        detail=dict(signal.detail),
        instead=instead,
        duration_ms=duration,
    )


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | list | dict | type(None))


def _is_dead_local_owner(owner: str, me: str) -> bool:
    """True when `owner` is a worker of an earlier process on this host that no longer runs."""
    try:
        host, pid_text, _token = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or owner == me:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
