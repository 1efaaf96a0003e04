"""Execution state changes, each one short transaction.

This module is the engine's state machine written in SQL (the statements themselves are in
`engine.statements`). Every function opens and commits its own transaction and returns the
events it recorded, so callers publish exactly what was committed.

Rules it enforces:
- a node run is executed only by the worker holding its lease (claims are guarded UPDATEs;
  `FOR UPDATE SKIP LOCKED` on PostgreSQL);
- the transaction that finishes a node run also decides its successors: runnable when all
  their inputs are settled, SKIPPED when a branch did not route to them, FAILED when
  something upstream failed; and it may claim the runnable ones for the same worker, so a
  chain costs one transaction per node and the work per node depends only on its neighbours;
- an execution ends when its count of unsettled node runs reaches zero;
- a quality gate that sends a generation back resets the runs from it to the gate in one
  transaction: those that had settled count as unsettled again, and those that had been
  charged are held for again, so both rules above still hold;
- credits: creating an execution holds its price from the workspace's balance (or refuses,
  changing nothing); a node run that ends is charged what it actually cost and its hold is
  released; when the execution ends, whatever is still held is released;
- webhooks: the transaction that ends an execution writes the deliveries announcing it (the
  outbox), so a delivery is never lost and never sent for a state that was rolled back;
- an Idempotency-Key is claimed in the transaction that creates the execution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, insert, select, update

from imagegraph.engine import statements as sql
from imagegraph.engine.assets import AssetRecorder
from imagegraph.engine.events import Event
from imagegraph.engine.states import TERMINAL_EXECUTION, TERMINAL_RUN, ExecutionStatus, RunState
from imagegraph.errors import Conflict, NotFound
from imagegraph.graph.plan import Plan, PlanNode
from imagegraph.nodes.values import decode_value, encode_value
from imagegraph.store import batches as batch_store
from imagegraph.store import webhooks as webhook_store
from imagegraph.store.db import Database
from imagegraph.store.tables import (
    executions,
    idempotency_keys,
    node_runs,
    workspaces,
)


@dataclass(frozen=True)
class Claim:
    run_id: int
    execution_id: str
    node_id: str
    node_type: str
    attempt: int
    provider_job: Mapping[str, Any] | None = None
    price: float = 0.0  # held for this run until it is charged
    # How many times a quality gate sent this run back, and the params changed for this
    # generation (a new seed, more steps).
    regenerations: int = 0
    adjust: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class IdempotentResponse:
    """The response an Idempotency-Key replays, stored with the execution it created."""

    key: str
    fingerprint: str
    status_code: int
    headers: Mapping[str, str]
    body: bytes


class InsufficientCredits(Exception):
    """The workspace cannot cover an execution's price; nothing was written."""

    def __init__(self, available: float) -> None:
        super().__init__(f"{available} credits available")
        self.available = available


@dataclass(frozen=True)
class Lease:
    """Who claims runs a transaction makes ready, and how many it may take."""

    owner: str
    seconds: float
    limit: int


@dataclass(frozen=True)
class Success:
    outputs: Mapping[str, Any]
    duration_ms: float
    credits: float = 0.0
    cached: bool = False
    assets: Sequence[Mapping[str, Any]] = ()
    cache_key: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Failure:
    error: Mapping[str, Any]
    duration_ms: float
    retry_at: datetime | None = None
    # What the next attempt is told of this one's provider call (a submit in doubt).
    provider_job: Mapping[str, Any] | None = None


@dataclass
class Completion:
    accepted: bool
    events: list[Event] = field(default_factory=list)
    queued: int = 0
    finished: ExecutionStatus | None = None
    claims: list[Claim] = field(default_factory=list)
    # The runs a quality gate sent back to run again (see `regenerate`).
    reset: tuple[str, ...] = ()
    # Executions this transaction started (a batch's next items), whose runs it may claim.
    started: list[NewExecution] = field(default_factory=list)


class BatchFollowUp(Protocol):
    """Starts a batch's next items in the transaction that ended one of its items."""

    def after_item(self, txn: Txn, batch_id: str, free: int) -> None:
        """The batch has `free` slots now (and items pending): start up to that many, with
        `add_execution(txn, ...)`."""
        ...


class Txn:
    """What one transaction records besides its statements: events, new claims, and the
    executions it started (their plans, for whoever runs them next)."""

    def __init__(
        self,
        conn: Connection,
        now: datetime,
        lease: Lease | None,
        follow_up: BatchFollowUp | None = None,
    ) -> None:
        self.conn = conn
        self.now = now
        self.lease = lease
        self.follow_up = follow_up
        self.rows: list[dict[str, Any]] = []
        self.claims: list[Claim] = []
        self.started: list[NewExecution] = []
        # Runs made runnable that the lease had no room for: the claim loop takes them.
        self.backlog = 0

    def event(self, execution_id: str, type_: str, node_id: str | None = None, **data: Any) -> None:
        self.rows.append(
            {
                "execution_id": execution_id,
                "type": type_,
                "node_id": node_id,
                "data": data,
                "created_at": self.now,
            }
        )

    def try_claim(self, execution_id: str, node_id: str) -> bool:
        """Claim a run this transaction made ready, if the lease has room left."""
        if self.lease is None or len(self.claims) >= self.lease.limit:
            return False
        row = sql.CLAIM_READY.execute(
            self.conn,
            {
                "b_execution": execution_id,
                "b_node": node_id,
                "b_owner": self.lease.owner,
                "b_expires": self.now + timedelta(seconds=self.lease.seconds),
                "b_started": self.now,
                "b_started2": self.now,
            },
        ).first()
        if row is None:
            return False
        claim = _claim(row)
        self.claims.append(claim)
        self.event(
            execution_id, "node.started", node_id, nodeType=claim.node_type, attempt=claim.attempt
        )
        return True

    def flush(self) -> list[Event]:
        """Insert the events; returns them for publishing once the transaction commits."""
        if self.rows:
            sql.INSERT_EVENTS.execute(self.conn, self.rows)
        return self.events()

    def events(self) -> list[Event]:
        return [
            Event(None, r["execution_id"], r["type"], r["node_id"], r["data"], r["created_at"])
            for r in self.rows
        ]


def _claim(row: Any) -> Claim:
    return Claim(
        row.id,
        row.execution_id,
        row.node_id,
        row.node_type,
        row.attempt,
        row.provider_job,
        row.price,
        row.regenerations,
        row.adjust,
    )


@dataclass(frozen=True)
class NewExecution:
    """An execution to record: the graph that runs, planned, and what it is priced at."""

    execution_id: str
    workspace_id: str
    workflow_id: str | None
    workflow_version: int | None
    graph: Mapping[str, Any]
    inputs: Mapping[str, Any]
    plan: Plan
    mode: str = "live"
    prices: Mapping[str, float] = field(default_factory=dict)
    webhook_url: str | None = None
    # The batch item it runs, whose status follows the execution's end.
    batch_id: str | None = None
    batch_item_id: int | None = None


def create_execution(
    db: Database,
    *,
    execution_id: str,
    workspace_id: str,
    workflow_id: str | None,
    workflow_version: int | None,
    graph: Mapping[str, Any],
    inputs: Mapping[str, Any],
    plan: Plan,
    now: datetime,
    mode: str = "live",
    prices: Mapping[str, float] | None = None,
    webhook_url: str | None = None,
    idempotency: IdempotentResponse | None = None,
    lease: Lease | None = None,
) -> tuple[list[Event], list[Claim], int]:
    """Record a new execution and its node runs. Source nodes are runnable at once, and
    claimed right here for `lease.owner` when it has room (saving a claim transaction).
    Returns the events, the claims, and how many runnable runs were left for the claim loop.

    Raises IntegrityError (changing nothing) when `idempotency.key` was claimed already,
    and InsufficientCredits when the workspace cannot cover `prices`.
    """
    spec = NewExecution(
        execution_id=execution_id,
        workspace_id=workspace_id,
        workflow_id=workflow_id,
        workflow_version=workflow_version,
        graph=graph,
        inputs=inputs,
        plan=plan,
        mode=mode,
        prices=prices or {},
        webhook_url=webhook_url,
    )
    with db.write() as conn:
        if idempotency is not None:
            # First, so concurrent twins wait here (PostgreSQL) and fail before other work.
            conn.execute(
                insert(idempotency_keys).values(
                    workspace_id=workspace_id,
                    key=idempotency.key,
                    fingerprint=idempotency.fingerprint,
                    state="done",
                    status_code=idempotency.status_code,
                    response_headers=dict(idempotency.headers),
                    response_body=idempotency.body,
                    created_at=now,
                    locked_at=None,
                )
            )
        txn = Txn(conn, now, lease)
        add_execution(txn, spec)
        return txn.flush(), txn.claims, txn.backlog


def add_execution(txn: Txn, spec: NewExecution) -> None:
    """Record `spec` in the caller's transaction; its source nodes are claimed for
    `txn.lease` when the lease has room for all of them. Then source nodes whose outputs
    follow from their params (`Node.settled_outputs`) are recorded as succeeded right here,
    and the runs they feed are claimed in their place: one node run less to schedule.

    Raises InsufficientCredits, having written nothing, when the workspace cannot cover
    the execution's price."""
    conn, now, plan = txn.conn, txn.now, spec.plan
    txn.started.append(spec)
    sources = set(plan.sources)
    lease = txn.lease
    claiming = lease is not None and lease.limit - len(txn.claims) >= len(sources)
    status = ExecutionStatus.RUNNING if claiming else ExecutionStatus.QUEUED
    settled = _settled_sources(plan) if claiming else {}
    prices = spec.prices
    total = round(sum(prices.values()), 6)
    execution_id = spec.execution_id
    if total > 0:
        _hold(conn, spec.workspace_id, total)
    sql.INSERT_EXECUTION.execute(
        conn,
        {
            "id": execution_id,
            "workspace_id": spec.workspace_id,
            "workflow_id": spec.workflow_id,
            "workflow_version": spec.workflow_version,
            "status": status.value,
            "mode": spec.mode,
            "webhook_url": spec.webhook_url,
            "graph": spec.graph,
            "inputs": spec.inputs,
            "node_count": len(plan.nodes),
            "remaining": len(plan.nodes) - len(settled),
            "credits": 0.0,
            "credits_held": total,
            "created_at": now,
            "started_at": now if claiming else None,
            "batch_id": spec.batch_id,
            "batch_item_id": spec.batch_item_id,
        },
    )
    sql.INSERT_RUNS.execute(
        conn,
        [
            _new_run(execution_id, plan.nodes[node_id], node_id in sources, settled, now, prices)
            for node_id in plan.order
        ],
    )
    txn.event(
        execution_id,
        "execution.queued",
        status=ExecutionStatus.QUEUED.value,
        workflowId=spec.workflow_id,
        workflowVersion=spec.workflow_version,
    )
    if not claiming:
        return
    txn.event(execution_id, "execution.started", status=ExecutionStatus.RUNNING.value)
    for node_id in plan.order:
        if node_id in sources and node_id not in settled:
            txn.try_claim(execution_id, node_id)
    if not settled:
        return
    for node_id, outputs in settled.items():
        node_type = plan.nodes[node_id].type
        txn.event(execution_id, "node.started", node_id, nodeType=node_type, attempt=1)
        txn.event(
            execution_id,
            "node.succeeded",
            node_id,
            nodeType=node_type,
            attempt=1,
            durationMs=0.0,
            cached=False,
            credits=0.0,
            outputs=_brief(outputs),
        )
    states: RunStates = {node_id: (RunState.SUCCEEDED, out) for node_id, out in settled.items()}
    _, skipped = _settle_successors(txn, plan, execution_id, spec.workspace_id, states)
    if skipped:
        _count_down(txn, execution_id, skipped, 0.0)


def _settled_sources(plan: Plan) -> dict[str, dict[str, Any]]:
    """The encoded outputs of the source nodes that are settled when their execution is
    created; none when that would settle every node (an execution ends in a completion)."""
    settled: dict[str, dict[str, Any]] = {}
    for node_id in plan.sources:
        pnode = plan.nodes[node_id]
        outputs = pnode.node.settled_outputs(pnode.params)
        if outputs is not None:
            settled[node_id] = {port: encode_value(value) for port, value in outputs.items()}
    return settled if len(settled) < len(plan.nodes) else {}


def _new_run(
    execution_id: str,
    pnode: PlanNode,
    source: bool,
    settled: Mapping[str, Mapping[str, Any]],
    now: datetime,
    prices: Mapping[str, float],
) -> dict[str, Any]:
    """A node run row of a new execution (every row has the same keys: one statement)."""
    outputs = settled.get(pnode.id)
    done = outputs is not None
    waiting = RunState.QUEUED if source else RunState.PENDING
    state = RunState.SUCCEEDED if done else waiting
    return {
        "execution_id": execution_id,
        "node_id": pnode.id,
        "node_type": pnode.type,
        "state": state.value,
        "attempt": 1 if done else 0,
        "next_attempt_at": now if source and not done else None,
        "started_at": now if done else None,
        "finished_at": now if done else None,
        "duration_ms": 0.0 if done else None,
        "outputs": dict(outputs) if outputs is not None else None,
        "progress": 1.0 if done else None,
        "price": prices.get(pnode.id, 0.0),
    }


def _hold(conn: Connection, workspace_id: str, amount: float) -> None:
    """Set `amount` credits of the workspace aside, if it has them."""
    held = sql.HOLD.execute(conn, {"b_ws": workspace_id, "b_amount": amount}).rowcount
    if not held:
        row = conn.execute(
            select(workspaces.c.credits_balance, workspaces.c.credits_held).where(
                workspaces.c.id == workspace_id
            )
        ).one()
        raise InsufficientCredits(round(row.credits_balance - row.credits_held, 6))


def claim(
    db: Database, owner: str, limit: int, lease_seconds: float, now: datetime
) -> tuple[list[Claim], list[Event]]:
    """Take up to `limit` runnable node runs, oldest first, under a lease held by `owner`."""
    with db.write() as conn:
        rows = sql.CLAIM_RUNNABLE.execute(
            conn,
            {
                "b_now": now,
                "b_limit": limit,
                "b_owner": owner,
                "b_expires": now + timedelta(seconds=lease_seconds),
                "b_started": now,
            },
        ).all()
        if not rows:
            return [], []
        txn = Txn(conn, now, None)
        claims = sorted((_claim(r) for r in rows), key=lambda c: c.run_id)
        started = (
            conn.execute(
                sql.START_EXECUTIONS,
                {"b_ids": sorted({c.execution_id for c in claims}), "b_now": now},
            )
            .scalars()
            .all()
        )
        for execution_id in sorted(started):
            txn.event(execution_id, "execution.started", status=ExecutionStatus.RUNNING.value)
        for c in claims:
            txn.event(
                c.execution_id, "node.started", c.node_id, nodeType=c.node_type, attempt=c.attempt
            )
        return claims, txn.flush()


@dataclass(frozen=True)
class Finished:
    """A claimed node run that has an outcome to record."""

    claim: Claim
    plan: Plan
    outcome: Success | Failure
    lease: Lease | None = None
    # The execution's workspace (whose are the assets of runs settled on the way).
    workspace_id: str = field(kw_only=True)


def complete(
    db: Database,
    owner: str,
    claim: Claim,
    plan: Plan,
    outcome: Success | Failure,
    now: datetime,
    lease: Lease | None = None,
    *,
    workspace_id: str,
) -> Completion:
    """Record the outcome of a claimed node run and settle what follows from it; successors
    that become runnable are claimed for `lease.owner` while it has room.

    Returns `accepted=False`, changing nothing, when the lease is no longer ours (the run was
    cancelled, or its lease expired and another worker took it over).
    """
    finished = Finished(claim, plan, outcome, lease, workspace_id=workspace_id)
    return complete_many(db, owner, [finished], now)[0]


def complete_many(
    db: Database,
    owner: str,
    finished: Sequence[Finished],
    now: datetime,
    follow_up: BatchFollowUp | None = None,
) -> list[Completion]:
    """`complete` for several runs in one transaction (group commit): one BEGIN/COMMIT and
    one insert of events for all of them."""
    with db.write() as conn:
        txns = [Txn(conn, now, item.lease, follow_up) for item in finished]
        completions = [
            _complete(txn, owner, item) for txn, item in zip(txns, finished, strict=True)
        ]
        rows = [row for txn in txns for row in txn.rows]
        if rows:
            sql.INSERT_EVENTS.execute(conn, rows)
        for txn, completion in zip(txns, completions, strict=True):
            completion.events = txn.events()
            completion.started = txn.started
        return completions


def _complete(txn: Txn, owner: str, item: Finished) -> Completion:
    conn = txn.conn
    claim, plan, outcome = item.claim, item.plan, item.outcome
    owned = {"b_id": claim.run_id, "b_owner": owner, "b_attempt": claim.attempt}
    if isinstance(outcome, Failure) and outcome.retry_at is not None:
        done = sql.RETRY_RUN.execute(
            conn,
            {
                **owned,
                "b_retry_at": outcome.retry_at,
                "b_error": dict(outcome.error),
                "b_job": dict(outcome.provider_job) if outcome.provider_job else None,
                "b_duration": outcome.duration_ms,
            },
        ).rowcount
        if not done:
            return Completion(accepted=False)
        txn.event(
            claim.execution_id,
            "node.retrying",
            claim.node_id,
            attempt=claim.attempt,
            error=dict(outcome.error),
            nextAttemptAt=outcome.retry_at.isoformat(),
        )
        return Completion(accepted=True, queued=1)

    succeeded = isinstance(outcome, Success)
    outputs = dict(outcome.outputs) if isinstance(outcome, Success) else None
    done = sql.FINISH_RUN.execute(
        conn,
        {
            **owned,
            "b_state": (RunState.SUCCEEDED if succeeded else RunState.FAILED).value,
            "b_outputs": outputs,
            "b_credits": outcome.credits if isinstance(outcome, Success) else 0.0,
            "b_model": outcome.model if isinstance(outcome, Success) else None,
            "b_cached": outcome.cached if isinstance(outcome, Success) else False,
            "b_error": None if isinstance(outcome, Success) else dict(outcome.error),
            "b_progress": 1.0 if succeeded else None,
            "b_finished": txn.now,
            "b_duration": outcome.duration_ms,
        },
    ).rowcount
    if not done:
        return Completion(accepted=False)

    credits = outcome.credits if isinstance(outcome, Success) else 0.0
    if credits or claim.price:
        _charge(txn, claim, credits, outcome.model if isinstance(outcome, Success) else None)
    if isinstance(outcome, Success):
        if outcome.assets:
            sql.INSERT_ASSETS.execute(conn, [dict(a) for a in outcome.assets])
        if outcome.cache_key is not None and not outcome.cached:
            sql.REMEMBER[conn.dialect.name].execute(
                conn,
                {
                    "key": outcome.cache_key,
                    "node_type": claim.node_type,
                    "outputs": outputs,
                    "created_at": txn.now,
                },
            )
        txn.event(
            claim.execution_id,
            "node.succeeded",
            claim.node_id,
            nodeType=claim.node_type,
            attempt=claim.attempt,
            durationMs=round(outcome.duration_ms, 3),
            cached=outcome.cached,
            credits=outcome.credits,
            outputs=_brief(outputs),
        )
    else:
        txn.event(
            claim.execution_id,
            "node.failed",
            claim.node_id,
            nodeType=claim.node_type,
            attempt=claim.attempt,
            error=dict(outcome.error),
        )

    state = RunState.SUCCEEDED if succeeded else RunState.FAILED
    queued, settled = _settle_successors(
        txn, plan, claim.execution_id, item.workspace_id, {claim.node_id: (state, outputs)}
    )
    finished = _count_down(txn, claim.execution_id, 1 + settled, credits)
    return Completion(accepted=True, queued=queued, finished=finished, claims=txn.claims)


@dataclass(frozen=True)
class Regeneration:
    """A quality gate's outcome: make `target` again with `adjust` merged over its params.

    `seen` is how many times the target had been made again when the gate judged its image.
    Should that have changed meanwhile (another gate sent it back), the gate's image is no
    longer the latest generation's and `instead` is recorded as the gate's outcome.
    `detail` (the attempt, what failed) goes into the `node.regenerating` event.
    """

    target: str
    seen: int
    adjust: Mapping[str, Any]
    detail: Mapping[str, Any]
    instead: Success
    duration_ms: float


def regenerate(
    db: Database,
    owner: str,
    claim: Claim,
    plan: Plan,
    request: Regeneration,
    now: datetime,
    lease: Lease | None = None,
    *,
    workspace_id: str,
) -> Completion:
    """Send a generation back from the quality gate of `claim`, in one transaction.

    Every run on a path from `request.target` to the gate is reset: the target becomes
    runnable at once (claimed for `lease.owner` when it has room) with its regenerations
    counted and `request.adjust` kept for its next run; the others, the gate included, wait
    for their inputs again. Each counts one more regeneration, and loses its outputs unless
    a node off the path takes them (a branch off the path is not run again: it keeps what
    it was given, and a node still waiting there takes the new generation). Runs that had
    settled count as unsettled again, so the execution cannot end before they settle anew;
    paid runs that had been charged are held for again, and when the workspace cannot
    cover that the gate fails instead (`insufficient_credits`).

    Returns `accepted=False`, changing nothing, when the gate's lease is no longer ours.
    """
    with db.write() as conn:
        txn = Txn(conn, now, lease)
        completion = _regenerate(
            txn,
            owner,
            Finished(claim, plan, request.instead, lease, workspace_id=workspace_id),
            request,
        )
        completion.events = txn.flush()
        return completion


def _regenerate(txn: Txn, owner: str, judged: Finished, request: Regeneration) -> Completion:
    """`judged` is the gate's run, with what to record if it sends nothing back after all."""
    conn = txn.conn
    claim, plan = judged.claim, judged.plan
    path = plan.between(request.target, claim.node_id)
    rows = {
        r.node_id: r
        for r in conn.execute(
            sql.REGENERATION_RUNS, {"b_execution": claim.execution_id, "b_nodes": list(path)}
        ).all()
    }
    gate = rows.get(claim.node_id)
    if (
        gate is None
        or gate.state != RunState.RUNNING.value
        or gate.lease_owner != owner
        or gate.attempt != claim.attempt
    ):
        return Completion(accepted=False)
    target = rows.get(request.target)
    if (
        target is None
        or target.state != RunState.SUCCEEDED.value
        or target.regenerations != request.seen
    ):
        return _complete(txn, owner, judged)

    # Runs that were charged are paid for again; the holds of the others are still there.
    held = round(sum(r.price for r in rows.values() if r.state == RunState.SUCCEEDED.value), 6)
    if held > 0:
        try:
            _hold(conn, judged.workspace_id, held)
        except InsufficientCredits as exc:
            message = (
                f"making {request.target} again costs {held:g} credits and the workspace "
                f"has {exc.available:g} available"
            )
            error = {
                "code": "insufficient_credits",
                "message": message,
                "status": 402,
                "requiredCredits": held,
                "availableCredits": exc.available,
                "target": request.target,
                "attempt": claim.attempt,
            }
            failed = Finished(
                claim, plan, Failure(error, request.duration_ms), workspace_id=judged.workspace_id
            )
            return _complete(txn, owner, failed)

    adjust = {**(target.adjust or {}), **request.adjust}
    on_path = set(path)
    settled = 0
    for node_id in path:
        row = rows[node_id]
        runnable = node_id == request.target
        done = conn.execute(
            sql.RESET_RUN,
            {
                "b_id": row.id,
                "b_was": row.state,
                "b_state": (RunState.QUEUED if runnable else RunState.PENDING).value,
                "b_next": txn.now if runnable else None,
                "b_adjust": adjust if runnable else row.adjust,
            },
        ).rowcount
        if not done:  # the rows are locked (SQLite: this is the only writer)
            raise RuntimeError(f"run {node_id} of {claim.execution_id} changed while locked")
        if RunState(row.state) in TERMINAL_RUN:
            settled += 1
    # A node off the path may still read what a reset run gave it: those outputs stay
    # until the next run replaces them.
    cleared = [rows[n].id for n in path if all(s in on_path for s in plan.nodes[n].successors)]
    if cleared:
        conn.execute(sql.CLEAR_OUTPUTS, {"b_ids": cleared})
    conn.execute(
        sql.REOPEN_EXECUTION, {"b_id": claim.execution_id, "b_runs": settled, "b_held": held}
    )
    txn.event(
        claim.execution_id,
        "node.regenerating",
        claim.node_id,
        **{
            **request.detail,
            "nodeType": claim.node_type,
            "target": request.target,
            "regenerations": target.regenerations + 1,
            "adjust": adjust,
            "reset": list(path),
            "creditsHeld": held,
        },
    )
    txn.try_claim(claim.execution_id, request.target)
    return Completion(accepted=True, queued=1, claims=txn.claims, reset=path)


def _charge(txn: Txn, claim: Claim, credits: float, model: str | None) -> None:
    """Charge a finished run what it cost and release what was held for it."""
    conn = txn.conn
    row = sql.CHARGE_EXECUTION.execute(
        conn, {"b_id": claim.execution_id, "b_price": claim.price}
    ).one()
    sql.CHARGE_WORKSPACE.execute(
        conn, {"b_ws": row.workspace_id, "b_credits": credits, "b_price": claim.price}
    )
    if credits:
        sql.INSERT_LEDGER.execute(
            conn,
            {
                "workspace_id": row.workspace_id,
                "kind": "charge",
                "amount": -credits,
                "execution_id": claim.execution_id,
                "node_id": claim.node_id,
                "model": model,
                "note": None,
                "created_at": txn.now,
            },
        )


def _brief(outputs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Outputs for an event: images without their generation record (the run has it)."""
    if outputs is None:
        return None

    def brief(value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") == "image":
            return {k: v for k, v in value.items() if k != "generation"}
        if isinstance(value, dict) and value.get("type") == "image_list":
            return {**value, "items": [brief(item) for item in value.get("items", [])]}
        return value

    return {port: brief(value) for port, value in outputs.items()}


RunStates = dict[str, tuple[RunState, Mapping[str, Any] | None]]


def _settle_successors(
    txn: Txn, plan: Plan, execution_id: str, workspace_id: str, settled_now: RunStates
) -> tuple[int, int]:
    """Decide every successor whose inputs are now all settled, transitively.

    `settled_now` holds the runs this transaction settled, with their states and outputs;
    a successor whose predecessors are all among them is decided without reading anything.
    A runnable successor whose outputs follow at once from its inputs (`Node.settle`)
    succeeds right here instead. Returns (runs made runnable, runs settled without running).
    """
    known: RunStates = dict(settled_now)
    queued = 0
    settled_count = 0
    work = list(settled_now)
    decided: set[str] = set()
    conn = txn.conn
    while work:
        node_id = work.pop(0)
        for succ_id in plan.nodes[node_id].successors:
            if succ_id in decided:
                continue
            succ = plan.nodes[succ_id]
            preds = _predecessor_states(conn, execution_id, succ, known)
            if preds is None:
                continue  # some input is not settled yet; its completion will decide
            decided.add(succ_id)
            decision, detail = decide(succ, preds)
            if decision is RunState.QUEUED and succ.node.settles:
                outputs = _settle_at_once(txn, workspace_id, execution_id, succ, preds)
                if outputs is not None:
                    settled_count += 1
                    known[succ_id] = (RunState.SUCCEEDED, outputs)
                    work.append(succ_id)
                    continue
            if decision is RunState.QUEUED:
                if not txn.try_claim(execution_id, succ_id):
                    if not _settle(txn, execution_id, succ_id, decision, next_at=txn.now):
                        continue
                    txn.backlog += 1
                queued += 1
                continue
            error = detail if decision is RunState.FAILED else None
            if not _settle(txn, execution_id, succ_id, decision, finished=txn.now, error=error):
                continue
            settled_count += 1
            known[succ_id] = (decision, None)
            work.append(succ_id)
            if decision is RunState.FAILED:
                txn.event(execution_id, "node.failed", succ_id, nodeType=succ.type, error=detail)
            else:
                txn.event(
                    execution_id,
                    "node.skipped",
                    succ_id,
                    nodeType=succ.type,
                    reason=detail["message"],
                )
    return queued, settled_count


def _settle_at_once(
    txn: Txn, workspace_id: str, execution_id: str, node: PlanNode, preds: RunStates
) -> dict[str, Any] | None:
    """Record `node` as succeeded with the outputs it settles from its inputs, if it does
    (`Node.settle`), with the assets it recorded; its encoded outputs, or None."""
    values = {
        pred: {port: decode_value(value) for port, value in (outputs or {}).items()}
        for pred, (state, outputs) in preds.items()
        if state is RunState.SUCCEEDED
    }
    recorder = AssetRecorder(workspace_id, execution_id, node.id, node.type, node.params_json)
    settled = node.node.settle(node.params, node.input_values(values), recorder)
    if settled is None or not set(settled) <= set(node.output_types):
        return None
    outputs = {port: encode_value(value) for port, value in settled.items()}
    done = sql.SETTLE_AT_ONCE.execute(
        txn.conn,
        {
            "b_execution": execution_id,
            "b_node": node.id,
            "b_outputs": outputs,
            "b_model": node.node.model(node.params),
            "b_now": txn.now,
            "b_now2": txn.now,
        },
    ).rowcount
    if not done:
        return None
    if recorder.new_assets:
        sql.INSERT_ASSETS.execute(txn.conn, recorder.new_assets)
    txn.event(execution_id, "node.started", node.id, nodeType=node.type, attempt=1)
    txn.event(
        execution_id,
        "node.succeeded",
        node.id,
        nodeType=node.type,
        attempt=1,
        durationMs=0.0,
        cached=False,
        credits=0.0,
        outputs=_brief(outputs),
    )
    return outputs


def _predecessor_states(
    conn: Connection, execution_id: str, node: PlanNode, known: RunStates
) -> RunStates | None:
    """States of `node`'s predecessors if they are all settled (None otherwise)."""
    missing = [p for p in node.predecessors if p not in known]
    if not missing:
        return {p: known[p] for p in node.predecessors}
    if conn.dialect.name == "postgresql":
        # Serialize deciders of the same successor: the second sees the first's commit.
        conn.execute(sql.LOCK_RUN, {"b_execution": execution_id, "b_node": node.id})
    rows = conn.execute(
        sql.RUN_STATES, {"b_execution": execution_id, "b_nodes": [node.id, *missing]}
    ).all()
    states = {r.node_id: (RunState(r.state), r.outputs) for r in rows}
    if states[node.id][0] is not RunState.PENDING:
        return None
    if any(states[p][0] not in TERMINAL_RUN for p in missing):
        return None
    return {p: known[p] if p in known else states[p] for p in node.predecessors}


def _settle(
    txn: Txn,
    execution_id: str,
    node_id: str,
    state: RunState,
    *,
    next_at: datetime | None = None,
    finished: datetime | None = None,
    error: Mapping[str, Any] | None = None,
) -> bool:
    return bool(
        sql.SETTLE_RUN.execute(
            txn.conn,
            {
                "b_execution": execution_id,
                "b_node": node_id,
                "b_state": state.value,
                "b_next": next_at,
                "b_finished": finished,
                "b_error": dict(error) if error is not None else None,
            },
        ).rowcount
    )


def decide(
    node: PlanNode, predecessors: Mapping[str, tuple[RunState, Mapping[str, Any] | None]]
) -> tuple[RunState, dict[str, Any]]:
    """What a node whose predecessors are all settled does next. Pure.

    - any predecessor failed: FAILED (nothing broken is passed on);
    - every required input has a value (an edge from a succeeded node, on a port that node
      produced; a branch produces only the route it took): QUEUED;
    - otherwise the node is only reachable through routes not taken: SKIPPED.
    """
    for pred_id in node.predecessors:
        state, _outputs = predecessors[pred_id]
        if state in (RunState.FAILED, RunState.CANCELLED):
            return RunState.FAILED, {
                "code": "upstream_failed",
                "message": f"upstream node {pred_id} failed",
                "nodeId": pred_id,
            }
    any_live = False
    for port in node.node.input_ports(node.params):
        edges = node.inputs.get(port.name, ())
        live = [e for e in edges if _edge_live(e.source, e.source_port, predecessors)]
        any_live = any_live or bool(live)
        if port.required and not live:
            return RunState.SKIPPED, {"message": f"input {port.name!r} is on a route not taken"}
    if node.predecessors and not any_live:
        return RunState.SKIPPED, {"message": "every input is on a route not taken"}
    return RunState.QUEUED, {}


def _edge_live(
    source: str, port: str, preds: Mapping[str, tuple[RunState, Mapping[str, Any] | None]]
) -> bool:
    state, outputs = preds[source]
    return state is RunState.SUCCEEDED and outputs is not None and port in outputs


def _count_down(
    txn: Txn, execution_id: str, settled: int, credits: float
) -> ExecutionStatus | None:
    conn = txn.conn
    row = sql.COUNT_DOWN.execute(
        conn, {"b_id": execution_id, "b_settled": settled, "b_credits": credits}
    ).one()
    if row.remaining > 0 or ExecutionStatus(row.status) in TERMINAL_EXECUTION:
        return None
    failed = sql.FAILED_RUNS.execute(conn, {"b_execution": execution_id}).all()
    error = None
    status = ExecutionStatus.COMPLETED
    if failed:
        status = ExecutionStatus.FAILED
        root = next(
            (r for r in failed if (r.error or {}).get("code") != "upstream_failed"), failed[0]
        )
        message = (root.error or {}).get("message", "failed")
        error = {
            "code": "node_failed",
            "message": f"node {root.node_id} ({root.node_type}) failed: {message}",
            "nodeId": root.node_id,
            "nodeError": root.error,
            "failedNodes": [r.node_id for r in failed],
        }
    ended = sql.FINISH_EXECUTION.execute(
        conn,
        {"b_id": execution_id, "b_status": status.value, "b_finished": txn.now, "b_error": error},
    ).one()
    kind = "execution.completed" if status is ExecutionStatus.COMPLETED else "execution.failed"
    txn.event(execution_id, kind, status=status.value, error=error)
    _ended(txn, ended, kind, row.credits_held)
    return status


def _ended(txn: Txn, row: Any, kind: str, held: float) -> None:
    """What every execution end does besides its status: release the credits still held
    for it (`held`), record its batch item's end (and start the batch's next items, when
    the transaction knows how: `txn.follow_up`), and write the webhook deliveries that
    announce it."""
    conn, now = txn.conn, txn.now
    if held:
        sql.RELEASE_HOLD.execute(conn, {"b_ws": row.workspace_id, "b_amount": held})
    if row.batch_item_id is not None:
        ended = batch_store.item_ended(conn, row, now)
        if ended is not None and ended.free > 0 and txn.follow_up is not None:
            txn.follow_up.after_item(txn, ended.batch_id, ended.free)
    data = {
        "executionId": row.id,
        "workflowId": row.workflow_id,
        "workflowVersion": row.workflow_version,
        "status": row.status,
        "credits": row.credits,
        "error": row.error,
        "createdAt": row.created_at.isoformat(),
        "finishedAt": row.finished_at.isoformat() if row.finished_at else None,
    }
    webhook_store.enqueue(conn, row.workspace_id, kind, data, now, row.webhook_url)


def cancel_execution(
    db: Database, workspace_id: str, execution_id: str, now: datetime
) -> list[Event]:
    """Cancel an execution that has not ended; its unsettled node runs become CANCELLED."""
    with db.write() as conn:
        txn = Txn(conn, now, None)
        row = conn.execute(
            select(executions.c.status, executions.c.credits_held).where(
                executions.c.id == execution_id, executions.c.workspace_id == workspace_id
            )
        ).first()
        if row is None:
            raise NotFound(f"execution {execution_id} does not exist")
        status = ExecutionStatus(row.status)
        if status in TERMINAL_EXECUTION:
            raise Conflict(
                f"execution {execution_id} already ended with status {status.value}; "
                "only QUEUED or RUNNING executions can be cancelled",
                executionStatus=status.value,
            )
        _end_unsettled(conn, execution_id, RunState.CANCELLED, now, None)
        ended = conn.execute(
            update(executions)
            .where(executions.c.id == execution_id)
            .values(
                status=ExecutionStatus.CANCELLED.value,
                finished_at=now,
                remaining=0,
                error={"code": "cancelled", "message": "execution was cancelled"},
                credits_held=0.0,
            )
            .returning(*sql.ENDED_COLUMNS)
        ).one()
        txn.event(execution_id, "execution.cancelled", status=ExecutionStatus.CANCELLED.value)
        _ended(txn, ended, "execution.cancelled", row.credits_held)
        return txn.flush()


def fail_execution(
    db: Database, execution_id: str, error: Mapping[str, Any], now: datetime
) -> list[Event]:
    """End an execution that cannot go on; its unsettled node runs fail with `error`."""
    with db.write() as conn:
        txn = Txn(conn, now, None)
        row = conn.execute(
            select(executions.c.status, executions.c.credits_held).where(
                executions.c.id == execution_id
            )
        ).first()
        if row is None or ExecutionStatus(row.status) in TERMINAL_EXECUTION:
            return []
        _end_unsettled(conn, execution_id, RunState.FAILED, now, error)
        ended = conn.execute(
            update(executions)
            .where(executions.c.id == execution_id)
            .values(
                status=ExecutionStatus.FAILED.value,
                finished_at=now,
                remaining=0,
                error=dict(error),
                credits_held=0.0,
            )
            .returning(*sql.ENDED_COLUMNS)
        ).one()
        txn.event(
            execution_id, "execution.failed", status=ExecutionStatus.FAILED.value, error=dict(error)
        )
        _ended(txn, ended, "execution.failed", row.credits_held)
        return txn.flush()


def _end_unsettled(
    conn: Connection,
    execution_id: str,
    state: RunState,
    now: datetime,
    error: Mapping[str, Any] | None,
) -> None:
    conn.execute(
        update(node_runs)
        .where(
            node_runs.c.execution_id == execution_id,
            node_runs.c.state.in_(
                [RunState.PENDING.value, RunState.QUEUED.value, RunState.RUNNING.value]
            ),
        )
        .values(
            state=state.value,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error=dict(error) if error is not None else None,
        )
    )


def save_provider_job(
    db: Database, owner: str, claim: Claim, job: Mapping[str, Any], now: datetime
) -> bool:
    """Record the provider job a claimed run waits for; False if the run is no longer ours
    (cancelled, or its lease lost), in which case nothing is written."""
    with db.write() as conn:
        return bool(
            sql.SAVE_PROVIDER_JOB.execute(
                conn,
                {
                    "b_id": claim.run_id,
                    "b_owner": owner,
                    "b_attempt": claim.attempt,
                    "b_job": dict(job),
                },
            ).rowcount
        )


def renew_leases(
    db: Database, owner: str, run_ids: Sequence[int], lease_seconds: float, now: datetime
) -> set[int]:
    """Extend our leases; returns the runs we still hold (the rest were cancelled or lost)."""
    if not run_ids:
        return set()
    with db.write() as conn:
        held = (
            conn.execute(
                sql.RENEW_LEASES,
                {
                    "b_ids": list(run_ids),
                    "b_owner": owner,
                    "b_expires": now + timedelta(seconds=lease_seconds),
                },
            )
            .scalars()
            .all()
        )
        return set(held)


def requeue_runs(
    db: Database, now: datetime, *, expired: bool = False, owners: Sequence[str] = ()
) -> list[Event]:
    """Put RUNNING node runs back in the queue: those whose lease expired, or those held by
    `owners` (workers known to be gone). Their next attempt starts at once."""
    conditions = [node_runs.c.state == RunState.RUNNING.value]
    if expired:
        conditions.append(node_runs.c.lease_expires_at < now)
    elif owners:
        conditions.append(node_runs.c.lease_owner.in_(list(owners)))
    else:
        return []
    with db.write() as conn:
        txn = Txn(conn, now, None)
        rows = conn.execute(
            update(node_runs)
            .where(*conditions)
            .values(
                state=RunState.QUEUED.value,
                next_attempt_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(node_runs.c.execution_id, node_runs.c.node_id, node_runs.c.attempt)
        ).all()
        for r in rows:
            txn.event(
                r.execution_id,
                "node.requeued",
                r.node_id,
                attempt=r.attempt,
                reason="its worker stopped or lost its lease",
            )
        return txn.flush()
