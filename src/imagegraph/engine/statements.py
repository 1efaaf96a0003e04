"""The SQL of the engine's hot path, built once and executed with parameters.

Building a SQLAlchemy statement (coercing every `column == value`, computing its cache key)
costs several times more than executing it; these run for every node of every execution,
so they are module constants with bind parameters (prefixed `b_` so they never clash with
column names). Same statements on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Insert, bindparam, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from imagegraph.engine.states import ExecutionStatus, RunState
from imagegraph.store.prepared import Prepared
from imagegraph.store.tables import (
    assets,
    credit_ledger,
    execution_events,
    executions,
    node_cache,
    node_runs,
    workspaces,
)

R = node_runs.c
E = executions.c
W = workspaces.c

CLAIMED_COLUMNS = (
    R.id,
    R.execution_id,
    R.node_id,
    R.node_type,
    R.attempt,
    R.provider_job,
    R.price,
    R.regenerations,
    R.adjust,
)
# What the end of an execution needs to announce it.
ENDED_COLUMNS = (
    E.id,
    E.workspace_id,
    E.workflow_id,
    E.workflow_version,
    E.status,
    E.credits,
    E.error,
    E.created_at,
    E.finished_at,
    E.webhook_url,
    E.batch_item_id,
)

INSERT_EXECUTION = Prepared(insert(executions))
INSERT_RUNS = Prepared(insert(node_runs))
INSERT_ASSETS = Prepared(insert(assets))
INSERT_EVENTS = Prepared(insert(execution_events))
# Oldest runnable first; on PostgreSQL concurrent workers skip rows another one is taking.
_RUNNABLE = (
    select(R.id)
    .where(R.state == RunState.QUEUED.value, R.next_attempt_at <= bindparam("b_now"))
    .order_by(R.id)
    .limit(bindparam("b_limit"))
    .with_for_update(skip_locked=True)
)
CLAIM_RUNNABLE = Prepared(
    update(node_runs)
    .where(R.id.in_(_RUNNABLE.scalar_subquery()))
    .values(
        state=RunState.RUNNING.value,
        attempt=R.attempt + 1,
        lease_owner=bindparam("b_owner"),
        lease_expires_at=bindparam("b_expires"),
        started_at=bindparam("b_started"),
        progress=None,
    )
    .returning(*CLAIMED_COLUMNS)
)
# Claim one node run that this transaction just found ready (or inserted).
CLAIM_READY = Prepared(
    update(node_runs)
    .where(
        R.execution_id == bindparam("b_execution"),
        R.node_id == bindparam("b_node"),
        or_(R.state == RunState.PENDING.value, R.state == RunState.QUEUED.value),
    )
    .values(
        state=RunState.RUNNING.value,
        attempt=R.attempt + 1,
        lease_owner=bindparam("b_owner"),
        lease_expires_at=bindparam("b_expires"),
        started_at=bindparam("b_started"),
        next_attempt_at=bindparam("b_started2"),
        progress=None,
    )
    .returning(*CLAIMED_COLUMNS)
)
START_EXECUTIONS = (
    update(executions)
    .where(
        E.id.in_(bindparam("b_ids", expanding=True)),
        E.status == ExecutionStatus.QUEUED.value,
    )
    .values(status=ExecutionStatus.RUNNING.value, started_at=bindparam("b_now"))
    .returning(E.id)
)

# The attempt is the fencing token: a worker whose lease lapsed and whose run was claimed
# again (even by itself) can no longer record the old attempt's outcome.
_OWNED = (
    (R.id == bindparam("b_id"))
    & (R.state == RunState.RUNNING.value)
    & (R.lease_owner == bindparam("b_owner"))
    & (R.attempt == bindparam("b_attempt"))
)
FINISH_RUN = Prepared(
    update(node_runs)
    .where(_OWNED)
    .values(
        state=bindparam("b_state"),
        outputs=bindparam("b_outputs"),
        # Added up: a run a quality gate sent back is charged for each generation.
        credits=R.credits + bindparam("b_credits"),
        model=bindparam("b_model"),
        cached=bindparam("b_cached"),
        error=bindparam("b_error"),
        progress=bindparam("b_progress"),
        finished_at=bindparam("b_finished"),
        duration_ms=bindparam("b_duration"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
RETRY_RUN = Prepared(
    update(node_runs)
    .where(_OWNED)
    .values(
        state=RunState.QUEUED.value,
        # The failed attempt's provider job is over: the next attempt starts its own (told
        # only whether the last submit may have gone through).
        provider_job=bindparam("b_job"),
        next_attempt_at=bindparam("b_retry_at"),
        error=bindparam("b_error"),
        duration_ms=bindparam("b_duration"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
# The provider job a run waits for, recorded the moment the provider accepts it.
SAVE_PROVIDER_JOB = Prepared(
    update(node_runs).where(_OWNED).values(provider_job=bindparam("b_job"))
)
RUN_STATES = select(R.node_id, R.state, R.outputs).where(
    R.execution_id == bindparam("b_execution"),
    R.node_id.in_(bindparam("b_nodes", expanding=True)),
)
LOCK_RUN = (
    select(R.id)
    .where(R.execution_id == bindparam("b_execution"), R.node_id == bindparam("b_node"))
    .with_for_update()
)
SETTLE_RUN = Prepared(
    update(node_runs)
    .where(
        R.execution_id == bindparam("b_execution"),
        R.node_id == bindparam("b_node"),
        R.state == RunState.PENDING.value,
    )
    .values(
        state=bindparam("b_state"),
        next_attempt_at=bindparam("b_next"),
        finished_at=bindparam("b_finished"),
        error=bindparam("b_error"),
    )
)
# A run whose outputs follow at once from its inputs (`Node.settle`): succeeded without running.
SETTLE_AT_ONCE = Prepared(
    update(node_runs)
    .where(
        R.execution_id == bindparam("b_execution"),
        R.node_id == bindparam("b_node"),
        or_(R.state == RunState.PENDING.value, R.state == RunState.QUEUED.value),
    )
    .values(
        state=RunState.SUCCEEDED.value,
        attempt=R.attempt + 1,
        outputs=bindparam("b_outputs"),
        model=bindparam("b_model"),
        progress=1.0,
        started_at=bindparam("b_now"),
        finished_at=bindparam("b_now2"),
        duration_ms=0.0,
    )
)
COUNT_DOWN = Prepared(
    update(executions)
    .where(E.id == bindparam("b_id"))
    .values(
        remaining=E.remaining - bindparam("b_settled"),
        credits=E.credits + bindparam("b_credits"),
    )
    .returning(E.remaining, E.status, E.credits_held)
)
FAILED_RUNS = Prepared(
    select(R.node_id, R.node_type, R.error)
    .where(R.execution_id == bindparam("b_execution"), R.state == RunState.FAILED.value)
    .order_by(R.finished_at, R.id)
)
FINISH_EXECUTION = Prepared(
    update(executions)
    .where(E.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        finished_at=bindparam("b_finished"),
        error=bindparam("b_error"),
        credits_held=0.0,
    )
    .returning(*ENDED_COLUMNS)
)
# Credits: a finished run releases its hold and is charged what it cost.
CHARGE_EXECUTION = Prepared(
    update(executions)
    .where(E.id == bindparam("b_id"))
    .values(credits_held=E.credits_held - bindparam("b_price"))
    .returning(E.workspace_id)
)
CHARGE_WORKSPACE = Prepared(
    update(workspaces)
    .where(W.id == bindparam("b_ws"))
    .values(
        credits_balance=W.credits_balance - bindparam("b_credits"),
        credits_held=W.credits_held - bindparam("b_price"),
    )
)
# Set credits aside for an execution, if the workspace has them (rowcount 0: it has not).
HOLD = Prepared(
    update(workspaces)
    .where(
        W.id == bindparam("b_ws"),
        W.credits_balance - W.credits_held >= bindparam("b_amount"),
    )
    .values(credits_held=W.credits_held + bindparam("b_amount"))
)
RELEASE_HOLD = Prepared(
    update(workspaces)
    .where(W.id == bindparam("b_ws"))
    .values(credits_held=W.credits_held - bindparam("b_amount"))
)
INSERT_LEDGER = Prepared(insert(credit_ledger))
RENEW_LEASES = (
    update(node_runs)
    .where(
        R.id.in_(bindparam("b_ids", expanding=True)),
        R.lease_owner == bindparam("b_owner"),
        R.state == RunState.RUNNING.value,
    )
    .values(lease_expires_at=bindparam("b_expires"))
    .returning(R.id)
)
EXECUTION_STATUS = Prepared(
    select(E.status).where(E.id == bindparam("b_id"), E.workspace_id == bindparam("b_ws"))
)
EVENTS_AFTER = Prepared(
    select(execution_events)
    .where(
        execution_events.c.execution_id == bindparam("b_execution"),
        execution_events.c.id > bindparam("b_after"),
    )
    .order_by(execution_events.c.id)
    .limit(bindparam("b_limit"))
)
# A quality gate sends a generation back (transitions.regenerate): the runs from the
# generation to the gate, locked (PostgreSQL) until they are reset.
REGENERATION_RUNS = (
    select(
        R.id,
        R.node_id,
        R.state,
        R.attempt,
        R.lease_owner,
        R.regenerations,
        R.adjust,
        R.price,
    )
    .where(
        R.execution_id == bindparam("b_execution"),
        R.node_id.in_(bindparam("b_nodes", expanding=True)),
    )
    .order_by(R.id)
    .with_for_update()
)
RESET_RUN = (
    update(node_runs)
    .where(R.id == bindparam("b_id"), R.state == bindparam("b_was"))
    .values(
        state=bindparam("b_state"),
        next_attempt_at=bindparam("b_next"),
        regenerations=R.regenerations + 1,
        adjust=bindparam("b_adjust"),
        error=None,
        provider_job=None,
        progress=None,
        cached=False,
        started_at=None,
        finished_at=None,
        duration_ms=None,
        lease_owner=None,
        lease_expires_at=None,
    )
)
CLEAR_OUTPUTS = (
    update(node_runs).where(R.id.in_(bindparam("b_ids", expanding=True))).values(outputs=None)
)
REOPEN_EXECUTION = (
    update(executions)
    .where(E.id == bindparam("b_id"))
    .values(
        remaining=E.remaining + bindparam("b_runs"),
        credits_held=E.credits_held + bindparam("b_held"),
    )
)
LOOKUP_CACHE = Prepared(select(node_cache.c.outputs).where(node_cache.c.key == bindparam("b_key")))


def remember_statement(dialect: str) -> Insert:
    """INSERT into the node cache that does nothing when the key is already there."""
    factory: Any = postgres_insert if dialect == "postgresql" else sqlite_insert
    statement: Insert = factory(node_cache).on_conflict_do_nothing(index_elements=["key"])
    return statement


REMEMBER = {name: Prepared(remember_statement(name)) for name in ("sqlite", "postgresql")}
