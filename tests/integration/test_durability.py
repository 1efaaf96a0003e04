"""Runs held by workers that died are taken back: at once when the worker was a process on
this host that no longer exists, after the lease expires otherwise."""

from __future__ import annotations

import socket
import subprocess
from datetime import UTC, datetime

from imagegraph.engine import transitions
from imagegraph.graph.model import parse_workflow
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store import executions as execution_store
from imagegraph.store.tables import DEFAULT_WORKSPACE
from tests.builders import edge, linear, node, workflow


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def queue_and_claim_source(settings: Settings, owner: str, lease: float) -> str:
    """Queue an execution and let `owner` claim its first node, as a worker that then died."""
    runtime = Runtime.build(settings, run_worker=False)
    await runtime.start()
    try:
        execution_id = await runtime.engine.submit(parse_workflow(linear()))
        claims, _ = transitions.claim(runtime.db, owner, 10, lease, datetime.now(UTC))
        assert [c.node_id for c in claims] == ["prompt"]
    finally:
        await runtime.stop()
    return execution_id


async def run_to_end(settings: Settings, execution_id: str) -> dict[str, int]:
    runtime = Runtime.build(settings)
    await runtime.start()
    try:
        status = await runtime.engine.wait(execution_id, max_wait=30)
        assert status.value == "COMPLETED"
        _, runs = execution_store.get_execution(runtime.db, DEFAULT_WORKSPACE, execution_id)
        return {r["node_id"]: r["attempt"] for r in runs}
    finally:
        await runtime.stop()


async def test_runs_of_a_dead_local_process_are_taken_back_at_start(settings: Settings) -> None:
    owner = f"{socket.gethostname()}:{dead_pid()}:gone"
    # A lease far longer than the test: only knowing the process is gone can explain recovery.
    execution_id = await queue_and_claim_source(settings, owner, lease=3600)
    attempts = await run_to_end(settings, execution_id)
    assert attempts == {"prompt": 2, "gen": 1, "out": 1}


async def test_expired_leases_of_other_hosts_are_swept(settings: Settings) -> None:
    quick = settings.model_copy(update={"lease_seconds": 1.0})
    execution_id = await queue_and_claim_source(quick, "elsewhere:4242:x", lease=0.5)
    attempts = await run_to_end(quick, execution_id)
    assert attempts == {"prompt": 2, "gen": 1, "out": 1}


async def test_a_live_lease_of_another_host_is_left_alone(settings: Settings) -> None:
    execution_id = await queue_and_claim_source(settings, "elsewhere:4242:x", lease=3600)
    runtime = Runtime.build(settings)
    await runtime.start()
    try:
        status = await runtime.engine.wait(execution_id, max_wait=1.0)
        assert status.value == "RUNNING"
        _, runs = execution_store.get_execution(runtime.db, DEFAULT_WORKSPACE, execution_id)
        assert {r["node_id"]: r["state"] for r in runs}["prompt"] == "RUNNING"
    finally:
        await runtime.stop()


async def test_lease_renewals_never_strand_a_claimed_successor(settings: Settings) -> None:
    """Renewing leases every 100 ms while many short runs finish: a run whose completion was
    committed (and claimed its successor) may be cancelled by a renewal before it resumes;
    the successor must still start at once, never wait for its lease to expire."""
    # Renew every 100 ms on SQLite. PostgreSQL renews through a thread and the network, where
    # so short a lease really does lapse now and then (and the run rightly runs again).
    lease = 0.3 if settings.database_url_or_default().startswith("sqlite") else 3.0
    quick = settings.model_copy(update={"lease_seconds": lease})
    runtime = Runtime.build(quick)
    await runtime.start()
    try:
        doc = parse_workflow(chain(8))
        ids = [await runtime.engine.submit(doc, inputs={"Prompt": f"p{i}"}) for i in range(40)]
        for execution_id in ids:
            status = await runtime.engine.wait(execution_id, max_wait=30)
            assert status.value == "COMPLETED"
            _, runs = execution_store.get_execution(runtime.db, DEFAULT_WORKSPACE, execution_id)
            assert {r["node_id"]: r["attempt"] for r in runs} == dict.fromkeys(
                [r["node_id"] for r in runs], 1
            )
    finally:
        await runtime.stop()


def chain(length: int) -> dict[str, object]:
    nodes = [
        node("p", "input:text", "Prompt", text="x"),
        node("g", "generate:sandbox", width=64, height=64, seed=1),
    ]
    edges = [edge("p", "text", "g", "prompt")]
    previous = "g"
    for i in range(length):
        nodes.append(node(f"r{i}", "image:resize", width=63 + i % 2, height=64, mode="exact"))
        edges.append(edge(previous, "image", f"r{i}", "image"))
        previous = f"r{i}"
    nodes.append(node("o", "output:image"))
    edges.append(edge(previous, "image", "o", "image"))
    return workflow(nodes, edges)
