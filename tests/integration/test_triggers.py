"""Public triggers: start a workflow without a key, within limits, and stop at will."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from tests.builders import linear
from tests.clients import api_client, make_key, started_runtime

API = "/api/v1"


async def make_trigger(client: httpx.AsyncClient, document: dict[str, Any] | None = None) -> Any:
    saved = await client.post(f"{API}/workflows", json=document or linear())
    assert saved.status_code == 201, saved.text
    created = await client.post(f"{API}/workflows/{saved.json()['id']}/triggers")
    assert created.status_code == 201, created.text
    return created.json()


async def poll(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=30"}
    )
    response = await client.get(f"{API}/workflows/executions/{execution_id}")
    body: dict[str, Any] = response.json()
    return body


def path_of(trigger: dict[str, Any]) -> str:
    return str(httpx.URL(trigger["url"]).path)


async def test_a_trigger_starts_the_workflow_without_a_key(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    trigger = await make_trigger(client)
    assert len(trigger["webhookId"]) >= 32  # 24 random bytes, URL-safe base64
    assert trigger["url"].endswith(f"/api/v1/workflow/{trigger['webhookId']}/trigger")
    assert trigger["enabled"] is True

    fired = await anonymous.post(path_of(trigger), json={"Prompt": "a paper crane"})
    assert fired.status_code == 202, fired.text
    execution_id = fired.json()["executionId"]
    record = await poll(client, execution_id)
    assert record["status"] == "COMPLETED"
    assert record["inputs"] == {"Prompt": "a paper crane"}
    # The {"inputs": {...}} form of an execute request works too, and so does no body.
    wrapped = await anonymous.post(path_of(trigger), json={"inputs": {"Prompt": "a boat"}})
    assert wrapped.status_code == 202
    assert (await poll(client, wrapped.json()["executionId"]))["inputs"] == {"Prompt": "a boat"}
    assert (await anonymous.post(path_of(trigger))).status_code == 202
    listed = (await client.get(f"{API}/workflows/{record['workflowId']}/triggers")).json()
    assert listed["items"][0]["lastUsedAt"] is not None


async def test_any_origin_may_call_a_trigger_from_a_browser(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    trigger = await make_trigger(client)
    preflight = await anonymous.options(
        path_of(trigger),
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "Content-Type" in preflight.headers["access-control-allow-headers"]
    fired = await anonymous.post(
        path_of(trigger), json={}, headers={"Origin": "https://shop.example"}
    )
    assert fired.headers["access-control-allow-origin"] == "*"
    # Errors are readable by the page too.
    missing = await anonymous.post(f"{API}/workflow/nope/trigger", json={})
    assert missing.status_code == 404
    assert missing.headers["access-control-allow-origin"] == "*"


async def test_bodies_over_a_mebibyte_are_413(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    trigger = await make_trigger(client)
    limit = 1024 * 1024
    at_limit = b'{"Prompt": "' + b"x" * (limit - 14) + b'"}'
    assert len(at_limit) == limit
    over = at_limit[:-2] + b'x"}'
    headers = {"Content-Type": "application/json"}
    accepted = await anonymous.post(path_of(trigger), content=at_limit, headers=headers)
    assert accepted.status_code != 413
    refused = await anonymous.post(path_of(trigger), content=over, headers=headers)
    assert refused.status_code == 413
    assert refused.json()["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(5):
            yield b" " * (limit // 4)

    streamed = await anonymous.post(path_of(trigger), content=chunks(), headers=headers)
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"Prompt=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"Prompt": ', "application/json", 422, "invalid_input"),
        (b'["a list"]', "application/json", 422, "invalid_input"),
        (b'{"Nope": "x"}', "application/json", 422, "invalid_input"),
    ],
)
async def test_bad_bodies_are_refused_with_a_reason(
    client: httpx.AsyncClient,
    anonymous: httpx.AsyncClient,
    content: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    trigger = await make_trigger(client)
    response = await anonymous.post(
        path_of(trigger), content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


async def test_each_trigger_has_its_own_rate_limit(settings: Settings) -> None:
    async with (
        started_runtime(settings, trigger_requests_per_minute=3) as runtime,
        api_client(runtime) as client,
        api_client(runtime, "") as anonymous,
    ):
        first = await make_trigger(client)
        second = await make_trigger(client)
        statuses = [(await anonymous.post(path_of(first), json={})).status_code for _ in range(4)]
        assert statuses == [202, 202, 202, 429]
        refused = await anonymous.post(path_of(first), json={})
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["violatedPolicies"] == ["trigger"]
        assert '"trigger";q=3;w=60' in refused.headers["ratelimit-policy"]
        assert (await anonymous.post(path_of(second), json={})).status_code == 202


async def test_disabled_rotated_and_deleted_triggers_are_404(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    trigger = await make_trigger(client)
    workflow_id = trigger["workflowId"]
    base = f"{API}/workflows/{workflow_id}/triggers/{trigger['webhookId']}"
    off = await client.patch(base, json={"enabled": False})
    assert off.json()["enabled"] is False
    disabled = await anonymous.post(path_of(trigger), json={})
    assert disabled.status_code == 404
    assert disabled.json()["code"] == "not_found"
    await client.patch(base, json={"enabled": True})
    assert (await anonymous.post(path_of(trigger), json={})).status_code == 202

    rotated = (await client.post(f"{base}/rotate")).json()
    assert rotated["webhookId"] != trigger["webhookId"]
    assert (await anonymous.post(path_of(trigger), json={})).status_code == 404
    assert (await anonymous.post(path_of(rotated), json={})).status_code == 202

    new_base = f"{API}/workflows/{workflow_id}/triggers/{rotated['webhookId']}"
    assert (await client.delete(new_base)).status_code == 204
    assert (await anonymous.post(path_of(rotated), json={})).status_code == 404
    assert (await client.get(f"{API}/workflows/{workflow_id}/triggers")).json()["items"] == []


async def test_a_test_keys_trigger_runs_in_test_mode(
    runtime: Runtime, anonymous: httpx.AsyncClient
) -> None:
    test_key = make_key(runtime, scopes=["workflows:write"], mode="test")
    document = linear(seed=None)
    document["nodes"][1]["data"]["params"]["credits"] = 50
    async with api_client(runtime, test_key) as client:
        trigger = await make_trigger(client, document)
        assert trigger["mode"] == "test"
    fired = await anonymous.post(path_of(trigger), json={})
    async with api_client(runtime) as admin:
        record = await poll(admin, fired.json()["executionId"])
        assert record["status"] == "COMPLETED"
        assert record["totals"]["credits"] == 0
        balance = (await admin.get(f"{API}/workspace")).json()["credits"]
        assert balance["balance"] == runtime.settings.bootstrap_credits


async def test_a_senders_webhook_id_or_idempotency_key_starts_one_execution(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    trigger = await make_trigger(client)
    for header in ("webhook-id", "Idempotency-Key"):
        headers = {header: f"evt_{header}"}
        first = await anonymous.post(path_of(trigger), json={"Prompt": "x"}, headers=headers)
        again = await anonymous.post(path_of(trigger), json={"Prompt": "x"}, headers=headers)
        assert first.status_code == again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
    listed = (await client.get(f"{API}/workflows/executions")).json()["items"]
    assert len(listed) == 2


async def test_trigger_ids_are_not_written_to_the_logs_in_full(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    trigger = await make_trigger(client)
    capsys.readouterr()
    await anonymous.post(path_of(trigger), json={})
    await anonymous.post(f"{API}/workflow/{trigger['webhookId']}x/trigger", json={})
    logged = capsys.readouterr()
    assert trigger["webhookId"][:6] in logged.out + logged.err
    assert trigger["webhookId"] not in logged.out + logged.err


async def test_making_and_rotating_a_trigger_is_safe_to_retry(client: httpx.AsyncClient) -> None:
    saved = (await client.post(f"{API}/workflows", json=linear())).json()
    url = f"{API}/workflows/{saved['id']}/triggers"
    made = [(await client.post(url, headers={"Idempotency-Key": "t1"})).json() for _ in range(2)]
    assert made[0] == made[1]
    assert len((await client.get(url)).json()["items"]) == 1
    rotate = f"{url}/{made[0]['webhookId']}/rotate"
    rotated = [await client.post(rotate, headers={"Idempotency-Key": "r1"}) for _ in range(2)]
    assert rotated[0].status_code == rotated[1].status_code == 200
    assert rotated[1].headers["idempotent-replayed"] == "true"
    [current] = (await client.get(url)).json()["items"]
    assert current["webhookId"] == rotated[0].json()["webhookId"]
