"""A batch whose provider fails for a third of the items: those items end in the failed list
with the error and their inputs, the rest complete, and retrying the failed ones finishes
the batch without paying twice for any item that had succeeded."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from imagegraph.settings import Settings
from imagegraph.testing.fakes.server import FakeProvider, Fault
from tests.integration.test_provider_runs import fakes, generating, servers, serving

__all__ = ["fakes", "servers"]  # the fixtures this module uses

pytestmark = pytest.mark.asyncio
API = "/api/v1"


async def _ended(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        body: dict[str, Any] = (await client.get(f"{API}/batches/{batch_id}")).json()
        if body["status"] != "RUNNING":
            return body
        assert loop.time() < deadline, body
        await asyncio.sleep(0.05)


async def test_a_provider_failing_for_a_third_of_the_items(
    settings: Settings, fakes: dict[str, FakeProvider]
) -> None:
    fal = fakes["fal"]
    # The first three submits are refused for good (400: no retry); the batch runs one item
    # at a time, so items 0, 1 and 2 are the ones that fail.
    fal.faults.add(
        "submit",
        Fault(status=400, body={"detail": "the model is unavailable for this input"}, times=3),
    )
    async with serving(settings, fal) as (_, client):
        saved = await client.post(
            f"{API}/workflows", json=generating("generate:flux_dev", width=256, height=256)
        )
        items = [{"prompt": f"product shot {i}"} for i in range(9)]
        created = await client.post(
            f"{API}/batches",
            json={"workflowId": saved.json()["id"], "items": items, "concurrency": 1},
        )
        assert created.status_code == 201, created.text
        batch_id = created.json()["batchId"]
        body = await _ended(client, batch_id)
        assert body["status"] == "COMPLETED"
        assert body["counts"]["failed"] == 3
        assert body["counts"]["completed"] == 6
        assert fal.accepted == 6

        failed = (
            await client.get(f"{API}/batches/{batch_id}/items", params={"status": "FAILED"})
        ).json()["items"]
        assert [i["index"] for i in failed] == [0, 1, 2]
        assert failed[0]["inputs"] == {"prompt": "product shot 0"}
        assert failed[0]["error"]["code"] == "node_failed"
        assert "unavailable" in failed[0]["error"]["message"]

        # Retry one on its own, then the rest.
        one = await client.post(
            f"{API}/batches/{batch_id}/retry-failed", json={"itemIds": [failed[0]["itemId"]]}
        )
        assert one.json()["retried"] == 1
        assert one.json()["batch"]["status"] == "RUNNING"
        await _ended(client, batch_id)
        rest = await client.post(f"{API}/batches/{batch_id}/retry-failed")
        assert rest.json()["retried"] == 2
        body = await _ended(client, batch_id)
        assert body["counts"] == {
            "total": 9,
            "pending": 0,
            "running": 0,
            "completed": 9,
            "failed": 0,
            "cancelled": 0,
            "deduplicated": 0,
        }
        # Only the failed items ran again: nine paid jobs for nine items.
        assert fal.accepted == 9
        items_now = (await client.get(f"{API}/batches/{batch_id}/items")).json()["items"]
        assert [i["attempts"] for i in items_now] == [2, 2, 2, 1, 1, 1, 1, 1, 1]
        unknown = await client.post(
            f"{API}/batches/{batch_id}/retry-failed", json={"itemIds": [999_999]}
        )
        assert unknown.status_code == 404
