"""Statements executed for every node run, compiled once and run straight on the driver.

SQLAlchemy's per-call work (building parameter lists, setting up a result proxy, firing
events) costs several times what SQLite itself spends on a small statement. `Prepared`
keeps SQLAlchemy for what it does well (compiling the statement for the dialect, the type
processors that turn values into what the driver stores and back) and does only the call
itself by hand, on SQLite. Elsewhere it executes through SQLAlchemy as usual, where the
network round trip dominates anyway.

    CLAIM = Prepared(update(node_runs).where(...).values(...).returning(...))
    row = CLAIM.execute(conn, {"b_id": 7}).first()
"""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import Executable

Processor = Callable[[Any], Any] | None
S = TypeVar("S", bound=Executable)


class Rows:
    """The rows (or row count) of a statement, with the part of SQLAlchemy's Result API the
    engine uses."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


_REQUIRED = object()


@dataclass(frozen=True)
class _Compiled:
    sql: str
    # Per placeholder, in order: parameter name, the value the statement carries for it
    # (a literal) or _REQUIRED, and the type processor (or None).
    binds: tuple[tuple[str, Any, Processor], ...]
    row_type: Any | None  # namedtuple of the columns it returns, if any
    result_processors: tuple[Processor, ...]


class Prepared(Generic[S]):
    """A statement whose SQLite execution skips SQLAlchemy's per-call overhead."""

    def __init__(self, statement: S) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, frozenset[str]], _Compiled] = {}
        self._lock = threading.Lock()

    def execute(
        self, conn: Connection, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> Any:
        """Execute with one parameter mapping (rows come back) or several (executemany)."""
        many = not isinstance(params, Mapping)
        batch: list[Mapping[str, Any]] = list(params) if many else [params]  # type: ignore[list-item, arg-type]
        if conn.dialect.name != "sqlite":
            return conn.execute(self.statement, batch if many else batch[0])
        if not batch:
            return Rows([], 0)
        compiled = self._compile(conn.dialect, batch[0])
        driver: Any = conn.connection.driver_connection
        cursor = driver.cursor()
        try:
            values = [self._positional(compiled, row) for row in batch]
            if many:
                cursor.executemany(compiled.sql, values)
                return Rows([], cursor.rowcount)
            cursor.execute(compiled.sql, values[0])
            fetched = cursor.fetchall() if compiled.row_type is not None else []
            return Rows([self._row(compiled, raw) for raw in fetched], cursor.rowcount)
        finally:
            cursor.close()

    @staticmethod
    def _positional(compiled: _Compiled, row: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        append = out.append
        for name, default, processor in compiled.binds:
            value = row.get(name, default)
            if value is _REQUIRED:
                raise KeyError(f"a value is required for parameter {name!r}")
            append(value if processor is None or value is None else processor(value))
        return out

    def _row(self, compiled: _Compiled, raw: Sequence[Any]) -> Any:
        values = [
            processor(value) if processor is not None and value is not None else value
            for processor, value in zip(compiled.result_processors, raw, strict=True)
        ]
        assert compiled.row_type is not None
        return compiled.row_type(*values)

    def _compile(self, dialect: Dialect, sample: Mapping[str, Any]) -> _Compiled:
        # An INSERT without .values() compiles to the columns the parameters name.
        keys = frozenset(sample) if isinstance(self.statement, Insert) else frozenset()
        key = (dialect.name, keys)
        found = self._compiled.get(key)
        if found is None:
            with self._lock:
                found = self._compiled.get(key) or self._build(dialect, keys)
                self._compiled[key] = found
        return found

    def _build(self, dialect: Dialect, keys: frozenset[str]) -> _Compiled:
        compiler = self.statement.compile(  # type: ignore[attr-defined]
            dialect=dialect, column_keys=sorted(keys) if keys else None
        )
        assert isinstance(compiler, SQLCompiler)
        binds: dict[str, BindParameter[Any]] = {
            name: bind for bind, name in compiler.bind_names.items()
        }
        if any(bind.expanding for bind in binds.values()):
            # SQLAlchemy expands IN lists per call, literal ones included; write `a OR b`.
            raise ValueError("statements with IN lists cannot be prepared")
        plan = tuple(
            (
                name,
                _REQUIRED if binds[name].required else binds[name].effective_value,
                binds[name].type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name in compiler.positiontup or ()
        )
        row_type: Any = None
        result_processors: tuple[Processor, ...] = ()
        described = [
            (column.key, column.type)
            for column in getattr(self.statement, "selected_columns", None) or ()
        ] or [
            (column["name"], column["type"])
            for column in getattr(self.statement, "returning_column_descriptions", None) or ()
        ]
        if described:
            row_type = cast(Any, namedtuple)("Row", [name for name, _ in described])
            result_processors = tuple(
                type_.dialect_impl(dialect).result_processor(dialect, None)
                for _, type_ in described
            )
        return _Compiled(compiler.string, plan, row_type, result_processors)
