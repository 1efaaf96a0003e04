"""`/api/v1/workflows`: create, read, version, list, delete, validate; errors as problems."""

from __future__ import annotations

import json

import httpx
import yaml

from tests.builders import edge, linear, node, workflow

PROBLEM = "application/problem+json"


async def test_create_returns_201_with_id_and_version(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/workflows", json=linear())
    assert response.status_code == 201
    body = response.json()
    assert body["id"].startswith("wf_")
    assert body["version"] == 1
    assert body["name"] == "linear"
    assert [n["id"] for n in body["nodes"]] == ["prompt", "gen", "out"]
    assert response.headers["location"] == f"/api/v1/workflows/{body['id']}"
    assert response.headers["x-request-id"]


async def test_yaml_body_is_accepted(client: httpx.AsyncClient) -> None:
    document = yaml.safe_dump(linear())
    response = await client.post(
        "/api/v1/workflows", content=document, headers={"content-type": "application/yaml"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["nodes"][1]["data"]["nodeType"] == "generate:sandbox"


async def test_put_creates_a_new_version_and_old_versions_stay(client: httpx.AsyncClient) -> None:
    workflow_id = (await client.post("/api/v1/workflows", json=linear())).json()["id"]
    changed = linear(prompt="a blue bird")
    changed["name"] = "renamed"
    updated = await client.put(f"/api/v1/workflows/{workflow_id}", json=changed)
    assert updated.status_code == 200
    assert updated.json()["version"] == 2
    assert updated.json()["name"] == "renamed"

    latest = (await client.get(f"/api/v1/workflows/{workflow_id}")).json()
    first = (await client.get(f"/api/v1/workflows/{workflow_id}", params={"version": 1})).json()
    assert latest["nodes"][0]["data"]["params"]["text"] == "a blue bird"
    assert first["nodes"][0]["data"]["params"]["text"] == "a red fox in the snow"
    assert first["latestVersion"] == 2

    versions = (await client.get(f"/api/v1/workflows/{workflow_id}/versions")).json()["items"]
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["name"] == "renamed"


async def test_get_workflow_round_trips_through_put(client: httpx.AsyncClient) -> None:
    """A client may PUT back what it GOT, read-only fields included."""
    workflow_id = (await client.post("/api/v1/workflows", json=linear())).json()["id"]
    fetched = (await client.get(f"/api/v1/workflows/{workflow_id}")).json()
    again = await client.put(f"/api/v1/workflows/{workflow_id}", json=fetched)
    assert again.status_code == 200, again.text
    assert again.json()["nodes"] == fetched["nodes"]


async def test_list_is_newest_first_and_paginated(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/api/v1/workflows", json=linear())).json()["id"] for _ in range(3)]
    page = (await client.get("/api/v1/workflows", params={"limit": 2})).json()
    assert [w["id"] for w in page["items"]] == [ids[2], ids[1]]
    assert page["nextCursor"] == ids[1]
    rest = (await client.get("/api/v1/workflows", params={"cursor": page["nextCursor"]})).json()
    assert [w["id"] for w in rest["items"]] == [ids[0]]
    assert rest["nextCursor"] is None


async def test_delete_hides_the_workflow(client: httpx.AsyncClient) -> None:
    workflow_id = (await client.post("/api/v1/workflows", json=linear())).json()["id"]
    assert (await client.delete(f"/api/v1/workflows/{workflow_id}")).status_code == 204
    gone = await client.get(f"/api/v1/workflows/{workflow_id}")
    assert gone.status_code == 404
    assert gone.headers["content-type"] == PROBLEM
    assert (await client.delete(f"/api/v1/workflows/{workflow_id}")).status_code == 404


async def test_unknown_ids_are_404_problems(client: httpx.AsyncClient) -> None:
    for path in (
        "/api/v1/workflows/wf_nope",
        "/api/v1/workflows/wf_nope/versions",
        "/api/v1/workflows/executions/exec_nope",
        "/api/v1/workflows/executions/exec_nope/poll",
        "/api/v1/workflows/executions/exec_nope/events",
        "/api/v1/assets/asset_nope",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert body["status"] == 404
        assert body["code"] == "not_found"
        assert "nope" in body["detail"]
    missing = await client.post("/api/v1/workflows/wf_nope/execute", json={})
    assert missing.status_code == 404


async def test_malformed_json_is_422_naming_the_position(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/workflows",
        content=b'{"name": "x", "nodes": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert "line 1" in response.json()["detail"]
    bad_execute = await client.post(
        "/api/v1/workflows/wf_any/execute",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert bad_execute.status_code == 422
    assert bad_execute.json()["errors"][0]["code"] == "invalid_json"


async def test_invalid_graph_lists_every_problem(client: httpx.AsyncClient) -> None:
    document = workflow(
        [
            node("prompt", "input:text", text="x"),
            node("gen", "generate:sandbox", width=5000),
            node("mystery", "generate:unicorn"),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "out", "image", "text_into_image"),
            edge("gen", "pixels", "out", "image", "bad_port"),
            edge("ghost", "text", "gen", "prompt", "dangling"),
        ],
    )
    response = await client.post("/api/v1/workflows", json=document)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "workflow_invalid"
    found = {(e["code"], e.get("nodeId"), e.get("edgeId")) for e in body["errors"]}
    assert ("unknown_node_type", "mystery", None) in found
    assert ("invalid_param", "gen", None) in found
    assert ("dangling_edge", "ghost", "dangling") in found
    assert ("unknown_port", "gen", "bad_port") in found
    assert ("incompatible_types", "out", "text_into_image") in found
    widths = [e for e in body["errors"] if e["code"] == "invalid_param"]
    assert widths[0]["field"] == "params.width"


async def test_cycle_error_names_the_nodes(client: httpx.AsyncClient) -> None:
    document = workflow(
        [
            node("a", "image:resize"),
            node("b", "image:crop"),
            node("out", "output:image"),
        ],
        [
            edge("a", "image", "b", "image"),
            edge("b", "image", "a", "image"),
            edge("b", "image", "out", "image"),
        ],
    )
    response = await client.post("/api/v1/workflows", json=document)
    assert response.status_code == 422
    cycles = [e for e in response.json()["errors"] if e["code"] == "cycle"]
    assert len(cycles) == 1
    assert "a -> b -> a" in cycles[0]["message"]


async def test_validate_endpoint_does_not_save(client: httpx.AsyncClient) -> None:
    ok = await client.post("/api/v1/workflows/validate", json=linear())
    assert ok.json() == {"valid": True, "errors": []}
    bad = await client.post("/api/v1/workflows/validate", json=workflow([], []))
    assert bad.status_code == 200
    assert bad.json()["valid"] is False
    assert bad.json()["errors"][0]["code"] == "no_output"
    assert (await client.get("/api/v1/workflows")).json()["items"] == []


async def test_wrong_content_type_and_method(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/workflows", content=json.dumps(linear()), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 422
    assert "application/json" in response.json()["detail"]
    not_allowed = await client.patch("/api/v1/workflows")
    assert not_allowed.status_code == 405
    assert not_allowed.headers["content-type"] == PROBLEM


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    echoed = await client.get("/api/v1/nodes", headers={"X-Request-Id": "trace-abc.123"})
    assert echoed.headers["x-request-id"] == "trace-abc.123"
    generated = await client.get("/api/v1/nodes", headers={"X-Request-Id": "bad id with spaces"})
    assert generated.headers["x-request-id"] != "bad id with spaces"
    assert len(generated.headers["x-request-id"]) == 32
    missing = await client.get("/api/v1/workflows/wf_missing")
    assert missing.json()["requestId"] == missing.headers["x-request-id"]


async def test_nodes_catalog_lists_ports_and_param_schemas(client: httpx.AsyncClient) -> None:
    nodes = {n["type"]: n for n in (await client.get("/api/v1/nodes")).json()}
    assert {
        "input:text",
        "prompt:template",
        "generate:sandbox",
        "image:resize",
        "image:crop",
        "upscale:lanczos",
        "convert:format",
        "output:image",
        "control:branch",
        "control:collect",
        "input:number",
        "input:image",
    } <= set(nodes)
    sandbox = nodes["generate:sandbox"]
    assert sandbox["category"] == "generate"
    assert sandbox["version"] == "1.0.0"
    assert {"name": "prompt", "type": "text", "required": True}.items() <= sandbox["inputs"][
        0
    ].items()
    assert sandbox["outputs"] == [{"name": "image", "type": "image"}]
    width = sandbox["params"]["properties"]["width"]
    assert (width["minimum"], width["maximum"]) == (64, 2048)
    assert nodes["input:text"]["outputs"] == [{"name": "text", "type": "text"}]
    assert nodes["output:image"]["inputs"][0]["name"] == "image"


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = (await client.get("/readyz")).json()
    assert ready["checks"] == {"database": "ok", "worker": "ok"}
    spec = (await client.get("/openapi.json")).json()
    assert "/api/v1/workflows/{workflow_id}/execute" in spec["paths"]
    assert "WorkflowDoc" in spec["components"]["schemas"]
    assert (await client.get("/docs")).status_code == 200
