"""Idempotency-Key on creating POSTs: replays, conflicts, races, retention."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from PIL import Image
from sqlalchemy import func, select, update

from imagegraph.api.idempotency import fingerprint
from imagegraph.runtime import Runtime
from imagegraph.store import idempotency as store
from imagegraph.store.tables import DEFAULT_WORKSPACE, executions, idempotency_keys
from tests.builders import linear
from tests.clients import api_client, make_workspace

API = "/api/v1"


def count_executions(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(executions)).scalar() or 0)


async def saved_workflow(client: httpx.AsyncClient, **kw: Any) -> str:
    response = await client.post(f"{API}/workflows", json=linear(**kw))
    assert response.status_code == 201, response.text
    workflow_id: str = response.json()["id"]
    return workflow_id


async def test_a_retry_replays_the_first_response_byte_for_byte_and_runs_nothing(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    workflow_id = await saved_workflow(client)
    url = f"{API}/workflows/{workflow_id}/execute"
    headers = {"Idempotency-Key": "order-4711"}
    first = await client.post(url, json={"inputs": {"Prompt": "a kettle"}}, headers=headers)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    # Same request, keys in another order and other spacing: still the same request.
    again = await client.post(
        url,
        content=b'{ "inputs" : {"Prompt":"a kettle"} }',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert count_executions(runtime) == 1


async def test_the_same_key_with_another_body_is_422(client: httpx.AsyncClient) -> None:
    workflow_id = await saved_workflow(client)
    url = f"{API}/workflows/{workflow_id}/execute"
    headers = {"Idempotency-Key": "k1"}
    assert (await client.post(url, json={}, headers=headers)).status_code == 201
    response = await client.post(url, json={"inputs": {"Prompt": "other"}}, headers=headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["code"] == "idempotency_key_reused"
    # Nor on another route.
    other = await client.post(f"{API}/workflows", json=linear(), headers=headers)
    assert other.status_code == 422


async def test_keys_are_per_workspace(runtime: Runtime, client: httpx.AsyncClient) -> None:
    document = linear()
    _, other_key = make_workspace(runtime)
    headers = {"Idempotency-Key": "shared-name"}
    mine = await client.post(f"{API}/workflows", json=document, headers=headers)
    async with api_client(runtime, other_key) as other:
        theirs = await other.post(f"{API}/workflows", json=document, headers=headers)
    assert mine.status_code == theirs.status_code == 201
    assert "idempotent-replayed" not in theirs.headers
    assert mine.json()["id"] != theirs.json()["id"]


async def test_fifty_concurrent_identical_requests_create_one_execution(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    workflow_id = await saved_workflow(client)
    url = f"{API}/workflows/{workflow_id}/execute"
    body = {"inputs": {"Prompt": "one of fifty"}}
    responses = await asyncio.gather(
        *(client.post(url, json=body, headers={"Idempotency-Key": "burst"}) for _ in range(50))
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert count_executions(runtime) == 1


async def test_a_request_still_in_flight_is_409_with_retry_after(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    body = linear()
    raw = httpx.Request("POST", "http://x", json=body).content
    print_ = fingerprint("POST", f"{API}/workflows", raw)
    # Another request holds the key right now.
    assert store.claim(runtime.db, DEFAULT_WORKSPACE, "slow", print_, datetime.now(UTC))
    response = await client.post(
        f"{API}/workflows", content=raw, headers={"Idempotency-Key": "slow", **JSON}
    )
    assert response.status_code == 409
    assert response.headers["retry-after"] == "1"
    assert response.json()["code"] == "conflict"


JSON = {"Content-Type": "application/json"}


async def test_a_key_whose_request_died_is_taken_over_after_a_minute(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    raw = httpx.Request("POST", "http://x", json=linear()).content
    print_ = fingerprint("POST", f"{API}/workflows", raw)
    long_ago = datetime.now(UTC) - timedelta(seconds=61)
    assert store.claim(runtime.db, DEFAULT_WORKSPACE, "orphan", print_, long_ago)
    response = await client.post(
        f"{API}/workflows", content=raw, headers={"Idempotency-Key": "orphan", **JSON}
    )
    assert response.status_code == 201, response.text
    replay = await client.post(
        f"{API}/workflows", content=raw, headers={"Idempotency-Key": "orphan", **JSON}
    )
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == response.json()["id"]


async def test_a_failed_request_stores_nothing_so_the_key_can_be_used_again(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "fix-and-retry"}
    broken = {**linear(), "edges": []}
    assert (await client.post(f"{API}/workflows", json=broken, headers=headers)).status_code == 422
    fixed = await client.post(f"{API}/workflows", json=linear(), headers=headers)
    assert fixed.status_code == 201
    assert "idempotent-replayed" not in fixed.headers


async def test_keys_expire_after_the_retention_window(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    headers = {"Idempotency-Key": "old"}
    first = await client.post(f"{API}/workflows", json=linear(), headers=headers)
    hours = runtime.settings.idempotency_hours
    with runtime.db.write() as conn:
        conn.execute(
            update(idempotency_keys).values(
                created_at=datetime.now(UTC) - timedelta(hours=hours, minutes=1)
            )
        )
    second = await client.post(f"{API}/workflows", json=linear(), headers=headers)
    assert second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    assert hours >= 24


async def test_the_reaper_forgets_expired_keys(runtime: Runtime, client: httpx.AsyncClient) -> None:
    await client.post(f"{API}/workflows", json=linear(), headers={"Idempotency-Key": "a"})
    assert store.reap(runtime.db, datetime.now(UTC) - timedelta(hours=1)) == 0
    assert store.reap(runtime.db, datetime.now(UTC) + timedelta(seconds=1)) == 1


async def test_malformed_keys_are_refused(client: httpx.AsyncClient) -> None:
    for key in ("x" * 256, ""):
        response = await client.post(
            f"{API}/workflows", json=linear(), headers={"Idempotency-Key": key}
        )
        assert response.status_code == 422, key
        assert response.json()["errors"][0]["field"] == "header.Idempotency-Key"


async def test_a_committed_execution_whose_answer_was_lost_is_found_by_the_retry(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    """The key is stored by the transaction that creates the execution: if the server dies
    after the commit, before answering, the client's retry gets that execution."""
    workflow_id = await saved_workflow(client)
    url = f"{API}/workflows/{workflow_id}/execute"
    lost = await client.post(url, json={}, headers={"Idempotency-Key": "lost"})
    # Forget that the client ever saw the answer; the retry is all it has.
    retry = await client.post(url, json={}, headers={"Idempotency-Key": "lost"})
    assert retry.json()["executionId"] == lost.json()["executionId"]
    with runtime.db.read() as conn:
        stored = conn.execute(select(idempotency_keys)).one()
    assert stored.state == "done"
    assert stored.response_body == lost.content


async def test_uploads_and_credit_grants_replay_too(client: httpx.AsyncClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, "PNG")
    files = {"file": ("a.png", buffer.getvalue(), "image/png")}
    first = await client.post(f"{API}/assets", files=files, headers={"Idempotency-Key": "u1"})
    again = await client.post(f"{API}/assets", files=files, headers={"Idempotency-Key": "u1"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"

    before = (await client.get(f"{API}/workspace")).json()["credits"]["balance"]
    for _ in range(3):
        granted = await client.post(
            f"{API}/credits", json={"amount": 25}, headers={"Idempotency-Key": "grant-1"}
        )
        assert granted.status_code == 201
    after = (await client.get(f"{API}/workspace")).json()["credits"]["balance"]
    assert after == before + 25


async def test_a_new_keys_secret_is_never_stored_for_replays(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    body = {"name": "ci", "scopes": ["workflows:read"]}
    first = await client.post(f"{API}/keys", json=body, headers={"Idempotency-Key": "key-1"})
    secret = first.json()["key"]
    assert secret.startswith("sk-live-")
    again = await client.post(f"{API}/keys", json=body, headers={"Idempotency-Key": "key-1"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["key"] is None
    with runtime.db.read() as conn:
        stored = conn.execute(select(idempotency_keys.c.response_body)).scalars().all()
    assert all(secret.encode() not in body for body in stored)
    assert len((await client.get(f"{API}/keys")).json()["items"]) == 2
