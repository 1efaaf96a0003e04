"""Kill the server with SIGKILL in the middle of executions, start it again: everything
completes, nothing that had finished runs again, nothing queued is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.builders import edge, node, workflow
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def two_branches() -> dict[str, Any]:
    """A fast branch that finishes before the kill and a slow one that is running at it."""
    return workflow(
        [
            node("prompt", "input:text", "Prompt", text="a stone bridge"),
            node("fast", "generate:sandbox", width=64, height=64, seed=1, delayMs=100),
            node("fast_out", "output:image"),
            node("slow", "generate:sandbox", width=64, height=64, seed=2, delayMs=4000),
            node("slow_out", "output:image"),
        ],
        [
            edge("prompt", "text", "fast", "prompt"),
            edge("fast", "image", "fast_out", "image"),
            edge("prompt", "text", "slow", "prompt"),
            edge("slow", "image", "slow_out", "image"),
        ],
    )


def node_states(server: ServerProcess, execution_id: str) -> dict[str, dict[str, Any]]:
    status, record = server.request("GET", f"/api/v1/workflows/executions/{execution_id}")
    assert status == 200
    return {n["nodeId"]: n for n in record["nodes"]}


def test_sigkill_mid_execution_then_restart(tmp_path: Path, servers: list[ServerProcess]) -> None:
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir).start()
    servers.append(first)
    status, created = first.request("POST", "/api/v1/workflows", two_branches())
    assert status == 201
    workflow_id = created["id"]
    status, queued = first.request("POST", f"/api/v1/workflows/{workflow_id}/execute", {})
    assert status == 201
    running_id = queued["executionId"]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        states = node_states(first, running_id)
        if states["fast_out"]["status"] == "SUCCEEDED" and states["slow"]["status"] == "RUNNING":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"never saw the moment to kill: {states}")

    # More work committed just before the crash: it must not be lost either.
    later = [
        first.request(
            "POST", f"/api/v1/workflows/{workflow_id}/execute", {"inputs": {"Prompt": f"later {i}"}}
        )[1]["executionId"]
        for i in range(3)
    ]
    first.kill()

    second = ServerProcess(data_dir).start()
    servers.append(second)
    for execution_id in [running_id, *later]:
        status, polled = second.request(
            "GET",
            f"/api/v1/workflows/executions/{execution_id}/poll",
            headers={"Prefer": "wait=30"},
        )
        assert status == 200
        assert polled["status"] == "COMPLETED", polled
        assert len(polled["outputs"]) == 2

    states = node_states(second, running_id)
    assert {n: states[n]["attempts"] for n in ("prompt", "fast", "fast_out")} == {
        "prompt": 1,
        "fast": 1,
        "fast_out": 1,
    }
    assert states["slow"]["attempts"] == 2  # it was running at the kill: it ran again
    assert states["slow_out"]["attempts"] == 1
    status, events = second.request("GET", f"/api/v1/workflows/executions/{running_id}")
    assert events["totals"]["failed"] == 0
