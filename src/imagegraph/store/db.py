"""The database handle: short synchronous transactions, called from async code with
`await db.run(fn, ...)`, never held across I/O to a provider.

Where `fn` runs depends on the backend:
- PostgreSQL, and SQLite with `synchronous=FULL` (a commit waits for fsync): in a DB thread,
  so the event loop never waits on the network or the disk;
- SQLite with `synchronous=NORMAL` (the default): right on the calling thread. A commit then
  writes to the WAL without waiting for the disk and takes tens of microseconds, less than
  handing work to a thread and back. Automatic checkpoints (which do fsync) are turned off
  for these connections and run from a background thread instead.

On SQLite, writes are serialized inside the process and begin with `BEGIN IMMEDIATE`, so
writers queue on a lock instead of spinning in SQLite's busy handler; WAL lets readers
proceed meanwhile. On PostgreSQL the same code runs without the lock and relies on row locks
(`FOR UPDATE`, `SKIP LOCKED`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

import stamina
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

T = TypeVar("T")
PS = ParamSpec("PS")


class Database:
    """A SQLAlchemy engine plus the thread pool its transactions run on.

    >>> db = Database("sqlite://", threads=1)
    >>> with db.write() as conn:
    ...     _ = conn.exec_driver_sql("create table t (x int)")
    >>> db.close()
    """

    def __init__(
        self,
        url: str,
        *,
        threads: int = 4,
        sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        echo: bool = False,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url not in ("sqlite://", "sqlite:///:memory:"):
                kwargs["pool_size"] = threads + 4
                kwargs["max_overflow"] = 8
        else:
            kwargs["pool_size"] = threads + 4
            kwargs["max_overflow"] = 16
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine, sqlite_synchronous)
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="imagegraph-db")
        self.inline = self.is_sqlite and sqlite_synchronous == "NORMAL"
        self._checkpointer: _Checkpointer | None = None
        if self.inline and _is_file_database(url):
            self._checkpointer = _Checkpointer(self.engine)
        # Inline, each thread keeps one connection instead of checking one out of the pool
        # for every transaction.
        self._local = threading.local()
        self._held: list[Connection] = []

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction; commits on exit, rolls back on error."""
        with self._write_lock, self._connection() as conn:
            conn.info["imagegraph_write"] = True
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.info["imagegraph_write"] = False

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot."""
        with self._connection() as conn, conn.begin():
            yield conn

    def _connection(self) -> contextlib.AbstractContextManager[Connection]:
        if not self.inline:
            return self.engine.connect()
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.engine.connect()
            self._local.conn = conn
            self._held.append(conn)
        elif conn.in_transaction():
            return self.engine.connect()  # a read inside another transaction on this thread
        return contextlib.nullcontext(conn)

    async def run(self, fn: Callable[PS, T], *args: PS.args, **kwargs: PS.kwargs) -> T:
        """Run a function that opens its own transactions (see the module docstring for where).

        PostgreSQL may abort one of two transactions that lock rows in opposite orders
        (deadlock) or that cannot be serialized; the function then runs again. Every `fn` is
        one transaction, so after the rollback running it again is safe.
        """
        if self.inline:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        async for attempt in stamina.retry_context(
            on=_transient, attempts=5, timeout=10.0, wait_initial=0.005, wait_max=0.2
        ):
            with attempt:
                return await loop.run_in_executor(self._executor, call)
        raise AssertionError("unreachable: the last attempt raises")

    def close(self) -> None:
        for conn in self._held:
            conn.close()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's begin() decide when a transaction starts (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA cache_size=-32000")
        if synchronous == "NORMAL":
            cursor.execute("PRAGMA wal_autocheckpoint=0")  # see _Checkpointer
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: this runs for every transaction.
        driver: Any = conn.connection.driver_connection
        driver.execute("BEGIN IMMEDIATE" if conn.info.get("imagegraph_write") else "BEGIN")


# SQLSTATEs after which PostgreSQL asks the client to retry the transaction.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


def _transient(exc: Exception) -> bool:
    return isinstance(exc, OperationalError) and (
        getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES
    )


def _is_file_database(url: str) -> bool:
    return url not in ("sqlite://", "sqlite:///:memory:")


class _Checkpointer:
    """Copies the WAL back into the database file from a background thread, so commits on
    the event loop never pay for it. PASSIVE checkpoints never block readers or writers."""

    INTERVAL_SECONDS = 1.0

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="imagegraph-checkpoint", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.wait(self.INTERVAL_SECONDS):
            self._checkpoint("PASSIVE")

    def _checkpoint(self, mode: str) -> None:
        try:
            # The raw connection: outside any transaction, as a checkpoint must be.
            connection = self._engine.raw_connection()
            try:
                driver: Any = connection.driver_connection
                driver.execute(f"PRAGMA wal_checkpoint({mode})")
            finally:
                connection.close()
        except Exception:  # a checkpoint is an optimisation; the next one will catch up
            logging.getLogger("imagegraph.db").warning("WAL checkpoint failed", exc_info=True)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._checkpoint("TRUNCATE")
