"""Usage of a workspace: executions, images and credits, by day and by model.

- executions: created that day;
- images: output images stored that day, by the model that generated them;
- credits: charged for node runs that finished that day, by the model they ran on;
- generations (by model): node runs that ran on the model, cached ones included.

Days are UTC dates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select

from imagegraph.store.db import Database
from imagegraph.store.tables import assets, credit_ledger, executions, node_runs


@dataclass
class Tally:
    executions: int = 0
    images: int = 0
    credits: float = 0.0
    generations: int = 0

    @property
    def cost_per_image(self) -> float | None:
        return round(self.credits / self.images, 6) if self.images else None


@dataclass(frozen=True)
class Usage:
    totals: Tally
    by_day: dict[str, Tally]
    by_model: dict[str | None, Tally]


def _day(column: Any, dialect: str) -> ColumnElement[str]:
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.substr(column, 1, 10)  # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)


def usage(db: Database, workspace_id: str, start: date, end: date) -> Usage:
    """Usage from `start` to `end`, both included."""
    lower = _utc(start)
    upper = _utc(date.fromordinal(end.toordinal() + 1))
    by_day: defaultdict[str, Tally] = defaultdict(Tally)
    by_model: defaultdict[str | None, Tally] = defaultdict(Tally)
    with db.read() as conn:
        dialect = conn.dialect.name
        E, A, R = executions.c, assets.c, node_runs.c
        day = _day(E.created_at, dialect)
        for day_text, count in conn.execute(
            select(day.label("day"), func.count())
            .where(E.workspace_id == workspace_id, E.created_at >= lower, E.created_at < upper)
            .group_by(day)
        ).all():
            by_day[day_text].executions += count
        day = _day(A.created_at, dialect)
        for day_text, model, count in conn.execute(
            select(day.label("day"), A.model, func.count())
            .where(
                A.workspace_id == workspace_id,
                A.kind == "output",
                A.created_at >= lower,
                A.created_at < upper,
            )
            .group_by(day, A.model)
        ).all():
            by_day[day_text].images += count
            by_model[model].images += count
        day = _day(R.finished_at, dialect)
        for day_text, model, count, credits in conn.execute(
            select(day.label("day"), R.model, func.count(), func.coalesce(func.sum(R.credits), 0))
            .join(executions, E.id == R.execution_id)
            .where(
                E.workspace_id == workspace_id,
                R.model.is_not(None),
                R.finished_at >= lower,
                R.finished_at < upper,
            )
            .group_by(day, R.model)
        ).all():
            by_day[day_text].credits += float(credits)
            by_model[model].generations += count
            by_model[model].credits += float(credits)
    totals = Tally(
        executions=sum(t.executions for t in by_day.values()),
        images=sum(t.images for t in by_day.values()),
        credits=round(sum(t.credits for t in by_day.values()), 6),
        generations=sum(t.generations for t in by_model.values()),
    )
    return Usage(totals, dict(sorted(by_day.items())), dict(_by_credits(by_model.items())))


def _by_credits(items: Iterable[tuple[str | None, Tally]]) -> list[tuple[str | None, Tally]]:
    return sorted(items, key=lambda item: (-item[1].credits, item[0] or ""))


def _utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def ledger(db: Database, workspace_id: str, *, limit: int, cursor: int | None = None) -> list[Any]:
    """Credit grants and charges, newest first."""
    L = credit_ledger.c
    with db.read() as conn:
        query = select(credit_ledger).where(L.workspace_id == workspace_id)
        if cursor is not None:
            query = query.where(L.id < cursor)
        return list(conn.execute(query.order_by(L.id.desc()).limit(limit)).all())
