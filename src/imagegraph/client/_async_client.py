"""`AsyncClient`: the asyncio client, call for call the same as `Client`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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


class AsyncClient:
    """An asyncio client of the imagegraph API, with the same methods as `Client`.

        async with AsyncClient("http://127.0.0.1:8000") as client:
            workflow = await client.create_workflow("examples/linear.json")
            result = await client.run(workflow.id, {"Product": "a ceramic teapot"})
            await client.download(result.outputs[0].url, "teapot.webp")

    It takes the same arguments, except that `transport` is an async one (such as
    `httpx.ASGITransport(app=...)`, to call an app in-process) and `sleep` a coroutine
    function.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int = 3,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        key = api_key if api_key is not None else _default_api_key()
        self._http = httpx.AsyncClient(
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

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- sending -----------------------------------------------------------------------------

    async def _call(self, call: Call[T]) -> T:
        return call.parse(await self._respond(call))

    async def _respond(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """The 2xx response to `call`, after retries; raises the typed error otherwise."""
        retry = 0
        while True:
            request = _calls.build_request(self._http, call)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._retry.after_error(call, exc, retry)
                if delay is None:
                    raise TransportError(f"{call.method} {request.url}: {exc!r}") from exc
            else:
                if response.is_success:
                    return response
                await response.aread()
                delay = self._retry.after_response(call, response, retry)
                if delay is None:
                    raise error_from_response(response)
            await self._sleep(delay)
            retry += 1

    # -- workflows ---------------------------------------------------------------------------

    async def create_workflow(
        self, doc: WorkflowSource, *, idempotency_key: str | None = None
    ) -> Workflow:
        """Save a workflow (a document, or a .json/.yaml file) as version 1."""
        call = await asyncio.to_thread(_calls.create_workflow, doc, idempotency_key)
        return await self._call(call)

    async def get_workflow(self, workflow_id: str, version: int | None = None) -> Workflow:
        """A workflow at its latest version, or at `version`."""
        return await self._call(_calls.get_workflow(workflow_id, version))

    async def list_workflows(
        self, limit: int = 50, cursor: str | None = None
    ) -> Page[WorkflowSummary]:
        """One page of workflows, newest first."""
        return await self._call(_calls.list_workflows(limit, cursor))

    async def iter_workflows(self, page_size: int = 50) -> AsyncIterator[WorkflowSummary]:
        """Every workflow, newest first, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = await self.list_workflows(page_size, cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def update_workflow(self, workflow_id: str, doc: WorkflowSource) -> Workflow:
        """Save `doc` as the workflow's next version."""
        call = await asyncio.to_thread(_calls.update_workflow, workflow_id, doc)
        return await self._call(call)

    async def delete_workflow(self, workflow_id: str) -> None:
        await self._call(_calls.delete_workflow(workflow_id))

    async def validate_workflow(self, doc: WorkflowSource) -> Validation:
        """Check a workflow without saving it; every problem at once."""
        call = await asyncio.to_thread(_calls.validate_workflow, doc)
        return await self._call(call)

    # -- executions --------------------------------------------------------------------------

    async def execute(
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
        return await self._call(call)

    async def poll(self, execution_id: str, wait: int = 0) -> Poll:
        """Status and outputs; with `wait`, the server answers when the execution ends or
        after `wait` seconds (at most 60), whichever comes first."""
        return await self._call(_calls.poll(execution_id, wait))

    async def get_execution(self, execution_id: str) -> Execution:
        """The full record: every node's status, attempts, timing, credits and outputs."""
        return await self._call(_calls.get_execution(execution_id))

    async def list_executions(
        self,
        workflow_id: str | None = None,
        status: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[ExecutionSummary]:
        """One page of executions, newest first, optionally of one workflow or status."""
        return await self._call(_calls.list_executions(workflow_id, status, limit, cursor))

    async def iter_executions(
        self, workflow_id: str | None = None, status: str | None = None, *, page_size: int = 50
    ) -> AsyncIterator[ExecutionSummary]:
        """Every matching execution, newest first, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = await self.list_executions(workflow_id, status, limit=page_size, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, execution_id: str) -> ExecutionHandle:
        """Cancel an execution; `Conflict` if it has already ended."""
        return await self._call(_calls.cancel(execution_id))

    async def wait(self, execution_id: str, timeout: float = 600.0) -> Poll:  # noqa: ASYNC109
        """Poll until the execution ends: after 1 s, then 1.5 times longer each time, at
        most 10 s apart (longer if the server's `Retry-After` asks). Raises `WaitTimeout`
        when it is still running after `timeout` seconds."""
        deadline = self._clock() + timeout
        delay: float | None = None
        while True:
            poll, retry_after = await self._call(_calls.poll_with_advice(execution_id))
            if poll.done:
                return poll
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeout(execution_id, timeout, poll)
            delay = next_wait_delay(delay)
            await self._sleep(min(max(delay, retry_after or 0.0), remaining))

    async def run(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        nodes: Sequence[Mapping[str, Any]] | None = None,
        version: int | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = 600.0,  # noqa: ASYNC109 (the same budget as `Client.run`)
    ) -> Poll:
        """`execute`, then `wait` for the end."""
        handle = await self.execute(
            workflow_id,
            inputs,
            nodes=nodes,
            version=version,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
        )
        return await self.wait(handle.execution_id, timeout)

    async def events(
        self, execution_id: str, after: int | str | None = None
    ) -> AsyncIterator[Event]:
        """The execution's events as they happen (after event id `after`), until the server
        ends the stream, which it does after the execution's last event. A broken connection
        is resumed from the last event received."""
        last_id = None if after is None else str(after)
        retry = 0
        while True:
            call = _calls.events(execution_id, last_id)
            decoder = SSEDecoder(last_id)
            try:
                response = await self._respond(call, stream=True)
                async with contextlib.aclosing(response):
                    async for line in response.aiter_lines():
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
            await self._sleep(delay)
            retry += 1

    # -- assets ------------------------------------------------------------------------------

    async def upload_asset(
        self,
        source: UploadSource,
        filename: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Asset:
        """Upload an image (bytes, or the path of a file)."""
        call = await asyncio.to_thread(_calls.upload_asset, source, filename, idempotency_key)
        return await self._call(call)

    async def get_asset(self, asset_id: str) -> Asset:
        return await self._call(_calls.get_asset(asset_id))

    async def download(self, asset: AssetRef, path: str | Path | None = None) -> bytes:
        """An image's bytes, by asset id, content URL (an output's `url`), `Output` or
        `Asset`; also written to `path` when given."""
        data = await self._call(_calls.asset_content(asset))
        if path is not None:
            await asyncio.to_thread(Path(path).write_bytes, data)
        return data

    async def lineage(self, asset_id: str) -> list[Asset]:
        """The asset and every image it was made from, nearest first."""
        return await self._call(_calls.lineage(asset_id))

    # -- workspace, credits, usage, keys -----------------------------------------------------

    async def workspace(self) -> Workspace:
        """The key's workspace: plan, credits, and the key's own mode and scopes."""
        return await self._call(_calls.workspace())

    async def usage(self, start: date | None = None, end: date | None = None) -> Usage:
        """Executions, images and credits per day and model (the last 30 days by default)."""
        return await self._call(_calls.usage(start, end))

    async def add_credits(
        self, amount: float, note: str | None = None, *, idempotency_key: str | None = None
    ) -> Workspace:
        """Add credits to the workspace (admin)."""
        return await self._call(_calls.add_credits(amount, note, idempotency_key))

    async def create_key(
        self,
        name: str,
        scopes: Sequence[str],
        mode: Literal["live", "test"] = "live",
        *,
        idempotency_key: str | None = None,
    ) -> CreatedKey:
        """Make an API key (admin). Its secret, `.key`, is shown in this answer only."""
        return await self._call(_calls.create_key(name, scopes, mode, idempotency_key))

    async def list_keys(self) -> list[Key]:
        return await self._call(_calls.list_keys())

    async def revoke_key(self, key_id: str) -> Key:
        """Revoke an API key; it stops working at once."""
        return await self._call(_calls.revoke_key(key_id))

    # -- triggers ----------------------------------------------------------------------------

    async def create_trigger(self, workflow_id: str) -> Trigger:
        """Make a public URL that starts the workflow without an API key."""
        return await self._call(_calls.create_trigger(workflow_id))

    async def list_triggers(self, workflow_id: str) -> list[Trigger]:
        return await self._call(_calls.list_triggers(workflow_id))

    async def set_trigger_enabled(
        self, workflow_id: str, webhook_id: str, enabled: bool
    ) -> Trigger:
        return await self._call(_calls.set_trigger_enabled(workflow_id, webhook_id, enabled))

    async def rotate_trigger(self, workflow_id: str, webhook_id: str) -> Trigger:
        """Give the trigger a new URL; the old one stops working at once."""
        return await self._call(_calls.rotate_trigger(workflow_id, webhook_id))

    async def delete_trigger(self, workflow_id: str, webhook_id: str) -> None:
        await self._call(_calls.delete_trigger(workflow_id, webhook_id))

    async def fire_trigger(
        self,
        url: str,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> ExecutionHandle:
        """Start a trigger's workflow with `payload` as inputs, without sending the API key."""
        return await self._call(_calls.fire_trigger(url, payload, idempotency_key))

    # -- webhooks ----------------------------------------------------------------------------

    async def create_webhook_endpoint(
        self,
        url: str,
        events: Sequence[str],
        description: str = "",
        *,
        idempotency_key: str | None = None,
    ) -> WebhookEndpoint:
        """Register a URL for execution events (admin); `.secret` signs the deliveries."""
        return await self._call(
            _calls.create_webhook_endpoint(url, events, description, idempotency_key)
        )

    async def list_webhook_endpoints(self) -> list[WebhookEndpoint]:
        return await self._call(_calls.list_webhook_endpoints())

    async def webhook_deliveries(
        self, endpoint_id: str | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Delivery]:
        """What was sent (to one endpoint, or anywhere), newest first, with every attempt."""
        return await self._call(_calls.webhook_deliveries(endpoint_id, limit, cursor))

    async def replay_delivery(self, delivery_id: str) -> Delivery:
        """Send a delivered or failed delivery again, with the same `webhook-id`."""
        return await self._call(_calls.replay_delivery(delivery_id))

    # -- batches -----------------------------------------------------------------------------

    async def create_batch(
        self,
        workflow_id: str,
        items: Sequence[Mapping[str, Any]] | None = None,
        file: ItemsFile | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> BatchCreated:
        """Start a batch: `items` inline or a .csv/.jsonl/.json `file` (see
        `Client.create_batch` for the options)."""
        call = await asyncio.to_thread(
            _calls.create_batch, workflow_id, items, file, options, idempotency_key
        )
        return await self._call(call)

    async def get_batch(self, batch_id: str) -> Batch:
        """Progress: counts by status, credits, images per minute and ETA."""
        return await self._call(_calls.get_batch(batch_id))

    async def list_batch_items(
        self,
        batch_id: str,
        status: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[BatchItem]:
        """One page of a batch's items in order, optionally only those in `status`."""
        return await self._call(_calls.list_batch_items(batch_id, status, limit, cursor))

    async def batch_items(
        self, batch_id: str, status: str | None = None, *, page_size: int = 200
    ) -> AsyncIterator[BatchItem]:
        """Every item of a batch (in `status`), in order, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = await self.list_batch_items(batch_id, status, limit=page_size, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel pending items and stop running ones; `Conflict` if the batch has ended."""
        return await self._call(_calls.cancel_batch(batch_id))

    async def retry_failed(
        self, batch_id: str, item_ids: Sequence[int] | None = None
    ) -> BatchRetry:
        """Run the failed items again (all, or those named); an ended batch runs again."""
        return await self._call(_calls.retry_failed(batch_id, item_ids))

    async def review_batch(
        self,
        batch_id: str,
        state: ReviewState,
        *,
        item_ids: Sequence[int] | None = None,
        asset_ids: Sequence[str] | None = None,
        current_state: ReviewState | None = None,
        note: str | None = None,
    ) -> int:
        """Set the review state of the batch's outputs; returns how many changed."""
        call = _calls.review_batch(batch_id, state, item_ids, asset_ids, current_state, note)
        return await self._call(call)

    async def batch_manifest(self, batch_id: str) -> dict[str, Any]:
        """The manifest: each item's inputs, output files and how each was made."""
        return await self._call(_calls.batch_manifest(batch_id))

    async def download_batch_zip(self, batch_id: str, path: str | os.PathLike[str]) -> Path:
        """Write the batch's files and manifest, as one zip in the export layout, to
        `path` (streamed; the file appears complete or not at all)."""
        target = Path(path)
        partial = target.with_name(f".{target.name}.part")
        response = await self._respond(_calls.batch_zip(batch_id), stream=True)
        try:
            with partial.open("wb") as handle:
                async for chunk in response.aiter_bytes():
                    handle.write(chunk)
            partial.replace(target)
        finally:
            await response.aclose()
            partial.unlink(missing_ok=True)
        return target

    async def set_review(
        self, asset: AssetRef, state: ReviewState, note: str | None = None
    ) -> Asset:
        """Review one output: `approved`, `rejected` or `pending-review`, with a note."""
        return await self._call(_calls.set_review(asset, state, note))
