"""Outbound webhooks: signed, delivered from the outbox, retried, logged, replayable.

Deliveries go to a real HTTP server in the test process that verifies each signature with
the `standardwebhooks` library.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.store.tables import webhook_deliveries
from imagegraph.webhooks import JITTER, retry_delay, sign
from tests.builders import linear
from tests.clients import api_client, make_key, make_workspace, started_runtime
from tests.receiver import Answer, Receiver

API = "/api/v1"
SCHEDULE = [0.3, 0.6, 1.2]


@contextlib.asynccontextmanager
async def started(settings: Settings, **overrides: Any) -> AsyncIterator[Runtime]:
    values = {
        "allow_private_webhooks": True,
        "webhook_retry_seconds": SCHEDULE,
        "webhook_timeout_seconds": 1.0,
        **overrides,
    }
    async with started_runtime(settings, **values) as runtime:
        yield runtime


async def endpoint(
    client: httpx.AsyncClient, receiver: Receiver, events: list[str] | None = None
) -> dict[str, Any]:
    response = await client.post(
        f"{API}/webhooks/endpoints",
        json={"url": receiver.url, "events": events or ["execution.completed"]},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    receiver.secret = body["secret"]
    return body


async def execute(client: httpx.AsyncClient, document: dict[str, Any], **body: Any) -> str:
    saved = await client.post(f"{API}/workflows", json=document)
    started = await client.post(f"{API}/workflows/{saved.json()['id']}/execute", json=body)
    assert started.status_code == 201, started.text
    execution_id: str = started.json()["executionId"]
    return execution_id


async def arrivals(receiver: Receiver, count: int) -> list[Any]:
    return await asyncio.to_thread(receiver.wait_for, count)


async def delivery_log(client: httpx.AsyncClient, endpoint_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"{API}/webhooks/endpoints/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def settled(client: httpx.AsyncClient, endpoint_id: str, state: str) -> dict[str, Any]:
    for _ in range(100):
        log = await delivery_log(client, endpoint_id)
        if log and log[0]["state"] == state:
            return log[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"delivery never became {state}: {log}")


def test_signatures_follow_standard_webhooks() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    when = datetime.now(UTC)
    body = '{"type":"execution.completed"}'
    headers = sign(secret, "evt_1", when, body)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == str(int(when.timestamp()))
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"type": "execution.completed"}
    for bad_body, bad_headers, bad_secret in (
        (body + " ", headers, secret),  # tampered body
        (body, sign(secret, "evt_1", when - timedelta(seconds=301), body), secret),  # old
        (body, headers, "whsec_" + base64.b64encode(b"x" * 32).decode()),  # wrong secret
    ):
        with pytest.raises(WebhookVerificationError):
            Webhook(bad_secret).verify(bad_body, bad_headers)


def test_retry_delays_follow_the_schedule_within_the_jitter() -> None:
    schedule = [5.0, 300.0, 1800.0]
    for attempt, base in enumerate(schedule, start=1):
        for _ in range(200):
            delay = retry_delay(schedule, attempt, None)
            assert delay is not None
            assert base * (1 - JITTER) <= delay <= base * (1 + JITTER)
    assert retry_delay(schedule, 4, None) is None
    assert retry_delay(schedule, 1, 60.0) == 60.0  # a longer Retry-After wins


async def test_an_endpoint_hears_of_each_completed_execution_signed_with_its_secret(
    settings: Settings,
) -> None:
    with Receiver() as receiver:
        async with started(settings) as runtime, api_client(runtime) as client:
            registered = await endpoint(client, receiver)
            assert registered["secret"].startswith("whsec_")
            assert len(base64.b64decode(registered["secret"][6:])) == 32
            execution_id = await execute(client, linear())
            [received] = await arrivals(receiver, 1)
            assert received.error is None, received.error
            assert received.headers["webhook-id"].startswith("evt_")
            assert received.headers["content-type"] == "application/json"
            payload = received.verified
            assert payload["type"] == "execution.completed"
            assert payload["data"]["executionId"] == execution_id
            assert payload["data"]["status"] == "COMPLETED"
            assert len(received.body) < 20_000
            delivered = await settled(client, registered["id"], "delivered")
            assert delivered["id"] == received.headers["webhook-id"]
            assert [a["statusCode"] for a in delivered["attemptLog"]] == [200]
            # The secret is shown to admins, not in listings.
            listed = (await client.get(f"{API}/webhooks/endpoints")).json()["items"]
            assert listed[0]["secret"] is None


async def test_failures_are_retried_with_backoff_under_one_webhook_id(settings: Settings) -> None:
    answers = [Answer(500), Answer(503), Answer(502)]
    with Receiver(answers) as receiver:
        async with started(settings) as runtime, api_client(runtime) as client:
            registered = await endpoint(client, receiver)
            await execute(client, linear())
            received = await arrivals(receiver, 4)
            assert [r.status for r in received] == [500, 503, 502, 200]
            assert len({r.headers["webhook-id"] for r in received}) == 1
            assert all(r.error is None for r in received)
            gaps = [b.at - a.at for a, b in itertools.pairwise(received)]
            for gap, base in zip(gaps, SCHEDULE, strict=True):
                # At least the jittered wait; at most that plus a poll of the dispatcher.
                assert base * (1 - JITTER) - 0.05 <= gap <= base * (1 + JITTER) + 1.5
            delivered = await settled(client, registered["id"], "delivered")
            assert [a["statusCode"] for a in delivered["attemptLog"]] == [500, 503, 502, 200]
            assert delivered["attempts"] == 4


async def test_timeouts_count_as_failures(settings: Settings) -> None:
    with Receiver([Answer(200, delay=2.0)]) as receiver:
        async with started(settings) as runtime, api_client(runtime) as client:
            registered = await endpoint(client, receiver)
            await execute(client, linear())
            await arrivals(receiver, 2)
            delivered = await settled(client, registered["id"], "delivered")
            first, second = delivered["attemptLog"]
            assert first["statusCode"] is None
            assert "no answer within" in first["error"]
            assert second["statusCode"] == 200


async def test_redirects_are_never_followed_and_the_last_failure_is_final(
    settings: Settings,
) -> None:
    answers = [Answer(302, headers={"Location": "/elsewhere"})] * 2
    with Receiver(answers) as receiver:
        async with (
            started(settings, webhook_retry_seconds=[0.2]) as runtime,
            api_client(runtime) as client,
        ):
            registered = await endpoint(client, receiver)
            await execute(client, linear())
            failed = await settled(client, registered["id"], "failed")
            assert [a["statusCode"] for a in failed["attemptLog"]] == [302, 302]
            assert "redirects are not followed" in failed["lastError"]
            assert {r.path for r in receiver} == {"/hook"}  # /elsewhere never asked
            # A failed delivery can be sent again by hand.
            replayed = await client.post(f"{API}/webhooks/deliveries/{failed['id']}/replay")
            assert replayed.status_code == 202
            again = await arrivals(receiver, 3)
            assert again[2].headers["webhook-id"] == failed["id"]
            assert (await settled(client, registered["id"], "delivered"))["id"] == failed["id"]


async def test_410_gone_disables_the_endpoint(settings: Settings) -> None:
    with Receiver([Answer(410)]) as receiver:
        async with started(settings) as runtime, api_client(runtime) as client:
            registered = await endpoint(client, receiver)
            await execute(client, linear())
            failed = await settled(client, registered["id"], "failed")
            assert [a["statusCode"] for a in failed["attemptLog"]] == [410]
            current = (await client.get(f"{API}/webhooks/endpoints/{registered['id']}")).json()
            assert current["enabled"] is False
            assert "410" in current["disabledReason"]
            await execute(client, linear(prompt="after"))
            await asyncio.sleep(0.5)
            assert len(receiver.received) == 1
            assert len(await delivery_log(client, registered["id"])) == 1


async def test_endpoints_get_only_the_events_they_asked_for(settings: Settings) -> None:
    with Receiver() as receiver:
        async with started(settings) as runtime, api_client(runtime) as client:
            await endpoint(client, receiver, ["execution.failed"])
            await execute(client, linear())  # completes: not announced
            failing = await execute(
                client,
                {
                    "name": "fails",
                    "nodes": [
                        {
                            "id": "img",
                            "data": {
                                "nodeType": "input:image",
                                "params": {"image": "data:image/png;base64,aGVsbG8="},
                            },
                        },
                        {"id": "out", "data": {"nodeType": "output:image", "params": {}}},
                    ],
                    "edges": [
                        {
                            "source": "img",
                            "sourceHandle": "image",
                            "target": "out",
                            "targetHandle": "image",
                        }
                    ],
                },
            )
            [received] = await arrivals(receiver, 1)
            assert received.verified["type"] == "execution.failed"
            assert received.verified["data"]["executionId"] == failing
            await asyncio.sleep(0.3)
            assert len(receiver.received) == 1


async def test_an_executions_own_webhook_url_is_signed_with_the_workspace_secret(
    settings: Settings,
) -> None:
    with Receiver() as receiver:
        async with started(settings) as runtime, api_client(runtime) as client:
            receiver.secret = (await client.get(f"{API}/webhooks/secret")).json()["secret"]
            execution_id = await execute(client, linear(), webhookUrl=receiver.url)
            [received] = await arrivals(receiver, 1)
            assert received.error is None, received.error
            assert received.verified["data"]["executionId"] == execution_id
            log = (await client.get(f"{API}/webhooks/deliveries")).json()["items"]
            assert log[0]["endpointId"] is None
            assert log[0]["url"] == receiver.url


async def test_private_addresses_are_refused_unless_allowed(settings: Settings) -> None:
    async with (
        started(settings, allow_private_webhooks=False) as runtime,
        api_client(runtime) as client,
    ):
        for url in ("http://127.0.0.1:9/hook", "http://[::1]/hook", "http://169.254.169.254/"):
            response = await client.post(
                f"{API}/webhooks/endpoints", json={"url": url, "events": ["execution.failed"]}
            )
            assert response.status_code == 422, url
            assert "IMAGEGRAPH_ALLOW_PRIVATE_WEBHOOKS" in response.json()["detail"]
        saved = await client.post(f"{API}/workflows", json=linear())
        refused = await client.post(
            f"{API}/workflows/{saved.json()['id']}/execute",
            json={"webhookUrl": "http://10.0.0.1/hook"},
        )
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["field"] == "webhookUrl"
        bad_scheme = await client.post(
            f"{API}/webhooks/endpoints", json={"url": "ftp://x/", "events": ["execution.failed"]}
        )
        assert bad_scheme.status_code == 422


async def test_a_delivery_cut_off_by_a_dying_dispatcher_is_sent_again(settings: Settings) -> None:
    with Receiver([Answer(200, delay=3.0)]) as receiver:
        async with (
            started(settings, webhook_timeout_seconds=10.0) as first,
            api_client(first) as client,
        ):
            key = first.bootstrap_key
            registered = await endpoint(client, receiver)
            await execute(client, linear())
            await arrivals(receiver, 1)
            # The server stops while the receiver is still answering.
        async with started(settings, webhook_timeout_seconds=10.0) as second:
            with second.db.write() as conn:
                state = conn.execute(select(webhook_deliveries.c.state)).scalar()
                assert state == "sending"
                # Time passes: the lease of the dead sender runs out.
                conn.execute(
                    update(webhook_deliveries).values(
                        lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)
                    )
                )
            second.webhooks.wake()
            received = await arrivals(receiver, 2)
            assert received[0].headers["webhook-id"] == received[1].headers["webhook-id"]
            async with api_client(second, key) as client:
                delivered = await settled(client, registered["id"], "delivered")
                assert delivered["attempts"] == 2


async def test_endpoints_are_admin_only_and_per_workspace(settings: Settings) -> None:
    async with started(settings) as runtime:
        writer = make_key(runtime, scopes=["workflows:write"])
        async with api_client(runtime, writer) as client:
            assert (await client.get(f"{API}/webhooks/endpoints")).status_code == 403
        _, other = make_workspace(runtime)
        async with api_client(runtime) as mine, api_client(runtime, other) as theirs:
            created = await mine.post(
                f"{API}/webhooks/endpoints",
                json={"url": "http://127.0.0.1:9/x", "events": ["execution.completed"]},
            )
            assert created.status_code == 201
            endpoint_id = created.json()["id"]
            for path in (f"/endpoints/{endpoint_id}", f"/endpoints/{endpoint_id}/deliveries"):
                assert (await theirs.get(f"{API}/webhooks{path}")).status_code == 404
            assert (await theirs.get(f"{API}/webhooks/endpoints")).json()["items"] == []
            assert (
                await theirs.delete(f"{API}/webhooks/endpoints/{endpoint_id}")
            ).status_code == 404
