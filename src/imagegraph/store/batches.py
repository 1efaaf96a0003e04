"""Batch records: the batch row with its counters, and its items.

Every change of an item's status changes the batch's counters in the same transaction, so
progress is one row to read and always adds up: `pending + running + completed + failed +
cancelled == total`. An item's execution ending is recorded by `item_ended`, called from the
transaction that ends the execution (`engine.transitions`); the items that dedupe onto it
(`duplicate_of`) take its outcome at the same moment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, RowMapping, and_, bindparam, func, insert, select, update

from imagegraph.errors import Conflict, NotFound
from imagegraph.store import webhooks
from imagegraph.store.db import Database
from imagegraph.store.prepared import Prepared
from imagegraph.store.tables import assets, batch_items, batches, executions

B = batches.c
I = batch_items.c  # noqa: E741


class BatchStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"  # every item ended (some may have failed)
    CANCELLED = "CANCELLED"


class ItemStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# Execution status -> item status and the batch counter it moves to.
_END = {"COMPLETED": ItemStatus.COMPLETED, "FAILED": ItemStatus.FAILED}
_COUNTER = {
    ItemStatus.COMPLETED: "completed",
    ItemStatus.FAILED: "failed",
    ItemStatus.CANCELLED: "cancelled",
}
PENDING_REVIEW = "pending-review"
REVIEW_STATES = ("pending-review", "approved", "rejected")


@dataclass(frozen=True)
class NewItem:
    item_index: int
    variant: str
    run: int
    inputs: Mapping[str, Any]
    seed: int | None
    dedupe_key: str


def create_batch(
    db: Database, batch: Mapping[str, Any], items: Sequence[NewItem], *, dedupe: bool
) -> int:
    """Record a batch and all its items in one transaction; returns how many items share
    the result of an identical earlier item (`dedupe`)."""
    with db.write() as conn:
        conn.execute(insert(batches).values(**batch, pending=len(items)))
        conn.execute(
            insert(batch_items),
            [
                {
                    "batch_id": batch["id"],
                    "item_index": item.item_index,
                    "variant": item.variant,
                    "run": item.run,
                    "inputs": dict(item.inputs),
                    "seed": item.seed,
                    "dedupe_key": item.dedupe_key,
                    "status": ItemStatus.PENDING.value,
                }
                for item in items
            ],
        )
        if not dedupe:
            return 0
        return _link_duplicates(conn, batch["id"])


def _link_duplicates(conn: Connection, batch_id: str) -> int:
    """Point every item whose key an earlier item has at that earlier item."""
    first = (
        select(I.dedupe_key, func.min(I.id).label("first_id"))
        .where(I.batch_id == batch_id)
        .group_by(I.dedupe_key)
        .having(func.count() > 1)
        .subquery()
    )
    pairs = conn.execute(
        select(I.id, first.c.first_id).join(
            first, and_(I.dedupe_key == first.c.dedupe_key, I.id != first.c.first_id)
        )
    ).all()
    if not pairs:
        return 0
    conn.execute(
        update(batch_items)
        .where(I.id == bindparam("b_id"))
        .values(duplicate_of=bindparam("b_first")),
        [{"b_id": item_id, "b_first": first_id} for item_id, first_id in pairs],
    )
    conn.execute(update(batches).where(B.id == batch_id).values(deduplicated=len(pairs)))
    return len(pairs)


def get_batch(db: Database, workspace_id: str, batch_id: str) -> dict[str, Any]:
    with db.read() as conn:
        row = _BATCH.execute(conn, {"b_id": batch_id, "b_ws": workspace_id}).first()
    if row is None:
        raise NotFound(f"batch {batch_id} does not exist")
    found: dict[str, Any] = row._asdict()
    return found


_BATCH = Prepared(
    select(batches).where(B.id == bindparam("b_id"), B.workspace_id == bindparam("b_ws"))
)


def list_batches(
    db: Database, workspace_id: str, *, limit: int, cursor: str | None = None
) -> list[RowMapping]:
    query = select(batches).where(B.workspace_id == workspace_id)
    if cursor:
        query = query.where(B.id < cursor)
    with db.read() as conn:
        return [r._mapping for r in conn.execute(query.order_by(B.id.desc()).limit(limit))]


def active_batches(db: Database) -> list[str]:
    with db.read() as conn:
        return list(
            conn.execute(select(B.id).where(B.status == BatchStatus.RUNNING.value)).scalars()
        )


def next_items(
    db: Database, batch_id: str, limit: int
) -> tuple[RowMapping | None, list[dict[str, Any]]]:
    """The batch, and up to `limit` of its pending items that run themselves (not
    duplicates), in order; fewer when the batch has fewer free slots."""
    with db.read() as conn:
        batch = _BATCH.execute(conn, {"b_id": batch_id}).first()
        if batch is None or batch.status != BatchStatus.RUNNING.value:
            return (None if batch is None else batch._asdict()), []
        free = min(limit, batch.concurrency - batch.running)
        if free <= 0:
            return batch._asdict(), []
        rows = pending_items(conn, batch_id, free)
    return batch._asdict(), rows


def pending_items(conn: Connection, batch_id: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` of the batch's pending items that run themselves (not duplicates), in
    order (in the caller's transaction)."""
    rows = _NEXT.execute(conn, {"b_batch": batch_id, "b_limit": limit}).all()
    return [r._asdict() for r in rows]


# Run for every item a batch starts or ends: prepared (see `Prepared`).
_BATCH = Prepared(select(batches).where(B.id == bindparam("b_id")))
_LOCK_BATCH = Prepared(select(batches).where(B.id == bindparam("b_id")).with_for_update())
_COUNT_STARTED = Prepared(
    update(batches)
    .where(B.id == bindparam("b_id"))
    .values(
        pending=B.pending - bindparam("b_started") - bindparam("b_failed"),
        running=B.running + bindparam("b_started"),
        failed=B.failed + bindparam("b_failed"),
        started_at=func.coalesce(B.started_at, bindparam("b_now")),
    )
)


_NEXT = Prepared(
    select(I.id, I.item_index, I.variant, I.run, I.inputs, I.seed, I.attempts)
    .where(
        I.batch_id == bindparam("b_batch"),
        I.status == ItemStatus.PENDING.value,
        I.duplicate_of.is_(None),
    )
    .order_by(I.id)
    .limit(bindparam("b_limit"))
)


def lock_batch(conn: Connection, batch_id: str) -> Any:
    """The batch row, locked until the transaction ends (PostgreSQL; SQLite writers are
    serialized anyway), so two dispatchers never overfill its concurrency."""
    return _LOCK_BATCH.execute(conn, {"b_id": batch_id}).first()


def start_item(conn: Connection, item_id: int, execution_id: str, now: datetime) -> bool:
    """PENDING -> RUNNING with its execution; False when the item is no longer pending."""
    return bool(
        _START_ITEM.execute(conn, {"b_id": item_id, "b_exec": execution_id, "b_now": now}).rowcount
    )


_START_ITEM = Prepared(
    update(batch_items)
    .where(I.id == bindparam("b_id"), I.status == ItemStatus.PENDING.value)
    .values(
        status=ItemStatus.RUNNING.value,
        execution_id=bindparam("b_exec"),
        started_at=bindparam("b_now"),
        finished_at=None,
        error=None,
        attempts=I.attempts + 1,
    )
)


def fail_item(
    conn: Connection, batch_id: str, item_id: int, error: Mapping[str, Any], now: datetime
) -> int:
    """A pending item that could not be started (its credits, say) fails, with its duplicates.
    Returns how many items failed."""
    ids = [item_id, *_duplicates(conn, batch_id, item_id)]
    conn.execute(
        update(batch_items)
        .where(I.id.in_(ids), I.status.in_([ItemStatus.PENDING.value, ItemStatus.RUNNING.value]))
        .values(status=ItemStatus.FAILED.value, error=dict(error), finished_at=now)
    )
    return len(ids)


def count_started(
    conn: Connection, batch_id: str, started: int, failed: int, now: datetime
) -> None:
    _COUNT_STARTED.execute(
        conn, {"b_id": batch_id, "b_started": started, "b_failed": failed, "b_now": now}
    )
    if failed:
        _maybe_finish(conn, batch_id, now)


def _duplicates(conn: Connection, batch_id: str, item_id: int) -> list[int]:
    return list(
        conn.execute(
            select(I.id).where(I.batch_id == batch_id, I.duplicate_of == item_id)
        ).scalars()
    )


@dataclass(frozen=True)
class ItemEnded:
    batch_id: str
    # Slots the batch has free now for items still pending (0 when none is, or it ended).
    free: int


def item_ended(conn: Connection, execution: Any, now: datetime) -> ItemEnded | None:
    """Record the end of a batch item's execution (in the transaction that ends it); the
    items deduped onto it end the same way, and the batch ends when nothing is left to run.
    None when the item had ended already (a batch cancelled meanwhile, say)."""
    status = _END.get(execution.status, ItemStatus.CANCELLED)
    item = _ITEM_ENDED.execute(
        conn,
        {
            "b_id": execution.batch_item_id,
            "b_exec": execution.id,
            "b_status": status.value,
            "b_error": execution.error,
            "b_credits": execution.credits,
            "b_now": now,
        },
    ).first()
    if item is None:
        return None
    twins = _TWINS_ENDED.execute(
        conn,
        {
            "b_batch": item.batch_id,
            "b_first": execution.batch_item_id,
            "b_status": status.value,
            "b_exec": execution.id,
            "b_error": execution.error,
            "b_started": now,
            "b_now": now,
        },
    ).rowcount
    left = (
        _COUNT_ENDED[status]
        .execute(conn, {"b_id": item.batch_id, "b_twins": twins, "b_credits": execution.credits})
        .one()
    )
    if status is ItemStatus.COMPLETED:
        _REVIEW_OUTPUTS.execute(conn, {"b_exec": execution.id})
    if left.pending or left.running:  # the batch goes on
        running = left.status == BatchStatus.RUNNING.value
        free = left.concurrency - left.running if left.pending and running else 0
        return ItemEnded(item.batch_id, max(0, free))
    _maybe_finish(conn, item.batch_id, now)
    return ItemEnded(item.batch_id, 0)


_ITEM_ENDED = Prepared(
    update(batch_items)
    .where(
        I.id == bindparam("b_id"),
        I.execution_id == bindparam("b_exec"),
        I.status == ItemStatus.RUNNING.value,
    )
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        credits=bindparam("b_credits"),
        finished_at=bindparam("b_now"),
    )
    .returning(I.batch_id)
)
_TWINS_ENDED = Prepared(
    update(batch_items)
    .where(
        I.batch_id == bindparam("b_batch"),
        I.duplicate_of == bindparam("b_first"),
        I.status == ItemStatus.PENDING.value,
    )
    .values(
        status=bindparam("b_status"),
        execution_id=bindparam("b_exec"),
        error=bindparam("b_error"),
        started_at=bindparam("b_started"),
        finished_at=bindparam("b_now"),
    )
)
_COUNT_ENDED = {
    status: Prepared(
        update(batches)
        .where(B.id == bindparam("b_id"))
        .values(
            {
                B.running: B.running - 1,
                B.pending: B.pending - bindparam("b_twins"),
                B[column]: B[column] + 1 + bindparam("b_twins"),
                B.credits: B.credits + bindparam("b_credits"),
            }
        )
        .returning(B.pending, B.running, B.concurrency, B.status)
    )
    for status, column in _COUNTER.items()
}
_REVIEW_OUTPUTS = Prepared(
    update(assets)
    .where(
        assets.c.execution_id == bindparam("b_exec"),
        assets.c.kind == "output",
        assets.c.review_state.is_(None),
    )
    .values(review_state=PENDING_REVIEW)
)
_FINISH = Prepared(
    update(batches)
    .where(
        B.id == bindparam("b_id"),
        B.status == BatchStatus.RUNNING.value,
        B.pending == 0,
        B.running == 0,
    )
    .values(status=BatchStatus.COMPLETED.value, finished_at=bindparam("b_now"))
)


def _maybe_finish(conn: Connection, batch_id: str, now: datetime) -> bool:
    """End the batch if no item is left to run, announcing it (webhooks)."""
    if not _FINISH.execute(conn, {"b_id": batch_id, "b_now": now}).rowcount:
        return False
    _announce(conn, batch_id, "batch.completed", now)
    return True


def _announce(conn: Connection, batch_id: str, kind: str, now: datetime) -> None:
    row = conn.execute(select(batches).where(B.id == batch_id)).one()
    data = {
        "batchId": row.id,
        "workflowId": row.workflow_id,
        "workflowVersion": row.workflow_version,
        "status": row.status,
        "total": row.total,
        "completed": row.completed,
        "failed": row.failed,
        "cancelled": row.cancelled,
        "credits": row.credits,
        "createdAt": row.created_at.isoformat(),
        "finishedAt": row.finished_at.isoformat() if row.finished_at else None,
    }
    webhooks.enqueue(conn, row.workspace_id, kind, data, now, row.webhook_url)


def cancel_batch(db: Database, workspace_id: str, batch_id: str, now: datetime) -> list[str]:
    """Stop a running batch: pending items are cancelled here; returns the executions still
    running, for the caller to cancel (each one's end then counts its item)."""
    with db.write() as conn:
        row = lock_batch(conn, batch_id)
        if row is None or row.workspace_id != workspace_id:
            raise NotFound(f"batch {batch_id} does not exist")
        if row.status != BatchStatus.RUNNING.value:
            raise Conflict(
                f"batch {batch_id} already ended with status {row.status}; "
                "only a RUNNING batch can be cancelled",
                batchStatus=row.status,
            )
        cancelled = conn.execute(
            update(batch_items)
            .where(I.batch_id == batch_id, I.status == ItemStatus.PENDING.value)
            .values(status=ItemStatus.CANCELLED.value, finished_at=now)
        ).rowcount
        running = list(
            conn.execute(
                select(I.execution_id).where(
                    I.batch_id == batch_id, I.status == ItemStatus.RUNNING.value
                )
            ).scalars()
        )
        conn.execute(
            update(batches)
            .where(B.id == batch_id)
            .values(
                status=BatchStatus.CANCELLED.value,
                pending=B.pending - cancelled,
                cancelled=B.cancelled + cancelled,
                finished_at=now,
            )
        )
        _announce(conn, batch_id, "batch.cancelled", now)
    return [e for e in running if e is not None]


def retry_failed(
    db: Database,
    workspace_id: str,
    batch_id: str,
    now: datetime,
    item_ids: Sequence[int] | None = None,
) -> int:
    """Put failed items (all, or those named) back to pending, with the items deduped onto
    them; a batch that had ended runs again. Returns how many items will run again."""
    with db.write() as conn:
        row = lock_batch(conn, batch_id)
        if row is None or row.workspace_id != workspace_id:
            raise NotFound(f"batch {batch_id} does not exist")
        if row.status == BatchStatus.CANCELLED.value:
            raise Conflict(f"batch {batch_id} was cancelled; its items cannot be retried")
        query = select(I.id).where(
            I.batch_id == batch_id,
            I.status == ItemStatus.FAILED.value,
            I.duplicate_of.is_(None),
        )
        if item_ids is not None:
            found = set(
                conn.execute(
                    select(I.id).where(I.batch_id == batch_id, I.id.in_(item_ids))
                ).scalars()
            )
            missing = [i for i in item_ids if i not in found]
            if missing:
                raise NotFound(f"batch {batch_id} has no item {missing[0]}", itemIds=missing)
            query = query.where(I.id.in_(item_ids))
        primaries = list(conn.execute(query).scalars())
        if not primaries:
            return 0
        retried = conn.execute(
            update(batch_items)
            .where(
                I.batch_id == batch_id,
                I.status == ItemStatus.FAILED.value,
                (I.id.in_(primaries)) | (I.duplicate_of.in_(primaries)),
            )
            .values(status=ItemStatus.PENDING.value, finished_at=None)
        ).rowcount
        conn.execute(
            update(batches)
            .where(B.id == batch_id)
            .values(
                status=BatchStatus.RUNNING.value,
                failed=B.failed - retried,
                pending=B.pending + retried,
                finished_at=None,
            )
        )
        return int(retried)


def list_items(
    db: Database,
    batch_id: str,
    *,
    limit: int,
    cursor: int | None = None,
    status: str | None = None,
) -> tuple[list[RowMapping], dict[str, list[RowMapping]]]:
    """A page of items in order, and the output assets of their executions."""
    query = select(batch_items).where(I.batch_id == batch_id)
    if status:
        query = query.where(I.status == status)
    if cursor is not None:
        query = query.where(I.id > cursor)
    with db.read() as conn:
        rows = [r._mapping for r in conn.execute(query.order_by(I.id).limit(limit))]
        outputs = _outputs(conn, {r["execution_id"] for r in rows if r["execution_id"]})
    return rows, outputs


def _outputs(conn: Connection, execution_ids: set[str]) -> dict[str, list[RowMapping]]:
    found: dict[str, list[RowMapping]] = {}
    ids = sorted(execution_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for row in conn.execute(
            select(assets)
            .where(assets.c.execution_id.in_(chunk), assets.c.kind == "output")
            .order_by(assets.c.created_at, assets.c.id)
        ):
            found.setdefault(row.execution_id, []).append(row._mapping)
    return found


def all_items(
    db: Database, batch_id: str
) -> tuple[list[RowMapping], dict[str, list[RowMapping]], dict[str, RowMapping]]:
    """Every item in order, the output assets of their executions, and the executions
    (without their graphs) by id: what a manifest is made of."""
    with db.read() as conn:
        rows = [
            r._mapping
            for r in conn.execute(select(batch_items).where(I.batch_id == batch_id).order_by(I.id))
        ]
        ids = {r["execution_id"] for r in rows if r["execution_id"]}
        outputs = _outputs(conn, ids)
        columns = [c for c in executions.c if c.name not in ("graph", "inputs")]
        runs: dict[str, RowMapping] = {}
        ordered = sorted(ids)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            for row in conn.execute(select(*columns).where(executions.c.id.in_(chunk))):
                runs[row.id] = row._mapping
    return rows, outputs, runs


def review(
    db: Database,
    workspace_id: str,
    batch_id: str,
    state: str,
    now: datetime,
    *,
    item_ids: Sequence[int] | None = None,
    asset_ids: Sequence[str] | None = None,
    current: str | None = None,
    note: str | None = None,
) -> int:
    """Set the review state of a batch's output assets (those of the items or assets named,
    and/or only those now in `current`); returns how many changed."""
    with db.write() as conn:
        row = conn.execute(select(B.workspace_id).where(B.id == batch_id)).first()
        if row is None or row.workspace_id != workspace_id:
            raise NotFound(f"batch {batch_id} does not exist")
        executions_of_batch = select(I.execution_id).where(
            I.batch_id == batch_id, I.execution_id.is_not(None)
        )
        if item_ids is not None:
            executions_of_batch = executions_of_batch.where(I.id.in_(item_ids))
        query = (
            update(assets)
            .where(
                assets.c.workspace_id == workspace_id,
                assets.c.kind == "output",
                assets.c.execution_id.in_(executions_of_batch.scalar_subquery()),
            )
            .values(review_state=state, review_note=note, reviewed_at=now)
        )
        if asset_ids is not None:
            query = query.where(assets.c.id.in_(asset_ids))
        if current is not None:
            query = query.where(assets.c.review_state == current)
        return int(conn.execute(query).rowcount)
