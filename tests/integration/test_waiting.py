"""Waiting for executions (`Engine.wait`, behind the long poll) when another process ends
them: its events never reach this process's bus, so the waiters learn of the end from the
database, in one read for all of them at each poll interval."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from imagegraph.engine import queries, transitions
from imagegraph.engine.states import ExecutionStatus
from imagegraph.graph.model import parse_workflow
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store.tables import DEFAULT_WORKSPACE
from tests.builders import linear

WAITERS = 20


def counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of `queries.<name>` (each a read of the database)."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(queries, name)

    def wrapper(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(queries, name, wrapper)
    return calls


async def test_waiters_hear_of_ends_another_process_recorded_from_one_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = Runtime.build(settings, run_worker=False)  # nothing runs here: queued for good
    await runtime.start()
    try:
        doc = parse_workflow(linear())
        ids = [await runtime.engine.submit(doc) for _ in range(WAITERS)]
        status_reads = counted(monkeypatch, "execution_status")
        sweeps = counted(monkeypatch, "ended_among")
        waits = [asyncio.create_task(runtime.engine.wait(i, max_wait=60)) for i in ids]
        for _ in range(100):
            if len(status_reads) == WAITERS:
                break
            await asyncio.sleep(0.01)
        assert len(status_reads) == WAITERS  # each waiter read its status once

        # Another process cancels them: straight in the database, nothing on this bus.
        for execution_id in ids:
            transitions.cancel_execution(
                runtime.db, DEFAULT_WORKSPACE, execution_id, datetime.now(UTC)
            )
        ended: Sequence[ExecutionStatus] = await asyncio.wait_for(asyncio.gather(*waits), 30)
        assert set(ended) == {ExecutionStatus.CANCELLED}
        # Far less than one read per waiter and poll interval (0.2 s here).
        assert len(status_reads) == WAITERS
        assert 1 <= len(sweeps) <= 3
    finally:
        await runtime.stop()


async def test_a_wait_that_runs_out_of_time_answers_the_status_then(settings: Settings) -> None:
    runtime = Runtime.build(settings, run_worker=False)
    await runtime.start()
    try:
        execution_id = await runtime.engine.submit(parse_workflow(linear()))
        status = await runtime.engine.wait(execution_id, max_wait=0.3)
        assert status is ExecutionStatus.QUEUED
    finally:
        await runtime.stop()
