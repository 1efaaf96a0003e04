from __future__ import annotations

import httpx

from tests.builders import linear


async def test_create_execute_poll_download(client: httpx.AsyncClient) -> None:
    created = await client.post("/api/v1/workflows", json=linear())
    assert created.status_code == 201, created.text
    workflow_id = created.json()["id"]
    queued = await client.post(
        f"/api/v1/workflows/{workflow_id}/execute", json={"inputs": {"Prompt": "a blue whale"}}
    )
    assert queued.status_code == 201, queued.text
    execution_id = queued.json()["executionId"]
    polled = await client.get(
        f"/api/v1/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=20"}
    )
    body = polled.json()
    assert body["status"] == "COMPLETED", body
    content = await client.get(body["outputs"][0]["url"])
    assert content.status_code == 200
    assert content.content.startswith(b"\x89PNG")
