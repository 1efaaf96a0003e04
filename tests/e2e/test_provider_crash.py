"""Paid provider jobs in flight survive a crash of the server, and an outage of the provider:
the jobs recorded when fal accepted them are resumed (watched again) rather than paid for a
second time, and every node ends with its image."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegraph.providers.hub import KEY_VARIABLES
from imagegraph.testing.fakes.fal import FalFake
from tests.builders import edge, node, workflow
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e

LATENCY = 3.0  # seconds each fal job runs
GENERATORS = [f"gen{i}" for i in range(4)]
# Variables of the developer's environment that would configure other routes or a webhook.
PROVIDER_VARIABLES = [
    *(variable for pair in KEY_VARIABLES.values() for variable in pair),
    "IMAGEGRAPH_PUBLIC_URL",
]


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def fal() -> Iterator[FalFake]:
    fake = FalFake(latency=LATENCY)
    fake.start()
    yield fake
    fake.stop()


def fal_server(data_dir: Path, fake: FalFake, servers: list[ServerProcess]) -> ServerProcess:
    """A server whose only provider is the fake (no webhook: jobs are watched on fal's
    status stream)."""
    server = ServerProcess(
        data_dir, {"IMAGEGRAPH_FAL_API_KEY": fake.api_key, "IMAGEGRAPH_FAL_BASE_URL": fake.url}
    )
    for variable in PROVIDER_VARIABLES:
        if not variable.startswith("IMAGEGRAPH_FAL_"):
            server.env.pop(variable, None)
    servers.append(server.start())
    return server


def four_generations() -> dict[str, Any]:
    """One prompt, four independent generations (different seeds), each to its output."""
    nodes = [node("prompt", "input:text", "Prompt", text="a harbour at night")]
    edges = []
    for i, gen in enumerate(GENERATORS):
        nodes.append(node(gen, "generate:flux_dev", width=256, height=256, seed=100 + i))
        nodes.append(node(f"out{i}", "output:image"))
        edges.append(edge("prompt", "text", gen, "prompt"))
        edges.append(edge(gen, "image", f"out{i}", "image"))
    return workflow(nodes, edges, name="four generations")


def execute(server: ServerProcess) -> str:
    status, created = server.request("POST", "/api/v1/workflows", four_generations())
    assert status == 201, created
    status, queued = server.request("POST", f"/api/v1/workflows/{created['id']}/execute", {})
    assert status == 201, queued
    execution_id: str = queued["executionId"]
    return execution_id


def nodes_of(server: ServerProcess, execution_id: str) -> dict[str, dict[str, Any]]:
    status, record = server.request("GET", f"/api/v1/workflows/executions/{execution_id}")
    assert status == 200, record
    return {n["nodeId"]: n for n in record["nodes"]}


def wait_for_recorded_jobs(server: ServerProcess, execution_id: str, fake: FalFake) -> set[str]:
    """The job ids, once fal has accepted all four and the server has recorded them (a job
    is recorded right after fal accepts it: a crash between the two would leave that one
    in doubt, which is not what is tested here)."""
    deadline = time.monotonic() + 15
    recorded: dict[str, str] = {}
    while time.monotonic() < deadline:
        nodes = nodes_of(server, execution_id)
        recorded = {
            gen: nodes[gen]["provider"]["jobId"]
            for gen in GENERATORS
            if (nodes[gen].get("provider") or {}).get("jobId")
        }
        if fake.accepted == len(GENERATORS) and len(recorded) == len(GENERATORS):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"fal accepted {fake.accepted} jobs, the server recorded {recorded}")
    assert all(nodes[gen]["status"] == "RUNNING" for gen in GENERATORS), nodes
    assert set(recorded.values()) == set(fake.jobs)
    return set(recorded.values())


def assert_all_generated(
    server: ServerProcess, execution_id: str, job_ids: set[str], attempts: int
) -> None:
    status, polled = server.request(
        "GET",
        f"/api/v1/workflows/executions/{execution_id}/poll",
        headers={"Prefer": "wait=25"},
    )
    assert status == 200, polled
    assert polled["status"] == "COMPLETED", polled
    assert len(polled["outputs"]) == len(GENERATORS)
    nodes = nodes_of(server, execution_id)
    for i, gen in enumerate(GENERATORS):
        run = nodes[gen]
        assert run["status"] == "SUCCEEDED", run
        assert run["attempts"] == attempts, run
        image = run["outputs"]["image"]
        assert (image["type"], image["width"], image["height"]) == ("image", 256, 256), image
        assert run["provider"]["provider"] == "fal"
        assert run["provider"]["previousAttemptInDoubt"] is False
        assert nodes[f"out{i}"]["status"] == "SUCCEEDED", nodes[f"out{i}"]
    reported = {nodes[gen]["provider"]["jobId"] for gen in GENERATORS}
    assert reported == job_ids  # the same four jobs, each reported by its node
    assets = {nodes[gen]["outputs"]["image"]["assetId"] for gen in GENERATORS}
    assert len(assets) == len(GENERATORS)  # four seeds, four pictures


def test_sigkill_with_paid_jobs_in_flight_resumes_them(
    tmp_path: Path, fal: FalFake, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    first = fal_server(data_dir, fal, servers)
    execution_id = execute(first)
    job_ids = wait_for_recorded_jobs(first, execution_id, fal)
    assert not any(fal.done(job) for job in fal.jobs.values()), "too late: the jobs ended"
    first.kill()

    second = fal_server(data_dir, fal, servers)
    assert_all_generated(second, execution_id, job_ids, attempts=2)
    assert fal.accepted == len(GENERATORS)  # nothing was paid for twice
    assert fal.cancelled == 0
    assert len(fal.jobs) == len(GENERATORS)


def test_provider_outage_mid_job_is_waited_out(
    tmp_path: Path, fal: FalFake, servers: list[ServerProcess]
) -> None:
    server = fal_server(tmp_path / "data", fal, servers)
    execution_id = execute(server)
    job_ids = wait_for_recorded_jobs(server, execution_id, fal)
    watched = fal.requests["status"]
    assert not any(fal.done(job) for job in fal.jobs.values()), "too late: the jobs ended"
    fal.stop()  # connections refused; the open status streams are cut
    time.sleep(2)
    nodes = nodes_of(server, execution_id)
    assert all(nodes[gen]["status"] == "RUNNING" for gen in GENERATORS), nodes
    fal.start()

    assert_all_generated(server, execution_id, job_ids, attempts=1)
    assert fal.accepted == len(GENERATORS)  # the outage did not make anything run again
    assert fal.requests["status"] > watched  # the jobs were watched again after it
