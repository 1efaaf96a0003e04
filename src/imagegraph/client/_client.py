"""`Client`: the synchronous client."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx

from imagegraph.client import _calls
from imagegraph.client._calls import (
    AssetRef,
    Call,
    ItemsFile,
    ReviewState,
    UploadSource,
    WorkflowSource,
)
from imagegraph.client._config import DEFAULT_BASE_URL, api_base_url, client_headers
from imagegraph.client._config import default_api_key as _default_api_key
from imagegraph.client._retry import RetryPolicy, next_wait_delay
from imagegraph.client._sse import SSEDecoder
from imagegraph.client.errors import TransportError, WaitTimeout, error_from_response
from imagegraph.client.models import (
    Asset,
    Batch,
    BatchCreated,
    BatchItem,
    BatchRetry,
    CreatedKey,
    Delivery,
    Event,
    Execution,
    ExecutionHandle,
    ExecutionSummary,
    Key,
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

T = TypeVar("T")


class Client:
    """A synchronous client of the imagegraph API.

        with Client("http://127.0.0.1:8000") as client:
            workflow = client.create_workflow("examples/linear.json")
            result = client.run(workflow.id, {"Product": "a ceramic teapot"})
            client.download(result.outputs[0].url, "teapot.webp")

    `api_key` defaults to `default_api_key()` ("" sends none). A call is retried up to
    `max_retries` times on connection failures and 429/502/503/504, after the server's
    `Retry-After` or else an exponential backoff with full jitter. Only calls that are
    harmless to repeat are sent again after the server may have acted on them: GET, DELETE,
    and the POSTs that create something, which carry an `Idempotency-Key` (one per call, the
    same on its retries), so a retry never creates a second one. `sleep` and `clock` are what
    the client waits and measures time with.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        key = api_key if api_key is not None else _default_api_key()
        self._http = httpx.Client(
            base_url=api_base_url(base_url),
            headers=client_headers(key),
            timeout=timeout,
            transport=transport,
        )
        self._retry = RetryPolicy(max_retries=max_retries)
        self._sleep = sleep
        self._clock = clock

    @property
    def base_url(self) -> str:
        """The API root requests go to (ends with `/api/v1/`)."""
        return str(self._http.base_url)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------------

    def _call(self, call: Call[T]) -> T:
        return call.parse(self._respond(call))

    def _respond(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """The 2xx response to `call`, after retries; raises the typed error otherwise."""
        retry = 0
        while True:
            request = _calls.build_request(self._http, call)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._retry.after_error(call, exc, retry)
                if delay is None:
                    raise TransportError(f"{call.method} {request.url}: {exc!r}") from exc
            else:
                if response.is_success:
                    return response
                response.read()
                delay = self._retry.after_response(call, response, retry)
                if delay is None:
                    raise error_from_response(response)
            self._sleep(delay)
            retry += 1

    # -- workflows ---------------------------------------------------------------------------

    def create_workflow(
        self, doc: WorkflowSource, *, idempotency_key: str | None = None
    ) -> Workflow:
        """Save a workflow (a document, or a .json/.yaml file) as version 1."""
        return self._call(_calls.create_workflow(doc, idempotency_key))

    def get_workflow(self, workflow_id: str, version: int | None = None) -> Workflow:
        """A workflow at its latest version, or at `version`."""
        return self._call(_calls.get_workflow(workflow_id, version))

    def list_workflows(self, limit: int = 50, cursor: str | None = None) -> Page[WorkflowSummary]:
        """One page of workflows, newest first."""
        return self._call(_calls.list_workflows(limit, cursor))

    def iter_workflows(self, page_size: int = 50) -> Iterator[WorkflowSummary]:
        """Every workflow, newest first, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = self.list_workflows(page_size, cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def update_workflow(self, workflow_id: str, doc: WorkflowSource) -> Workflow:
        """Save `doc` as the workflow's next version."""
        return self._call(_calls.update_workflow(workflow_id, doc))

    def delete_workflow(self, workflow_id: str) -> None:
        self._call(_calls.delete_workflow(workflow_id))

    def validate_workflow(self, doc: WorkflowSource) -> Validation:
        """Check a workflow without saving it; every problem at once."""
        return self._call(_calls.validate_workflow(doc))

    # -- executions --------------------------------------------------------------------------

    def execute(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        nodes: Sequence[Mapping[str, Any]] | None = None,
        version: int | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> ExecutionHandle:
        """Queue an execution. `inputs` are keyed by input node id or label; `nodes` are
        partial nodes (`{"id", "data": {"params"}}`) whose params override the saved ones."""
        call = _calls.execute(workflow_id, inputs, nodes, version, webhook_url, idempotency_key)
        return self._call(call)

    def poll(self, execution_id: str, wait: int = 0) -> Poll:
        """Status and outputs; with `wait`, the server answers when the execution ends or
        after `wait` seconds (at most 60), whichever comes first."""
        return self._call(_calls.poll(execution_id, wait))

    def get_execution(self, execution_id: str) -> Execution:
        """The full record: every node's status, attempts, timing, credits and outputs."""
        return self._call(_calls.get_execution(execution_id))

    def list_executions(
        self,
        workflow_id: str | None = None,
        status: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[ExecutionSummary]:
        """One page of executions, newest first, optionally of one workflow or status."""
        return self._call(_calls.list_executions(workflow_id, status, limit, cursor))

    def iter_executions(
        self, workflow_id: str | None = None, status: str | None = None, *, page_size: int = 50
    ) -> Iterator[ExecutionSummary]:
        """Every matching execution, newest first, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = self.list_executions(workflow_id, status, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, execution_id: str) -> ExecutionHandle:
        """Cancel an execution; `Conflict` if it has already ended."""
        return self._call(_calls.cancel(execution_id))

    def wait(self, execution_id: str, timeout: float = 600.0) -> Poll:
        """Poll until the execution ends: after 1 s, then 1.5 times longer each time, at
        most 10 s apart (longer if the server's `Retry-After` asks). Raises `WaitTimeout`
        when it is still running after `timeout` seconds."""
        deadline = self._clock() + timeout
        delay: float | None = None
        while True:
            poll, retry_after = self._call(_calls.poll_with_advice(execution_id))
            if poll.done:
                return poll
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeout(execution_id, timeout, poll)
            delay = next_wait_delay(delay)
            self._sleep(min(max(delay, retry_after or 0.0), remaining))

    def run(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        nodes: Sequence[Mapping[str, Any]] | None = None,
        version: int | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = 600.0,
    ) -> Poll:
        """`execute`, then `wait` for the end."""
        handle = self.execute(
            workflow_id,
            inputs,
            nodes=nodes,
            version=version,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
        )
        return self.wait(handle.execution_id, timeout)

    def events(self, execution_id: str, after: int | str | None = None) -> Iterator[Event]:
        """The execution's events as they happen (after event id `after`), until the server
        ends the stream, which it does after the execution's last event. A broken connection
        is resumed from the last event received."""
        last_id = None if after is None else str(after)
        retry = 0
        while True:
            call = _calls.events(execution_id, last_id)
            decoder = SSEDecoder(last_id)
            try:
                with contextlib.closing(self._respond(call, stream=True)) as response:
                    for line in response.iter_lines():
                        event = decoder.feed(line)
                        if event is not None:
                            retry = 0
                            yield event
                return
            except httpx.TransportError as exc:
                last_id = decoder.last_id
                delay = self._retry.after_error(call, exc, retry)
                if delay is None:
                    raise TransportError(f"event stream of {execution_id}: {exc!r}") from exc
            self._sleep(delay)
            retry += 1

    # -- assets ------------------------------------------------------------------------------

    def upload_asset(
        self,
        source: UploadSource,
        filename: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Asset:
        """Upload an image (bytes, or the path of a file)."""
        return self._call(_calls.upload_asset(source, filename, idempotency_key))

    def get_asset(self, asset_id: str) -> Asset:
        return self._call(_calls.get_asset(asset_id))

    def download(self, asset: AssetRef, path: str | Path | None = None) -> bytes:
        """An image's bytes, by asset id, content URL (an output's `url`), `Output` or
        `Asset`; also written to `path` when given."""
        data = self._call(_calls.asset_content(asset))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def lineage(self, asset_id: str) -> list[Asset]:
        """The asset and every image it was made from, nearest first."""
        return self._call(_calls.lineage(asset_id))

    # -- workspace, credits, usage, keys -----------------------------------------------------

    def workspace(self) -> Workspace:
        """The key's workspace: plan, credits, and the key's own mode and scopes."""
        return self._call(_calls.workspace())

    def usage(self, start: date | None = None, end: date | None = None) -> Usage:
        """Executions, images and credits per day and model (the last 30 days by default)."""
        return self._call(_calls.usage(start, end))

    def add_credits(
        self, amount: float, note: str | None = None, *, idempotency_key: str | None = None
    ) -> Workspace:
        """Add credits to the workspace (admin)."""
        return self._call(_calls.add_credits(amount, note, idempotency_key))

    def create_key(
        self,
        name: str,
        scopes: Sequence[str],
        mode: Literal["live", "test"] = "live",
        *,
        idempotency_key: str | None = None,
    ) -> CreatedKey:
        """Make an API key (admin). Its secret, `.key`, is shown in this answer only."""
        return self._call(_calls.create_key(name, scopes, mode, idempotency_key))

    def list_keys(self) -> list[Key]:
        return self._call(_calls.list_keys())

    def revoke_key(self, key_id: str) -> Key:
        """Revoke an API key; it stops working at once."""
        return self._call(_calls.revoke_key(key_id))

    # -- triggers ----------------------------------------------------------------------------

    def create_trigger(self, workflow_id: str) -> Trigger:
        """Make a public URL that starts the workflow without an API key."""
        return self._call(_calls.create_trigger(workflow_id))

    def list_triggers(self, workflow_id: str) -> list[Trigger]:
        return self._call(_calls.list_triggers(workflow_id))

    def set_trigger_enabled(self, workflow_id: str, webhook_id: str, enabled: bool) -> Trigger:
        return self._call(_calls.set_trigger_enabled(workflow_id, webhook_id, enabled))

    def rotate_trigger(self, workflow_id: str, webhook_id: str) -> Trigger:
        """Give the trigger a new URL; the old one stops working at once."""
        return self._call(_calls.rotate_trigger(workflow_id, webhook_id))

    def delete_trigger(self, workflow_id: str, webhook_id: str) -> None:
        self._call(_calls.delete_trigger(workflow_id, webhook_id))

    def fire_trigger(
        self,
        url: str,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> ExecutionHandle:
        """Start a trigger's workflow with `payload` as inputs, without sending the API key."""
        return self._call(_calls.fire_trigger(url, payload, idempotency_key))

    # -- webhooks ----------------------------------------------------------------------------

    def create_webhook_endpoint(
        self,
        url: str,
        events: Sequence[str],
        description: str = "",
        *,
        idempotency_key: str | None = None,
    ) -> WebhookEndpoint:
        """Register a URL for execution events (admin); `.secret` signs the deliveries."""
        return self._call(_calls.create_webhook_endpoint(url, events, description, idempotency_key))

    def list_webhook_endpoints(self) -> list[WebhookEndpoint]:
        return self._call(_calls.list_webhook_endpoints())

    def webhook_deliveries(
        self, endpoint_id: str | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Delivery]:
        """What was sent (to one endpoint, or anywhere), newest first, with every attempt."""
        return self._call(_calls.webhook_deliveries(endpoint_id, limit, cursor))

    def replay_delivery(self, delivery_id: str) -> Delivery:
        """Send a delivered or failed delivery again, with the same `webhook-id`."""
        return self._call(_calls.replay_delivery(delivery_id))

    # -- batches -----------------------------------------------------------------------------

    def create_batch(
        self,
        workflow_id: str,
        items: Sequence[Mapping[str, Any]] | None = None,
        file: ItemsFile | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> BatchCreated:
        """Start a batch: `items` inline (input values keyed by input node id or label,
        template variable, `seed` or `<nodeId>.<param>`), or a .csv/.jsonl/.json `file`.
        `options` are the batch's other fields, snake_case or camelCase: `concurrency`,
        `name`, `dedupe`, `runs_per_item`, `seeds` (`{"strategy", "base"}`), `variants`,
        `negative_prompts`, `inputs`, `nodes`, `workflow_version`, `webhook_url`.
        `ValidationFailed.errors` names each bad line or item; nothing is queued then."""
        call = _calls.create_batch(workflow_id, items, file, options, idempotency_key)
        return self._call(call)

    def get_batch(self, batch_id: str) -> Batch:
        """Progress: counts by status, credits, images per minute and ETA."""
        return self._call(_calls.get_batch(batch_id))

    def list_batch_items(
        self,
        batch_id: str,
        status: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[BatchItem]:
        """One page of a batch's items in order, optionally only those in `status`."""
        return self._call(_calls.list_batch_items(batch_id, status, limit, cursor))

    def batch_items(
        self, batch_id: str, status: str | None = None, *, page_size: int = 200
    ) -> Iterator[BatchItem]:
        """Every item of a batch (in `status`), in order, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = self.list_batch_items(batch_id, status, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel pending items and stop running ones; `Conflict` if the batch has ended."""
        return self._call(_calls.cancel_batch(batch_id))

    def retry_failed(self, batch_id: str, item_ids: Sequence[int] | None = None) -> BatchRetry:
        """Run the failed items again (all, or those named); an ended batch runs again."""
        return self._call(_calls.retry_failed(batch_id, item_ids))

    def review_batch(
        self,
        batch_id: str,
        state: ReviewState,
        *,
        item_ids: Sequence[int] | None = None,
        asset_ids: Sequence[str] | None = None,
        current_state: ReviewState | None = None,
        note: str | None = None,
    ) -> int:
        """Set the review state of the batch's outputs (all, or of the items or assets
        named, or only those now in `current_state`); returns how many changed."""
        call = _calls.review_batch(batch_id, state, item_ids, asset_ids, current_state, note)
        return self._call(call)

    def batch_manifest(self, batch_id: str) -> dict[str, Any]:
        """The manifest: each item's inputs, output files and how each was made."""
        return self._call(_calls.batch_manifest(batch_id))

    def download_batch_zip(self, batch_id: str, path: str | os.PathLike[str]) -> Path:
        """Write the batch's files and manifest, as one zip in the export layout, to
        `path` (streamed; the file appears complete or not at all)."""
        target = Path(path)
        partial = target.with_name(f".{target.name}.part")
        try:
            with (
                contextlib.closing(self._respond(_calls.batch_zip(batch_id), stream=True)) as r,
                partial.open("wb") as handle,
            ):
                for chunk in r.iter_bytes():
                    handle.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def set_review(self, asset: AssetRef, state: ReviewState, note: str | None = None) -> Asset:
        """Review one output: `approved`, `rejected` or `pending-review`, with a note."""
        return self._call(_calls.set_review(asset, state, note))


def fire_trigger(
    url: str,
    payload: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    timeout: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> ExecutionHandle:
    """Start a public trigger's workflow: no API key needed, only its URL."""
    with Client(url, api_key="", timeout=timeout, transport=transport) as client:
        return client.fire_trigger(url, payload, idempotency_key=idempotency_key)
