"""Every API call as data: what to send and how to read the answer.

`Client` and `AsyncClient` only differ in how they send a `Call`, so each endpoint is
described once, here, and both clients' methods are one line each.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Generic, Literal, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from imagegraph.client.models import (
    Asset,
    Batch,
    BatchCreated,
    BatchItem,
    BatchRetry,
    CreatedKey,
    Delivery,
    Execution,
    ExecutionHandle,
    ExecutionSummary,
    Key,
    Output,
    Page,
    Poll,
    Trigger,
    Usage,
    Validation,
    WebhookEndpoint,
    Workflow,
    WorkflowSummary,
    Workspace,
)
from imagegraph.netguard import parse_retry_after

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

WorkflowSource: TypeAlias = Mapping[str, Any] | Workflow | str | os.PathLike[str]
"""A workflow document (or a `Workflow`), or the path of a .json, .yaml or .yml file."""
UploadSource: TypeAlias = bytes | str | os.PathLike[str]
"""Image bytes, or the path of an image file."""
AssetRef: TypeAlias = str | Output | Asset
"""An asset id, an asset's content URL (an output's `url`), an `Output` or an `Asset`."""
ItemsFile: TypeAlias = str | os.PathLike[str]
"""The path of a batch's items: .csv (first row names the columns), .jsonl or .json."""
ReviewState: TypeAlias = Literal["pending-review", "approved", "rejected"]

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_POLL_WAIT = 60
# Read timeouts of calls the server holds open: a long poll, and an event stream (the
# server sends a comment every 15 s while nothing happens).
_POLL_GRACE = 15.0
_STREAM_READ_TIMEOUT = 60.0
_YAML_SUFFIXES = frozenset({".yaml", ".yml"})
_ASSET_PATH = re.compile(r"/assets/([A-Za-z0-9_]+)/content/?$")
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"))
_ITEM_TYPES = {
    ".csv": "text/csv",
    ".jsonl": "application/jsonl",
    ".ndjson": "application/jsonl",
    ".json": "application/json",
}


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request. `url` is relative to `/api/v1/` unless absolute."""

    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | int] | None = None
    json: Any = None
    content: bytes | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    # Plain fields of a multipart body (sent with `files`).
    data: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    authenticated: bool = True
    read_timeout: float | None = None

    @property
    def repeatable(self) -> bool:
        """Whether sending it twice is harmless: safe methods, and POSTs with a key."""
        return self.method in ("GET", "HEAD", "DELETE") or self.idempotency_key is not None


def build_request(http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
    headers = dict(call.headers)
    if call.idempotency_key is not None:
        headers[IDEMPOTENCY_HEADER] = call.idempotency_key
    timeout: httpx.Timeout | None = None
    if call.read_timeout is not None:
        default = http.timeout
        read = None if default.read is None else max(default.read, call.read_timeout)
        timeout = httpx.Timeout(
            connect=default.connect, read=read, write=default.write, pool=default.pool
        )
    request = http.build_request(
        call.method,
        call.url,
        params=call.params,
        json=call.json,
        content=call.content,
        files=call.files,
        data=call.data,
        headers=headers,
        timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
    )
    if not call.authenticated:
        request.headers.pop("Authorization", None)
    return request


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


# -- reading answers -------------------------------------------------------------------------


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate(response.json())


def _items(cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    return lambda response: [cls.model_validate(item) for item in response.json()["items"]]


def _list(cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    return lambda response: [cls.model_validate(item) for item in response.json()]


def _nothing(response: httpx.Response) -> None:
    return None


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _handle(response: httpx.Response) -> ExecutionHandle:
    replayed = response.headers.get(REPLAYED_HEADER, "").lower() == "true"
    return ExecutionHandle.model_validate({**response.json(), "replayed": replayed})


def _poll_and_advice(response: httpx.Response) -> tuple[Poll, float | None]:
    poll = Poll.model_validate(response.json())
    return poll, parse_retry_after(response.headers.get("retry-after"))


# -- building bodies -------------------------------------------------------------------------


def _path(*segments: str) -> str:
    return "/".join(quote(segment, safe="") for segment in segments)


def _params(**values: str | int | None) -> dict[str, str | int]:
    return {name: value for name, value in values.items() if value is not None}


def document_body(doc: WorkflowSource) -> tuple[bytes, str]:
    """A workflow's body and content type; a path is read, YAML files are sent as YAML."""
    if isinstance(doc, Workflow):
        doc = doc.document()
    if isinstance(doc, Mapping):
        return json.dumps(dict(doc), separators=(",", ":")).encode(), "application/json"
    path = Path(doc)
    data = path.read_bytes()
    if path.suffix.lower() in _YAML_SUFFIXES:
        return data, "application/yaml"
    return data, "application/json"


def upload_file(source: UploadSource, filename: str | None) -> tuple[str, bytes, str]:
    """The multipart `file` part: (filename, bytes, content type)."""
    if isinstance(source, bytes):
        data = source
        name = filename or f"upload{_extension(data)}"
    else:
        path = Path(source)
        data = path.read_bytes()
        name = filename or path.name
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, data, content_type


def _extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "")


def asset_id_of(ref: AssetRef) -> str:
    """The asset id in an id, a content URL, an `Output` or an `Asset`."""
    if isinstance(ref, Output):
        return ref.asset_id
    if isinstance(ref, Asset):
        return ref.id
    if "/" not in ref:
        return ref
    match = _ASSET_PATH.search(httpx.URL(ref).path)
    if match is None:
        raise ValueError(f"not an asset id or asset content URL: {ref!r}")
    return match.group(1)


# -- workflows -------------------------------------------------------------------------------


def create_workflow(doc: WorkflowSource, idempotency_key: str | None) -> Call[Workflow]:
    content, content_type = document_body(doc)
    return Call(
        "POST",
        "workflows",
        _model(Workflow),
        content=content,
        headers={"Content-Type": content_type},
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def get_workflow(workflow_id: str, version: int | None) -> Call[Workflow]:
    return Call(
        "GET", _path("workflows", workflow_id), _model(Workflow), params=_params(version=version)
    )


def list_workflows(limit: int, cursor: str | None) -> Call[Page[WorkflowSummary]]:
    return Call(
        "GET",
        "workflows",
        _model(Page[WorkflowSummary]),
        params=_params(limit=limit, cursor=cursor),
    )


def update_workflow(workflow_id: str, doc: WorkflowSource) -> Call[Workflow]:
    content, content_type = document_body(doc)
    return Call(
        "PUT",
        _path("workflows", workflow_id),
        _model(Workflow),
        content=content,
        headers={"Content-Type": content_type},
    )


def delete_workflow(workflow_id: str) -> Call[None]:
    return Call("DELETE", _path("workflows", workflow_id), _nothing)


def validate_workflow(doc: WorkflowSource) -> Call[Validation]:
    content, content_type = document_body(doc)
    return Call(
        "POST",
        "workflows/validate",
        _model(Validation),
        content=content,
        headers={"Content-Type": content_type},
    )


# -- executions ------------------------------------------------------------------------------


def execute(
    workflow_id: str,
    inputs: Mapping[str, Any] | None,
    nodes: Sequence[Mapping[str, Any]] | None,
    version: int | None,
    webhook_url: str | None,
    idempotency_key: str | None,
) -> Call[ExecutionHandle]:
    body: dict[str, Any] = {"inputs": dict(inputs or {})}
    if nodes:
        body["nodes"] = [dict(n) for n in nodes]
    if version is not None:
        body["version"] = version
    if webhook_url is not None:
        body["webhookUrl"] = webhook_url
    return Call(
        "POST",
        _path("workflows", workflow_id, "execute"),
        _handle,
        json=body,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def poll(execution_id: str, wait: int) -> Call[Poll]:
    wait = min(max(wait, 0), MAX_POLL_WAIT)
    return Call(
        "GET",
        _path("workflows", "executions", execution_id, "poll"),
        _model(Poll),
        headers={"Prefer": f"wait={wait}"} if wait else {},
        read_timeout=wait + _POLL_GRACE if wait else None,
    )


def poll_with_advice(execution_id: str) -> Call[tuple[Poll, float | None]]:
    """A poll that also reads the server's `Retry-After` (when to ask again)."""
    return Call("GET", _path("workflows", "executions", execution_id, "poll"), _poll_and_advice)


def get_execution(execution_id: str) -> Call[Execution]:
    return Call("GET", _path("workflows", "executions", execution_id), _model(Execution))


def list_executions(
    workflow_id: str | None, status: str | None, limit: int, cursor: str | None
) -> Call[Page[ExecutionSummary]]:
    return Call(
        "GET",
        "workflows/executions",
        _model(Page[ExecutionSummary]),
        params=_params(workflowId=workflow_id, status=status, limit=limit, cursor=cursor),
    )


def cancel(execution_id: str) -> Call[ExecutionHandle]:
    return Call("POST", _path("workflows", "executions", execution_id, "cancel"), _handle)


def events(execution_id: str, last_event_id: str | None) -> Call[None]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return Call(
        "GET",
        _path("workflows", "executions", execution_id, "events"),
        _nothing,
        headers=headers,
        read_timeout=_STREAM_READ_TIMEOUT,
    )


# -- assets ----------------------------------------------------------------------------------


def upload_asset(
    source: UploadSource, filename: str | None, idempotency_key: str | None
) -> Call[Asset]:
    return Call(
        "POST",
        "assets",
        _model(Asset),
        files={"file": upload_file(source, filename)},
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def get_asset(asset_id: str) -> Call[Asset]:
    return Call("GET", _path("assets", asset_id), _model(Asset))


def asset_content(asset: AssetRef) -> Call[bytes]:
    return Call("GET", _path("assets", asset_id_of(asset), "content"), _bytes)


def lineage(asset_id: str) -> Call[list[Asset]]:
    return Call("GET", _path("assets", asset_id, "lineage"), _list(Asset))


# -- workspace, credits, usage, keys ---------------------------------------------------------


def workspace() -> Call[Workspace]:
    return Call("GET", "workspace", _model(Workspace))


def usage(start: date | None, end: date | None) -> Call[Usage]:
    params: dict[str, str | int] = {}
    if start is not None:
        params["from"] = start.isoformat()
    if end is not None:
        params["to"] = end.isoformat()
    return Call("GET", "usage", _model(Usage), params=params)


def add_credits(amount: float, note: str | None, idempotency_key: str | None) -> Call[Workspace]:
    body: dict[str, Any] = {"amount": amount}
    if note is not None:
        body["note"] = note
    return Call(
        "POST",
        "credits",
        _model(Workspace),
        json=body,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def create_key(
    name: str,
    scopes: Sequence[str],
    mode: Literal["live", "test"],
    idempotency_key: str | None,
) -> Call[CreatedKey]:
    return Call(
        "POST",
        "keys",
        _model(CreatedKey),
        json={"name": name, "scopes": list(scopes), "mode": mode},
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def list_keys() -> Call[list[Key]]:
    return Call("GET", "keys", _items(Key))


def revoke_key(key_id: str) -> Call[Key]:
    return Call("DELETE", _path("keys", key_id), _model(Key))


# -- triggers --------------------------------------------------------------------------------


def create_trigger(workflow_id: str) -> Call[Trigger]:
    return Call("POST", _path("workflows", workflow_id, "triggers"), _model(Trigger))


def list_triggers(workflow_id: str) -> Call[list[Trigger]]:
    return Call("GET", _path("workflows", workflow_id, "triggers"), _items(Trigger))


def set_trigger_enabled(workflow_id: str, webhook_id: str, enabled: bool) -> Call[Trigger]:
    return Call(
        "PATCH",
        _path("workflows", workflow_id, "triggers", webhook_id),
        _model(Trigger),
        json={"enabled": enabled},
    )


def rotate_trigger(workflow_id: str, webhook_id: str) -> Call[Trigger]:
    return Call(
        "POST", _path("workflows", workflow_id, "triggers", webhook_id, "rotate"), _model(Trigger)
    )


def delete_trigger(workflow_id: str, webhook_id: str) -> Call[None]:
    return Call("DELETE", _path("workflows", workflow_id, "triggers", webhook_id), _nothing)


def fire_trigger(
    url: str, payload: Mapping[str, Any] | None, idempotency_key: str | None
) -> Call[ExecutionHandle]:
    if not httpx.URL(url).is_absolute_url:
        raise ValueError(f"a trigger URL must be absolute: {url!r}")
    return Call(
        "POST",
        url,
        _handle,
        json=dict(payload or {}),
        idempotency_key=idempotency_key or new_idempotency_key(),
        authenticated=False,
    )


# -- webhooks --------------------------------------------------------------------------------


def create_webhook_endpoint(
    url: str, events: Sequence[str], description: str, idempotency_key: str | None
) -> Call[WebhookEndpoint]:
    return Call(
        "POST",
        "webhooks/endpoints",
        _model(WebhookEndpoint),
        json={"url": url, "events": list(events), "description": description},
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def list_webhook_endpoints() -> Call[list[WebhookEndpoint]]:
    return Call("GET", "webhooks/endpoints", _items(WebhookEndpoint))


def webhook_deliveries(
    endpoint_id: str | None, limit: int, cursor: str | None
) -> Call[Page[Delivery]]:
    url = (
        _path("webhooks", "endpoints", endpoint_id, "deliveries")
        if endpoint_id is not None
        else "webhooks/deliveries"
    )
    return Call("GET", url, _model(Page[Delivery]), params=_params(limit=limit, cursor=cursor))


def replay_delivery(delivery_id: str) -> Call[Delivery]:
    return Call("POST", _path("webhooks", "deliveries", delivery_id, "replay"), _model(Delivery))


# -- batches ---------------------------------------------------------------------------------


def create_batch(
    workflow_id: str,
    items: Sequence[Mapping[str, Any]] | None,
    file: ItemsFile | None,
    options: Mapping[str, Any],
    idempotency_key: str | None,
) -> Call[BatchCreated]:
    """Items inline (a JSON body) or a file (multipart: `file`, and `options` as JSON).
    Option names may be snake_case (`runs_per_item`) or the API's camelCase."""
    if (items is None) == (file is None):
        raise ValueError("a batch takes either items or file")
    fields = {"workflowId": workflow_id, **{to_camel(k): v for k, v in options.items()}}
    key = idempotency_key or new_idempotency_key()
    if file is None:
        assert items is not None
        body = {**fields, "items": [dict(item) for item in items]}
        return Call("POST", "batches", _model(BatchCreated), json=body, idempotency_key=key)
    path = Path(file)
    part = (path.name, path.read_bytes(), _ITEM_TYPES.get(path.suffix.lower(), "text/plain"))
    return Call(
        "POST",
        "batches",
        _model(BatchCreated),
        files={"file": part},
        data={"options": json.dumps(fields)},
        idempotency_key=key,
    )


def get_batch(batch_id: str) -> Call[Batch]:
    return Call("GET", _path("batches", batch_id), _model(Batch))


def list_batch_items(
    batch_id: str, status: str | None, limit: int, cursor: str | None
) -> Call[Page[BatchItem]]:
    return Call(
        "GET",
        _path("batches", batch_id, "items"),
        _model(Page[BatchItem]),
        params=_params(status=status, limit=limit, cursor=cursor),
    )


def cancel_batch(batch_id: str) -> Call[Batch]:
    return Call("POST", _path("batches", batch_id, "cancel"), _model(Batch))


def retry_failed(batch_id: str, item_ids: Sequence[int] | None) -> Call[BatchRetry]:
    body = {"itemIds": list(item_ids)} if item_ids is not None else {}
    return Call("POST", _path("batches", batch_id, "retry-failed"), _model(BatchRetry), json=body)


def review_batch(
    batch_id: str,
    state: ReviewState,
    item_ids: Sequence[int] | None,
    asset_ids: Sequence[str] | None,
    current_state: ReviewState | None,
    note: str | None,
) -> Call[int]:
    body: dict[str, Any] = {"state": state}
    if item_ids is not None:
        body["itemIds"] = list(item_ids)
    if asset_ids is not None:
        body["assetIds"] = list(asset_ids)
    if current_state is not None:
        body["currentState"] = current_state
    if note is not None:
        body["note"] = note
    return Call(
        "POST",
        _path("batches", batch_id, "review"),
        lambda response: int(response.json()["updated"]),
        json=body,
    )


def batch_manifest(batch_id: str) -> Call[dict[str, Any]]:
    return Call("GET", _path("batches", batch_id, "manifest"), lambda response: response.json())


def batch_zip(batch_id: str) -> Call[None]:
    """Sent as a stream: the caller writes the body to a file."""
    return Call("GET", _path("batches", batch_id, "export.zip"), _nothing)


def set_review(asset: AssetRef, state: ReviewState, note: str | None) -> Call[Asset]:
    return Call(
        "PATCH",
        _path("assets", asset_id_of(asset)),
        _model(Asset),
        json={"reviewState": state, "reviewNote": note},
    )
