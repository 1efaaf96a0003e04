"""`ProcessPool`: work runs in other processes, errors come back, and a process that died
is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from imagegraph.drawing import render, render_png
from imagegraph.engine.processes import ProcessLost, ProcessPool
from imagegraph.testing.context import MemoryContext


def _pid() -> int:
    return os.getpid()


def _slow_pid() -> int:
    time.sleep(0.2)
    return os.getpid()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def pool() -> Iterator[ProcessPool]:
    made = ProcessPool(1)
    yield made
    made.shutdown()


async def test_work_runs_in_another_process_that_stays(pool: ProcessPool) -> None:
    first = await pool.run(_pid)
    assert first != os.getpid()
    assert await pool.run(_pid) == first  # started once, then reused


async def test_a_dead_process_fails_its_call_and_the_next_call_gets_a_new_one(
    pool: ProcessPool,
) -> None:
    before = await pool.run(_pid)
    with pytest.raises(ProcessLost, match="exit code -9"):
        await pool.run(_die)
    after = await pool.run(_pid)
    assert after not in (before, os.getpid())


async def test_errors_come_back_as_raised_and_what_cannot_cross_is_refused(
    pool: ProcessPool,
) -> None:
    with pytest.raises(ZeroDivisionError):
        await pool.run(divmod, 1, 0)
    with pytest.raises(AttributeError, match="local object"):
        await pool.run(lambda: 1)
    assert await pool.run(divmod, 7, 2) == (3, 1)  # the process is still there


async def test_processes_end_with_the_pool() -> None:
    pool = ProcessPool(2)
    pids = set(await asyncio.gather(*(pool.run(_slow_pid) for _ in range(4))))
    assert len(pids) == 2
    pool.shutdown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(_pid)


async def test_the_sandbox_draws_the_same_bytes_in_a_process(pool: ProcessPool) -> None:
    args = ("a red fox", "", 7, 96, 64, 10, 7.5)
    png = await pool.run(render_png, *args)
    assert png == render_png(*args)
    assert png.startswith(b"\x89PNG")
    assert render(*args).size == (96, 64)


async def test_the_test_context_refuses_what_would_not_cross_to_a_process() -> None:
    ctx = MemoryContext()
    assert await ctx.run_process(_pid) == os.getpid()
    with pytest.raises(AttributeError, match="local object"):
        await ctx.run_process(lambda: 1)


def test_a_pool_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ProcessPool(0)
