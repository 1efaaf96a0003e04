"""Provider webhooks against a real server: with `IMAGEGRAPH_PUBLIC_URL` set, jobs are
submitted with the server's webhook URL, the provider's signed completion webhook wakes the
waiting node (which polls once and finishes), and forged webhooks are refused and change
nothing.

Whether the webhook (and not the poll schedule) ended the wait is read from when the fake
saw its status requests: the job's latency falls in the middle of a long gap of the poll
schedule, so a node that only polled would have found it done no earlier than the next
scheduled poll, seconds later than the webhook came.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.responses import Response

from imagegraph.nodes.catalog import (
    FIRST_POLL_SECONDS,
    MAX_POLL_SECONDS_WITH_WEBHOOK,
    POLL_GROWTH,
)
from imagegraph.providers.hub import KEY_VARIABLES
from imagegraph.testing.fakes.fal import FalFake
from imagegraph.testing.fakes.replicate import ReplicateFake
from imagegraph.testing.fakes.server import FakeProvider
from tests.builders import edge, node, workflow
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e

# Seconds a job runs: between the 8th scheduled poll (~4.9 s after submission) and the 9th
# (~7.5 s), so polling alone would see the end ~2 s after the webhook announces it.
LATENCY = 5.5
# Variables of the developer's environment that would configure other routes or a webhook.
PROVIDER_VARIABLES = [
    *(variable for pair in KEY_VARIABLES.values() for variable in pair),
    "IMAGEGRAPH_PUBLIC_URL",
    "IMAGEGRAPH_REPLICATE_WEBHOOK_SECRET",
    "IMAGEGRAPH_FAL_JWKS_URL",
]


class StatusTimes(FakeProvider):
    """Remembers when each status request came (time.monotonic(), like job["submitted"])."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.status_times: list[float] = []

    async def inject(self, endpoint: str) -> Response | None:
        if endpoint == "status":
            self.status_times.append(time.monotonic())
        return await super().inject(endpoint)


class RecordingFal(StatusTimes, FalFake):
    pass


class RecordingReplicate(StatusTimes, ReplicateFake):
    pass


@pytest.fixture
def replicate() -> Iterator[RecordingReplicate]:
    fake = RecordingReplicate(latency=LATENCY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fal() -> Iterator[RecordingFal]:
    fake = RecordingFal(latency=LATENCY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def start_server(
    tmp_path: Path, servers: list[ServerProcess], env: dict[str, str]
) -> ServerProcess:
    """A server configured by `env` only (as far as providers go), announcing its own URL
    to providers as the webhook base."""
    server = ServerProcess(tmp_path / "data", env)
    for variable in PROVIDER_VARIABLES:
        if variable not in env:
            server.env.pop(variable, None)
    server.env["IMAGEGRAPH_PUBLIC_URL"] = server.url
    servers.append(server.start())
    return server


def one_generation(prompt: str) -> dict[str, Any]:
    return workflow(
        [
            node("prompt", "input:text", "Prompt", text=prompt),
            node("gen", "generate:flux_dev", width=256, height=256, seed=11),
            node("out", "output:image"),
        ],
        [edge("prompt", "text", "gen", "prompt"), edge("gen", "image", "out", "image")],
        name="one generation",
    )


def execute(server: ServerProcess, document: dict[str, Any]) -> str:
    status, created = server.request("POST", "/api/v1/workflows", document)
    assert status == 201, created
    status, queued = server.request("POST", f"/api/v1/workflows/{created['id']}/execute", {})
    assert status == 201, queued
    execution_id: str = queued["executionId"]
    return execution_id


def nodes_of(server: ServerProcess, execution_id: str) -> dict[str, dict[str, Any]]:
    status, record = server.request("GET", f"/api/v1/workflows/executions/{execution_id}")
    assert status == 200, record
    return {n["nodeId"]: n for n in record["nodes"]}


def wait_for_job(server: ServerProcess, execution_id: str, fake: FakeProvider) -> str:
    """The provider job id of node `gen`, once the server has recorded it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        provider = nodes_of(server, execution_id)["gen"].get("provider") or {}
        if provider.get("jobId"):
            job_id: str = provider["jobId"]
            assert job_id in fake.jobs
            return job_id
        time.sleep(0.02)
    pytest.fail(f"the server never recorded a job (the fake accepted {fake.accepted})")


def wait_until_completed(server: ServerProcess, execution_id: str) -> None:
    status, polled = server.request(
        "GET",
        f"/api/v1/workflows/executions/{execution_id}/poll",
        headers={"Prefer": "wait=25"},
    )
    assert status == 200, polled
    assert polled["status"] == "COMPLETED", polled
    assert len(polled["outputs"]) == 1


def wait_for(condition: Any, what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def post_webhook(server: ServerProcess, provider: str, body: bytes, headers: dict[str, str]) -> Any:
    """POST to the public webhook endpoint (no API key): (status, JSON answer)."""
    request = urllib.request.Request(
        f"{server.url}/api/v1/providers/{provider}/webhook",
        data=body,
        method="POST",
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def assert_woken_by_webhook(fake: StatusTimes, job: dict[str, Any]) -> None:
    """The node polled on its schedule while the job ran, then exactly once more: the
    poll the webhook woke, earlier than the schedule's next one."""
    done_at = float(job["submitted"]) + LATENCY
    pending = [t - job["submitted"] for t in fake.status_times if t < done_at]
    after = [t - job["submitted"] for t in fake.status_times if t >= done_at]
    timeline = [round(t - job["submitted"], 2) for t in fake.status_times]
    assert len(pending) >= 5, f"the node did not poll on its schedule: {timeline}"
    assert len(after) == 1, f"one poll after the job ended, not {len(after)}: {timeline}"
    # Polling alone: the next poll comes the schedule's next wait after the last one (or
    # later: each poll's round trip adds to it). The webhook comes ~2 s before that; half
    # a second of it is left for a slow machine to answer it.
    scheduled = pending[-1] + min(
        MAX_POLL_SECONDS_WITH_WEBHOOK, FIRST_POLL_SECONDS * POLL_GROWTH ** len(pending)
    )
    assert after[0] < scheduled - 0.5, (
        f"the end was seen at {after[0]:.2f} s, not well before the next scheduled poll "
        f"({scheduled:.2f} s): the webhook did not wake the node ({timeline})"
    )


def assert_generated(server: ServerProcess, execution_id: str, provider: str) -> dict[str, Any]:
    nodes = nodes_of(server, execution_id)
    gen = nodes["gen"]
    assert gen["status"] == "SUCCEEDED", gen
    assert gen["attempts"] == 1
    assert gen["outputs"]["image"]["type"] == "image"
    assert nodes["out"]["status"] == "SUCCEEDED", nodes["out"]
    assert gen["provider"]["provider"] == provider
    run: dict[str, Any] = gen["provider"]
    return run


def test_replicate_webhook_wakes_the_waiting_node(
    tmp_path: Path, replicate: RecordingReplicate, servers: list[ServerProcess]
) -> None:
    server = start_server(
        tmp_path,
        servers,
        {
            "IMAGEGRAPH_REPLICATE_API_KEY": replicate.api_key,
            "IMAGEGRAPH_REPLICATE_BASE_URL": replicate.url,
            "IMAGEGRAPH_REPLICATE_WEBHOOK_SECRET": replicate.webhook_secret,
        },
    )
    execution_id = execute(server, one_generation("a lighthouse at dusk"))
    job_id = wait_for_job(server, execution_id, replicate)
    wait_until_completed(server, execution_id)
    wait_for(lambda: replicate.webhooks_sent == 1, "the webhook delivery to be counted")

    run = assert_generated(server, execution_id, "replicate")
    assert run["jobId"] == job_id
    assert run["route"] == 1  # fal, the first route, has no key here
    assert [s["reason"] for s in run["skipped"]] == ["not configured"]
    job = replicate.jobs[job_id]
    assert job["webhook"] == f"{server.url}/api/v1/providers/replicate/webhook"
    assert job["events"] == ["completed"]
    assert replicate.accepted == 1
    assert replicate.webhooks_sent == 1  # delivered, answered 2xx
    assert replicate.requests["secret"] == 0  # the configured secret verified it
    assert_woken_by_webhook(replicate, job)


def test_fal_webhook_wakes_the_waiting_node(
    tmp_path: Path, fal: RecordingFal, servers: list[ServerProcess]
) -> None:
    server = start_server(
        tmp_path,
        servers,
        {
            "IMAGEGRAPH_FAL_API_KEY": fal.api_key,
            "IMAGEGRAPH_FAL_BASE_URL": fal.url,
            "IMAGEGRAPH_FAL_JWKS_URL": fal.jwks_url,
        },
    )
    execution_id = execute(server, one_generation("a lighthouse at dawn"))
    job_id = wait_for_job(server, execution_id, fal)
    wait_until_completed(server, execution_id)
    wait_for(lambda: fal.webhooks_sent == 1, "the webhook delivery to be counted")

    run = assert_generated(server, execution_id, "fal")
    assert run["jobId"] == job_id
    assert run["route"] == 0
    job = fal.jobs[job_id]
    assert job["webhook"] == f"{server.url}/api/v1/providers/fal/webhook"
    assert fal.accepted == 1
    assert fal.webhooks_sent == 1  # delivered, answered 2xx
    assert fal.requests["jwks"] >= 1  # its signature was checked with the fake's keys
    # With a webhook the job is polled, not watched on the status stream (one held
    # request would not show as a poll schedule).
    assert_woken_by_webhook(fal, job)


def test_forged_webhooks_are_refused_and_change_nothing(
    tmp_path: Path, fal: RecordingFal, servers: list[ServerProcess]
) -> None:
    replicate_secret = ReplicateFake().webhook_secret  # configured, never served
    server = start_server(
        tmp_path,
        servers,
        {
            "IMAGEGRAPH_FAL_API_KEY": fal.api_key,
            "IMAGEGRAPH_FAL_BASE_URL": fal.url,
            "IMAGEGRAPH_FAL_JWKS_URL": fal.jwks_url,
            "IMAGEGRAPH_REPLICATE_API_KEY": "r8_unused",
            "IMAGEGRAPH_REPLICATE_BASE_URL": "http://127.0.0.1:9",
            "IMAGEGRAPH_REPLICATE_WEBHOOK_SECRET": replicate_secret,
        },
    )
    execution_id = execute(server, one_generation("a lighthouse in fog"))
    job_id = wait_for_job(server, execution_id, fal)
    # After its 7th poll the node waits ~1.7 s for the 8th: forge in that gap, when a
    # wake-up would show as a poll at once.
    wait_for(lambda: len(fal.status_times) >= 7, "the node's 7th poll", 10)
    assert len(fal.status_times) == 7

    body = json.dumps(
        {"request_id": job_id, "gateway_request_id": job_id, "status": "OK", "payload": {}}
    ).encode()
    forged = {
        "signed with another key": (
            fal.sign_webhook(job_id, body, key=Ed25519PrivateKey.generate()),
            body,
        ),
        "tampered body": (fal.sign_webhook(job_id, body), body.replace(b"OK", b"KO")),
        "stale timestamp": (
            fal.sign_webhook(job_id, body, timestamp=int(time.time()) - 600),
            body,
        ),
        "unsigned": ({"Content-Type": "application/json"}, body),
    }
    for case, (headers, sent) in forged.items():
        status, answer = post_webhook(server, "fal", sent, headers)
        assert status == 401, (case, answer)
        assert answer["code"] == "unauthorized", (case, answer)
    prediction = json.dumps({"id": job_id, "status": "succeeded"}).encode()
    wrong_secret = ReplicateFake().sign_webhook(prediction)  # another whsec_ secret
    status, answer = post_webhook(server, "replicate", prediction, wrong_secret)
    assert status == 401, answer
    status, answer = post_webhook(server, "bfl", body, fal.sign_webhook(job_id, body))
    assert status == 404, answer  # not configured here
    forged_at = time.monotonic() - float(fal.jobs[job_id]["submitted"])

    # The control: a genuine signature verifies (the refusals above were the
    # signatures'), and for a job nobody waits on it wakes nothing.
    other = json.dumps({"request_id": "not-a-job", "status": "OK", "payload": {}}).encode()
    status, answer = post_webhook(server, "fal", other, fal.sign_webhook("not-a-job", other))
    assert status == 200, answer
    assert answer == {"received": True, "jobId": "not-a-job", "polling": False}

    gen = nodes_of(server, execution_id)["gen"]
    assert gen["status"] == "RUNNING", gen
    assert fal.accepted == 1

    wait_until_completed(server, execution_id)
    wait_for(lambda: fal.webhooks_sent == 1, "the genuine webhook delivery to be counted")
    run = assert_generated(server, execution_id, "fal")
    assert run["jobId"] == job_id
    assert fal.accepted == 1
    job = fal.jobs[job_id]
    times = [t - float(job["submitted"]) for t in fal.status_times]
    # No poll came early because of the forgeries: the 8th kept to the schedule.
    wait_7 = FIRST_POLL_SECONDS * POLL_GROWTH**7
    assert forged_at < times[6] + wait_7 - 0.3, "forged too late to tell"
    assert times[7] - times[6] >= 0.9 * wait_7, [round(t, 2) for t in times]
    assert_woken_by_webhook(fal, job)
