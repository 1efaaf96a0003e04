"""Fixtures every adapter test uses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from imagegraph.transport import AiohttpTransport


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The client adapters send with, as the hub would give them one."""
    async with httpx.AsyncClient(timeout=10, transport=AiohttpTransport()) as client:
        yield client
