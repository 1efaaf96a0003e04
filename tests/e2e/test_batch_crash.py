"""Kill the server with SIGKILL in the middle of a batch, start it again: the batch goes on
where it was, every item ends exactly once, none is lost, none runs twice."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.builders import linear
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e
ITEMS = 40


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def progress(server: ServerProcess, batch_id: str) -> dict[str, Any]:
    status, body = server.request("GET", f"/api/v1/batches/{batch_id}")
    assert status == 200, body
    found: dict[str, Any] = body
    return found


def test_sigkill_mid_batch_then_restart(tmp_path: Path, servers: list[ServerProcess]) -> None:
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir).start()
    servers.append(first)
    status, created = first.request(
        "POST", "/api/v1/workflows", linear(seed=None, size=64, delay_ms=300)
    )
    assert status == 201
    status, batch = first.request(
        "POST",
        "/api/v1/batches",
        {
            "workflowId": created["id"],
            "items": [{"Prompt": f"item {i}"} for i in range(ITEMS)],
            "concurrency": 5,
        },
    )
    assert status == 201, batch
    batch_id = batch["batchId"]

    deadline = time.monotonic() + 30
    while True:
        body = progress(first, batch_id)
        if body["counts"]["completed"] >= 10 and body["counts"]["running"] > 0:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.02)
    first.kill()

    second = ServerProcess(data_dir).start()
    servers.append(second)
    deadline = time.monotonic() + 60
    while (body := progress(second, batch_id))["status"] == "RUNNING":
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert body["status"] == "COMPLETED"
    assert body["counts"]["completed"] == ITEMS
    assert body["counts"]["failed"] == 0

    with sqlite3.connect(data_dir / "imagegraph.db") as conn:
        per_item = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT batch_item_id) FROM executions WHERE batch_id = ?",
            (batch_id,),
        ).fetchone()
        outputs = conn.execute(
            "SELECT COUNT(*) FROM assets a JOIN executions e ON a.execution_id = e.id "
            "WHERE e.batch_id = ? AND a.kind = 'output'",
            (batch_id,),
        ).fetchone()[0]
    # One execution per item (none started twice), one output each.
    assert per_item == (ITEMS, ITEMS)
    assert outputs == ITEMS
    status, items = second.request("GET", f"/api/v1/batches/{batch_id}/items?limit=200")
    assert [i["index"] for i in items["items"]] == list(range(ITEMS))
    assert all(i["attempts"] == 1 and i["status"] == "COMPLETED" for i in items["items"])
