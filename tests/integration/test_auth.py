"""API keys, scopes and workspace isolation, through the HTTP API."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from imagegraph import keys
from imagegraph.runtime import Runtime, admin_key_path
from imagegraph.store.tables import api_keys
from tests.builders import linear
from tests.clients import api_client, make_key, make_workspace

API = "/api/v1"


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["requestId"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return body


async def finished(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    response = await client.get(
        f"{API}/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=30"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- bootstrap -------------------------------------------------------------------------------


def test_first_start_writes_a_working_admin_key_readable_only_by_its_owner(
    runtime: Runtime, admin_key: str
) -> None:
    path = admin_key_path(runtime.settings)
    assert path.read_text().strip() == admin_key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys.parse(admin_key) == "live"
    assert admin_key.startswith("sk-live-")


async def test_a_second_start_makes_no_new_key(runtime: Runtime, admin_key: str) -> None:
    again = Runtime.build(runtime.settings, run_worker=False)
    try:
        assert again.bootstrap_key is None
        assert admin_key_path(runtime.settings).read_text().strip() == admin_key
    finally:
        again.db.close()


def test_the_database_holds_no_usable_key(runtime: Runtime, admin_key: str) -> None:
    with runtime.db.read() as conn:
        rows = conn.execute(select(api_keys)).all()
    dump = repr([tuple(r) for r in rows])
    assert admin_key not in dump
    assert admin_key[len("sk-live-") :] not in dump
    [row] = rows
    assert row.key_hash == hashlib.sha256(admin_key.encode()).hexdigest()
    assert row.prefix == admin_key[:12]
    assert row.last4 == admin_key[-4:]


# -- 401 and 403 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer sk-live-" + "A" * 46,  # well formed, wrong checksum
    ],
)
async def test_a_missing_or_malformed_key_is_401(
    anonymous: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await anonymous.get(f"{API}/workflows", headers=headers)
    problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_well_formed_key_that_was_never_issued_is_401(
    anonymous: httpx.AsyncClient,
) -> None:
    made_up = keys.generate("live").secret  # valid checksum, not in the database
    response = await anonymous.get(
        f"{API}/workflows", headers={"Authorization": f"Bearer {made_up}"}
    )
    problem(response, 401, "unauthorized")


async def test_every_api_route_but_the_public_ones_needs_a_key(
    anonymous: httpx.AsyncClient,
) -> None:
    document = (await anonymous.get("/openapi.json")).json()
    checked = 0
    for path, operations in document["paths"].items():
        if not path.startswith(API):
            continue
        for method in operations:
            url = path.replace("{", "").replace("}", "")  # any value will do
            response = await anonymous.request(method.upper(), url)
            if path in (
                f"{API}/workflow/{{webhook_id}}/trigger",  # no key: the id is the credential
                f"{API}/providers/{{provider}}/webhook",  # no key: a provider's signature
            ):
                assert response.status_code != 401 or "signature" in response.text, path
                continue
            assert response.status_code == 401, f"{method} {path}: {response.status_code}"
            checked += 1
    assert checked > 30


async def test_a_revoked_key_is_refused_at_once(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    created = await client.post(
        f"{API}/keys", json={"name": "ci", "scopes": ["workflows:read"], "mode": "live"}
    )
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    async with api_client(runtime, secret) as other:
        assert (await other.get(f"{API}/workflows")).status_code == 200
        revoked = await client.delete(f"{API}/keys/{created.json()['id']}")
        assert revoked.status_code == 200
        assert revoked.json()["revokedAt"]
        problem(await other.get(f"{API}/workflows"), 401, "unauthorized")


async def test_a_read_scoped_key_cannot_write(runtime: Runtime, client: httpx.AsyncClient) -> None:
    reader = make_key(runtime, scopes=["workflows:read"])
    saved = await client.post(f"{API}/workflows", json=linear())
    async with api_client(runtime, reader) as other:
        assert (await other.get(f"{API}/workflows/{saved.json()['id']}")).status_code == 200
        body = problem(await other.post(f"{API}/workflows", json=linear()), 403, "forbidden")
        assert body["requiredScope"] == "workflows:write"
        problem(
            await other.post(f"{API}/workflows/{saved.json()['id']}/execute", json={}),
            403,
            "forbidden",
        )
        problem(await other.get(f"{API}/keys"), 403, "forbidden")


async def test_scopes_grant_what_they_name_and_admin_grants_everything(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    saved = (await client.post(f"{API}/workflows", json=linear())).json()
    executor = make_key(runtime, scopes=["executions:write"])
    async with api_client(runtime, executor) as other:
        executed = await other.post(f"{API}/workflows/{saved['id']}/execute", json={})
        assert executed.status_code == 201, executed.text
        assert (await finished(other, executed.json()["executionId"]))["status"] == "COMPLETED"
        problem(await other.post(f"{API}/workflows", json=linear()), 403, "forbidden")


async def test_key_listing_shows_prefix_and_last_four_never_the_secret(
    client: httpx.AsyncClient, admin_key: str
) -> None:
    created = await client.post(
        f"{API}/keys", json={"name": "render farm", "scopes": ["executions:write"], "mode": "test"}
    )
    secret = created.json()["key"]
    assert secret.startswith("sk-test-")
    assert keys.parse(secret) == "test"
    listing = await client.get(f"{API}/keys")
    assert listing.status_code == 200
    assert secret not in listing.text
    assert admin_key not in listing.text
    entry = next(k for k in listing.json()["items"] if k["name"] == "render farm")
    assert entry["prefix"] == secret[:12]
    assert entry["last4"] == secret[-4:]
    assert entry["mode"] == "test"
    assert entry["scopes"] == ["executions:write"]


async def test_unknown_scopes_and_empty_scope_lists_are_refused(client: httpx.AsyncClient) -> None:
    for scopes in (["root"], []):
        response = await client.post(f"{API}/keys", json={"name": "x", "scopes": scopes})
        body = problem(response, 422, "invalid_request")
        assert any(e["field"].startswith("scopes") for e in body["errors"])


async def test_the_last_admin_key_cannot_be_revoked(client: httpx.AsyncClient) -> None:
    [admin] = list((await client.get(f"{API}/keys")).json()["items"])
    problem(await client.delete(f"{API}/keys/{admin['id']}"), 409, "conflict")


async def test_last_used_is_recorded(runtime: Runtime, client: httpx.AsyncClient) -> None:
    await client.get(f"{API}/workflows")
    [admin] = (await client.get(f"{API}/keys")).json()["items"]
    assert admin["lastUsedAt"] is not None


# -- isolation ---------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_another_workspace_sees_none_of_this_ones_records(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    saved = (await client.post(f"{API}/workflows", json=linear())).json()
    executed = (await client.post(f"{API}/workflows/{saved['id']}/execute", json={})).json()
    execution_id = executed["executionId"]
    outcome = await finished(client, execution_id)
    asset_id = outcome["outputs"][0]["assetId"]
    upload = await client.post(f"{API}/assets", files={"file": ("a.png", png(), "image/png")})
    uploaded = upload.json()["id"]

    _, other_key = make_workspace(runtime)
    async with api_client(runtime, other_key) as other:
        for path in (
            f"/workflows/{saved['id']}",
            f"/workflows/{saved['id']}/versions",
            f"/workflows/{saved['id']}/triggers",
            f"/workflows/executions/{execution_id}",
            f"/workflows/executions/{execution_id}/poll",
            f"/workflows/executions/{execution_id}/events",
            f"/assets/{asset_id}",
            f"/assets/{asset_id}/content",
            f"/assets/{asset_id}/lineage",
            f"/assets/{uploaded}",
        ):
            problem(await other.get(API + path), 404, "not_found")
        for method, path, body in (
            ("PUT", f"/workflows/{saved['id']}", linear()),
            ("DELETE", f"/workflows/{saved['id']}", None),
            ("POST", f"/workflows/{saved['id']}/execute", {}),
            ("POST", f"/workflows/{saved['id']}/triggers", None),
            ("POST", f"/workflows/executions/{execution_id}/cancel", None),
        ):
            problem(await other.request(method, API + path, json=body), 404, "not_found")
        assert (await other.get(f"{API}/workflows")).json()["items"] == []
        assert (await other.get(f"{API}/workflows/executions")).json()["items"] == []
        # An execution there cannot use this workspace's image either.
        own = (
            await other.post(
                f"{API}/workflows",
                json={
                    "name": "uses an image",
                    "nodes": [
                        {
                            "id": "img",
                            "data": {"nodeType": "input:image", "params": {"image": uploaded}},
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
        ).json()
        refused = await other.post(f"{API}/workflows/{own['id']}/execute", json={})
        body = problem(refused, 422, "invalid_input")
        assert body["errors"][0]["code"] == "asset_not_found"
    # Still all there for its owner.
    assert (await client.get(f"{API}/assets/{uploaded}")).status_code == 200


async def test_the_output_cache_is_not_shared_between_workspaces(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    document = linear(seed=11)
    saved = (await client.post(f"{API}/workflows", json=document)).json()
    first = (await client.post(f"{API}/workflows/{saved['id']}/execute", json={})).json()
    await finished(client, first["executionId"])
    _, other_key = make_workspace(runtime)
    async with api_client(runtime, other_key) as other:
        theirs = (await other.post(f"{API}/workflows", json=document)).json()
        run = (await other.post(f"{API}/workflows/{theirs['id']}/execute", json={})).json()
        outcome = await finished(other, run["executionId"])
        record = (await other.get(f"{API}/workflows/executions/{run['executionId']}")).json()
        assert not any(n["cached"] for n in record["nodes"])
        # Its output is its own asset, readable there.
        asset = await other.get(f"{API}/assets/{outcome['outputs'][0]['assetId']}")
        assert asset.status_code == 200
