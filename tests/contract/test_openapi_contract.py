"""Contract: the app answers what its OpenAPI document says it answers.

Schemathesis generates requests for every operation of `/openapi.json` (valid ones, and
invalid ones to look for crashes), all with the admin key, and checks every response: no
5xx, and a documented status code, content type, body and headers.

How it runs: the runtime and the app live on the test's event loop, so the worker runs the
executions that requests start; Hypothesis drives each operation from a worker thread and
hands every request back to that loop, to an httpx client of the app. (Schemathesis' own
ASGI transport would serve the app from an event loop of its own, away from the runtime's
tasks.) A few seeded records (a workflow, its finished execution and output, a trigger, a
key, a webhook endpoint and its delivery) give generated requests something to find: each
operation also gets requests whose path names them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegraph.api.app import create_app
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings
from imagegraph.webhooks import Webhooks
from tests.builders import linear

Operation = schemathesis.APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]

BASE_URL = "http://testserver"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Per operation (about 45 of them): some 1100 requests in all.
MAX_EXAMPLES = 25
HYPOTHESIS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same requests on every run, so CI is repeatable
    database=None,  # and no replay of what an earlier local run found
    deadline=None,  # a busy CI machine is slow now and then; that is no breach of contract
    phases=[Phase.generate, Phase.shrink],
    # A slow example is the app's time, not slow generation; schemathesis' strategies
    # filter by design (URL-safe path parameters, ...), and some bodies are large.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
    print_blob=False,
)
# A request taking longer than this hangs: a failure. Event streams are ended sooner (as a
# client closing them would); what they sent until then is checked.
REQUEST_TIMEOUT = 30.0
STREAM_SECONDS = 0.5


# Route bugs this test found, tolerated until the route is fixed. Each is probed with one
# request first; once the probe stops showing the bug, this test fails until the entry goes.
# Generated requests meeting a bug are let through; everything else is still checked.
@dataclass(frozen=True)
class KnownBug:
    operation: str
    status: int  # what the route wrongly answers; 500 also stands for a response broken off
    why: str  # and what to fix
    probe: str  # a URL (with {seeded ids}) the bug shows on, with the operation's method
    applies: Callable[[AnyCase], bool] = lambda case: True  # the generated requests it meets


KNOWN_ROUTE_BUGS: list[KnownBug] = []


# Operations that need no API key (their callers prove themselves otherwise, or need not).
PUBLIC_PATHS = frozenset(
    {"/api/v1/workflow/{webhook_id}/trigger", "/api/v1/providers/{provider}/webhook"}
)


# Random workflows are never valid: these operations also get a valid one, so that their
# success responses are checked too.
VALID_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    "POST /api/v1/workflows": linear,
    "PUT /api/v1/workflows/{workflow_id}": linear,
    "POST /api/v1/workflows/validate": linear,
}

# Webhook URLs of requests all resolve to a public address (so they are accepted) ...
PUBLIC_ADDRESS = "93.184.215.14"


async def _resolve(host: str, port: int) -> list[str]:
    return [PUBLIC_ADDRESS]


def _receiver(request: httpx.Request) -> httpx.Response:
    # ... and deliveries to them end here, never on the network.
    return httpx.Response(204)


@pytest.fixture
async def contract_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A started runtime whose webhooks touch neither DNS nor the network."""
    runtime = Runtime.build(settings)
    webhooks = Webhooks(
        settings, runtime.db, transport=httpx.MockTransport(_receiver), resolver=_resolve
    )
    runtime.webhooks = webhooks
    runtime.engine.bus.on_end(lambda _event: webhooks.wake())
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


class CutEventStreams:
    """ASGI middleware of the test: ends an event stream `seconds` after it starts, as a
    client closing it would; any other response not done in `timeout` raises TimeoutError."""

    def __init__(self, app: ASGIApp, seconds: float, timeout: float) -> None:
        self.app = app
        self.seconds = seconds
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        streaming = ended = False
        try:
            async with asyncio.timeout(self.timeout) as budget:

                async def watching_send(message: Message) -> None:
                    nonlocal streaming, ended
                    if message["type"] == "http.response.start":
                        headers = dict(message.get("headers", []))
                        streaming = headers.get(b"content-type", b"").startswith(
                            b"text/event-stream"
                        )
                        if streaming:
                            budget.reschedule(loop.time() + self.seconds)
                    elif message["type"] == "http.response.body":
                        ended = not message.get("more_body", False)
                    await send(message)

                await self.app(scope, receive, watching_send)
        except TimeoutError:
            if not streaming or ended:
                raise
        if streaming and not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _seed(client: httpx.AsyncClient) -> dict[str, str]:
    """Records for generated requests to find: path parameter -> an id."""

    async def call(method: str, url: str, **kwargs: Any) -> Any:
        response = await client.request(method, url, **kwargs)
        assert response.is_success, (method, url, response.status_code, response.text)
        return response.json()

    endpoint = await call(
        "POST",
        "/api/v1/webhooks/endpoints",
        json={"url": "https://hooks.example.com/in", "events": ["execution.completed"]},
    )
    workflow = await call("POST", "/api/v1/workflows", json=linear())
    execution = await call("POST", f"/api/v1/workflows/{workflow['id']}/execute", json={})
    execution_id = execution["executionId"]
    done = await call(
        "GET", f"/api/v1/workflows/executions/{execution_id}/poll", headers={"Prefer": "wait=20"}
    )
    assert done["status"] == "COMPLETED", done
    trigger = await call("POST", f"/api/v1/workflows/{workflow['id']}/triggers")
    key = await call(
        "POST", "/api/v1/keys", json={"name": "contract", "scopes": ["workflows:read"]}
    )
    deliveries: list[dict[str, Any]] = []
    for _ in range(200):  # the delivery is recorded as the execution ends
        deliveries = (await call("GET", "/api/v1/webhooks/deliveries"))["items"]
        if deliveries:
            break
        await asyncio.sleep(0.05)
    assert deliveries, "no webhook delivery was recorded"
    return {
        "workflow_id": workflow["id"],
        "execution_id": execution_id,
        "asset_id": done["outputs"][0]["assetId"],
        "webhook_id": trigger["webhookId"],
        "key_id": key["id"],  # not the admin key: revoking it would end the run
        "endpoint_id": endpoint["id"],
        "delivery_id": deliveries[0]["id"],
    }


async def _probe(client: httpx.AsyncClient, bug: KnownBug, known: Mapping[str, str]) -> int:
    """The status the bug's probe answers (500 if the app raised: the response broke off)."""
    method = bug.operation.split()[0]
    try:
        response = await client.request(method, bug.probe.format(**known))
    except Exception:
        return 500
    return response.status_code


def _order(operation: Operation) -> tuple[int, str]:
    """Reads (and public triggers) first, then writes; what disables, replaces or removes
    the seeded records last."""
    method = operation.method.lower()
    if method == "delete":
        rank = 3
    elif method == "patch" or operation.path.endswith("/rotate"):
        rank = 2
    elif method in ("get", "options") or operation.path.endswith("/trigger"):
        rank = 0
    else:
        rank = 1
    return rank, operation.label


Sender = Callable[[Mapping[str, Any]], httpx.Response]
_FORWARDED = frozenset({"method", "url", "headers", "params", "cookies", "json", "data", "files"})


def _sender(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> Sender:
    """A blocking `send(kwargs)` for the Hypothesis thread: the requests-style arguments
    that `Case.as_transport_kwargs` gives are encoded by `requests`, then sent on `loop`."""

    def send(kwargs: Mapping[str, Any]) -> httpx.Response:
        assert set(kwargs) <= _FORWARDED, f"not forwarded: {set(kwargs) - _FORWARDED}"
        prepared = requests.Request(**kwargs).prepare()
        headers = {
            name: value if isinstance(value, str) else value.decode("latin-1")
            for name, value in prepared.headers.items()
            if name.lower() != "content-length"  # httpx counts again
        }
        body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
        assert body is None or isinstance(body, bytes), type(body)
        request = client.request(
            prepared.method or "GET", prepared.url or "", headers=headers, content=body
        )
        future = asyncio.run_coroutine_threadsafe(request, loop)
        try:
            return future.result(REQUEST_TIMEOUT + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    return send


def _check_operation(
    operation: Operation,
    known: Mapping[str, str],
    auth: dict[str, str],
    send: Sender,
) -> str | None:
    """Run the operation's examples; what failed, as text, or None."""
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    names = [p.name for p in operation.path_parameters]
    ids = {name: known[name] for name in names if name in known}
    if names and len(ids) == len(names):
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=ids))
    valid_body = VALID_BODIES.get(operation.label)
    if valid_body is not None:
        strategies.append(
            operation.as_strategy(
                GenerationMode.POSITIVE,
                path_parameters=ids or None,
                body=valid_body(),
                media_type="application/json",
            )
        )
    bugs = [bug for bug in KNOWN_ROUTE_BUGS if bug.operation == operation.label]

    @HYPOTHESIS
    @hypothesis.given(case=st.one_of(strategies))
    def run(case: AnyCase) -> None:
        met = [bug.status for bug in bugs if bug.applies(case)]
        try:
            response = send(case.as_transport_kwargs(base_url=BASE_URL, headers=auth))
        except Exception:
            if 500 in met:  # broken off
                return
            raise
        if response.status_code not in met:
            case.validate_response(response, checks=CHECKS, headers=auth)

    try:
        run()
    except FailureGroup as exc:  # a BaseExceptionGroup: what the checks found
        return str(exc)
    except Exception as exc:
        return "".join(traceback.format_exception(exc))
    return None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # HTTP, not storage
async def test_every_response_matches_the_openapi_document(contract_runtime: Runtime) -> None:
    admin_key = contract_runtime.bootstrap_key
    assert admin_key is not None
    auth = {"Authorization": f"Bearer {admin_key}"}
    app = CutEventStreams(
        create_app(runtime=contract_runtime), seconds=STREAM_SECONDS, timeout=REQUEST_TIMEOUT
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=BASE_URL, headers=auth
    ) as client:
        known = await _seed(client)
        fixed = [
            f"== {bug.operation}\n{bug.probe} answers {status}, not {bug.status}: if it is "
            f"fixed, remove it from KNOWN_ROUTE_BUGS ({bug.why})"
            for bug in KNOWN_ROUTE_BUGS
            if (status := await _probe(client, bug, known)) != bug.status
        ]
        document = (await client.get("/openapi.json")).json()
        schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
        operations = []
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                pytest.fail(f"schemathesis cannot use an operation: {result.err()}")
            operations.append(result.ok())
        operations.sort(key=_order)
        send = _sender(asyncio.get_running_loop(), client)

        def check_all() -> list[str]:
            return [
                f"== {operation.label}\n{failure}"
                for operation in operations
                if (failure := _check_operation(operation, known, auth, send))
            ]

        failures = fixed + await asyncio.to_thread(check_all)
    assert not failures, "\n\n".join(failures)


def test_the_document_is_valid_openapi_31_and_declares_problems(tmp_path: Path) -> None:
    document = create_app(settings=Settings(data_dir=tmp_path)).openapi()
    errors = [str(error) for error in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert not errors, errors
    assert "HTTPValidationError" not in json.dumps(document)
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            public = path in PUBLIC_PATHS or not path.startswith("/api/v1/")
            assert operation["security"] == ([] if public else [{"apiKey": []}]), path
            for status, response in operation["responses"].items():
                where = f"{method.upper()} {path}: {status}"
                assert "X-Request-Id" in response["headers"], where
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], where


async def test_a_body_that_cannot_be_parsed_is_a_422_problem(client: httpx.AsyncClient) -> None:
    # Found by the contract: FastAPI and Starlette answered these with an undocumented 400.
    not_utf8 = await client.post(
        "/api/v1/keys", content=b'{"name": "\xff"}', headers={"content-type": "application/json"}
    )
    broken = await client.post(
        "/api/v1/assets",
        content=b"--x\r\nnot a part",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    for response, code in ((not_utf8, "invalid_json"), (broken, "invalid_body")):
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0] == {
            "code": code,
            "message": response.json()["detail"],
            "field": "body",
        }
