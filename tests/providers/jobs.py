"""Driving an adapter's job to its end, as the catalog node does."""

from __future__ import annotations

import asyncio
import time

import pytest

from imagegraph.providers.base import Adapter, Job, ProviderError, Request, Result, Route


async def started(adapter: Adapter, route: Route, request: Request) -> Job:
    job = await adapter.start(route, request)
    assert isinstance(job, Job)
    return job


async def finish(adapter: Adapter, job: Job, timeout: float = 5.0) -> Result:
    """Poll as the runner would, until a Result (or a ProviderError)."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = await adapter.poll(job)
        if isinstance(outcome, Result):
            return outcome
        assert time.monotonic() < deadline, f"still {outcome.status}"
        await asyncio.sleep(0.05)


async def refused(adapter: Adapter, route: Route, request: Request) -> ProviderError:
    """The error a job ends with (it must end with one)."""
    job = await started(adapter, route, request)
    with pytest.raises(ProviderError) as caught:
        await finish(adapter, job)
    return caught.value
