"""`/batches`: run a workflow over many items, follow it, review and deliver its images.

`POST /batches` takes the items inline (JSON) or as an uploaded CSV / JSON Lines file
(multipart/form-data: `file`, plus `options` as a JSON object of the same fields as the
JSON body). Progress is one row read (`GET /batches/{id}`); items page by id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse

from imagegraph.api.auth import CanExecute, CanRead, CanWrite
from imagegraph.api.deps import MAX_ID, BaseUrlDep, CursorQuery, LimitQuery, RuntimeDep
from imagegraph.api.idempotency import Idempotency, IdempotencyKeyHeader, idempotent
from imagegraph.api.schemas import ApiModel, RequestModel, json_response
from imagegraph.batches import manifest as manifests
from imagegraph.batches.expand import BatchOptions, Item
from imagegraph.batches.sources import from_list as items_from_list
from imagegraph.batches.sources import guess_format, read_items
from imagegraph.errors import InvalidInput, Issue, PayloadTooLarge, UnsupportedMediaType
from imagegraph.runtime import Runtime
from imagegraph.store import batches as store
from imagegraph.store.batches import ItemStatus

router = APIRouter(prefix="/batches", tags=["batches"])

ReviewState = Literal["pending-review", "approved", "rejected"]
ItemStatusQuery = Annotated[ItemStatus | None, Query(description="Only items in this status.")]


class BatchCreate(BatchOptions):
    """A batch with its items inline."""

    items: list[dict[str, Any]] = Field(
        description="Input values per item, keyed by input node id or label, template "
        "variable, `seed`, or `<nodeId>.<param>`.",
        examples=[[{"Prompt": "a red fox"}, {"Prompt": "a blue heron"}]],
    )


class BatchCreated(ApiModel):
    batch_id: str
    status: str
    total: int
    deduplicated: int


class Counts(ApiModel):
    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int
    deduplicated: int


class BatchOut(ApiModel):
    batch_id: str
    name: str
    status: str
    workflow_id: str
    workflow_version: int
    mode: str
    concurrency: int
    counts: Counts
    progress: float = Field(description="Share of items ended (0 to 1).")
    credits: float
    images_per_minute: float | None = None
    eta_seconds: float | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    options: dict[str, Any]


class BatchList(ApiModel):
    items: list[BatchOut]
    next_cursor: str | None = None


class ItemOutput(ApiModel):
    asset_id: str
    node_id: str | None = None
    url: str
    review_state: str | None = None
    quality: dict[str, Any] | None = None


class ItemOut(ApiModel):
    item_id: int
    index: int
    variant: str | None = None
    run: int
    inputs: dict[str, Any]
    seed: int | None = None
    status: str
    execution_id: str | None = None
    duplicate_of: int | None = None
    attempts: int
    error: dict[str, Any] | None = None
    credits: float
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outputs: list[ItemOutput]


class ItemList(ApiModel):
    items: list[ItemOut]
    next_cursor: str | None = None


class RetryRequest(RequestModel):
    item_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        default=None, max_length=10_000, description="Only these failed items (default: all)."
    )


class RetryOut(ApiModel):
    retried: int
    batch: BatchOut


class ReviewRequest(RequestModel):
    state: ReviewState
    item_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        default=None, max_length=10_000
    )
    asset_ids: list[Annotated[str, Field(max_length=40)]] | None = Field(
        default=None, max_length=10_000
    )
    current_state: ReviewState | None = Field(
        default=None, description="Only outputs now in this state."
    )
    note: str | None = Field(default=None, max_length=2000)


class ReviewOut(ApiModel):
    updated: int


class ExportRequest(RequestModel):
    directory: str | None = Field(
        default=None,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        description="A folder under the server's export directory (IMAGEGRAPH_EXPORT_DIR).",
    )


class ExportOut(ApiModel):
    path: str
    files: int


class CompareRow(ApiModel):
    index: int
    run: int
    seed: int | None = None
    inputs: dict[str, Any]
    variants: dict[str, ItemOut]


class CompareOut(ApiModel):
    variants: list[str]
    rows: list[CompareRow]
    summary: dict[str, dict[str, Any]]


def batch_out(row: Mapping[Any, Any], now: datetime | None = None) -> BatchOut:
    now = now or datetime.now(UTC)
    total = row["total"]
    ended = row["completed"] + row["failed"] + row["cancelled"]
    per_minute = eta = None
    started, finished = row["started_at"], row["finished_at"]
    if started is not None:
        elapsed = max(((finished or now) - started).total_seconds(), 1e-3)
        per_minute = round(row["completed"] / elapsed * 60, 3)
        rate = (row["completed"] + row["failed"]) / elapsed
        remaining = row["pending"] + row["running"]
        if row["status"] == store.BatchStatus.RUNNING.value and rate > 0:
            eta = round(remaining / rate, 1)
        elif remaining == 0:
            eta = 0.0
    return BatchOut(
        batch_id=row["id"],
        name=row["name"],
        status=row["status"],
        workflow_id=row["workflow_id"],
        workflow_version=row["workflow_version"],
        mode=row["mode"],
        concurrency=row["concurrency"],
        counts=Counts(**manifests.counts(row)),
        progress=round(ended / total, 6) if total else 1.0,
        credits=round(row["credits"], 6),
        images_per_minute=per_minute,
        eta_seconds=eta,
        created_at=row["created_at"],
        started_at=started,
        finished_at=finished,
        options={k: v for k, v in row["options"].items() if k != "negativeText"},
    )


def item_out(row: Mapping[Any, Any], outputs: Mapping[str, list[Any]], base_url: str) -> ItemOut:
    found = outputs.get(row["execution_id"] or "", [])
    return ItemOut(
        item_id=row["id"],
        index=row["item_index"],
        variant=row["variant"] or None,
        run=row["run"],
        inputs=row["inputs"],
        seed=row["seed"],
        status=row["status"],
        execution_id=row["execution_id"],
        duplicate_of=row["duplicate_of"],
        attempts=row["attempts"],
        error=row["error"],
        credits=round(row["credits"], 6),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        outputs=[
            ItemOutput(
                asset_id=a["id"],
                node_id=a["node_id"],
                url=f"{base_url.rstrip('/')}/api/v1/assets/{a['id']}/content",
                review_state=a["review_state"],
                quality=a["quality"],
            )
            for a in found
        ],
    )


_CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "options"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "CSV (first row names the columns) or JSON Lines",
                    },
                    "options": {
                        "type": "string",
                        "description": "JSON object: the fields of BatchCreate except items",
                    },
                },
            }
        },
    },
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchCreated,
    summary="Start a batch: items inline (JSON) or as a CSV / JSON Lines file (multipart)",
    openapi_extra={"requestBody": _CREATE_BODY},
    responses={
        402: {"description": "The workspace's credits do not cover the batch"},
        404: {"description": "No such workflow"},
        413: {"description": "File larger than IMAGEGRAPH_MAX_UPLOAD_BYTES"},
        415: {"description": "Neither JSON nor multipart/form-data"},
        422: {"description": "Bad items (each named by line or index) or options"},
    },
)
async def create_batch(
    runtime: RuntimeDep,
    principal: CanExecute,
    request: Request,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        options, items, print_ = await _from_upload(runtime, request)
    elif kind in ("application/json", ""):
        body = await request.body()
        options, items, print_ = _from_json(body)
    else:
        raise UnsupportedMediaType(
            f"send the batch as application/json or multipart/form-data, not {kind}"
        )
    if options.webhook_url is not None:
        await runtime.webhooks.check_url(options.webhook_url, field="webhookUrl")
    idempotency = Idempotency.of(
        runtime,
        principal.workspace_id,
        idempotency_key,
        hashlib.sha256(f"POST {request.url.path}\n".encode() + print_).hexdigest(),
    )

    async def create() -> Response:
        batch_id = await runtime.batches.create(
            principal.workspace_id, principal.mode, options, items
        )
        row = await runtime.db.run(store.get_batch, runtime.db, principal.workspace_id, batch_id)
        return json_response(
            BatchCreated(
                batch_id=batch_id,
                status=row["status"],
                total=row["total"],
                deduplicated=row["deduplicated"],
            ),
            status_code=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/batches/{batch_id}"},
        )

    return await idempotent(idempotency, create)


def _from_json(body: bytes) -> tuple[BatchOptions, list[Item], bytes]:
    try:
        raw = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput("the body must be a JSON object with workflowId and items")
    try:
        request = BatchCreate.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(_located(exc.errors(), "body")) from None
    options = BatchOptions.model_validate(request.model_dump(exclude={"items"}))
    print_ = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    return options, items_from_list(request.items), print_


async def _from_upload(
    runtime: Runtime, request: Request
) -> tuple[BatchOptions, list[Item], bytes]:
    limit = runtime.settings.max_upload_bytes
    try:
        form = await request.form(max_files=1, max_fields=10)
    except Exception as exc:  # the multipart parser's own errors
        raise InvalidInput(f"the multipart body cannot be read: {exc}") from None
    try:
        upload = form.get("file")
        raw_options = form.get("options")
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                "multipart batch needs a `file` part (CSV or JSON Lines)",
                [Issue("missing_field", "file is required", field="file")],
            )
        data = await upload.read(limit + 1)
        name = upload.filename or "file"
        fmt = guess_format(upload.filename, upload.content_type)
    finally:
        await form.close()
    if len(data) > limit:
        raise PayloadTooLarge(
            f"file is larger than the upload limit of {limit} bytes", limitBytes=limit
        )
    if not isinstance(raw_options, str):
        raise InvalidInput(
            "multipart batch needs an `options` part: a JSON object with at least workflowId",
            [Issue("missing_field", "options is required", field="options")],
        )
    try:
        parsed = json.loads(raw_options)
        options = BatchOptions.model_validate(parsed)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"options is not valid JSON: {exc}",
            [Issue("invalid_json", str(exc), field="options")],
        ) from None
    except ValidationError as exc:
        raise RequestValidationError(_located(exc.errors(), "options")) from None
    if fmt is None:
        raise InvalidInput(
            f"{name}: cannot tell its format; name it .csv, .jsonl or .json "
            "or send it as text/csv or application/jsonl",
            [Issue("unknown_format", "unknown file format", field="file")],
        )
    items = await asyncio.to_thread(read_items, data, fmt, name)
    print_ = hashlib.sha256(data).digest() + json.dumps(parsed, sort_keys=True).encode()
    return options, items, print_


def _located(errors: list[Any], where: str) -> list[dict[str, Any]]:
    return [{**e, "loc": (where, *e.get("loc", ()))} for e in errors]


@router.get("", response_model=BatchList, summary="List batches, newest first")
async def list_batches(
    runtime: RuntimeDep, principal: CanRead, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> Response:
    rows = await runtime.db.run(
        store.list_batches, runtime.db, principal.workspace_id, limit=limit, cursor=cursor
    )
    items = [batch_out(r) for r in rows]
    next_cursor = items[-1].batch_id if len(items) == limit else None
    return json_response(BatchList(items=items, next_cursor=next_cursor))


BatchId = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_]+$")]


@router.get(
    "/{batch_id}",
    response_model=BatchOut,
    summary="A batch's progress: counts by status, credits, rate and ETA",
    responses={404: {"description": "No such batch"}},
)
async def get_batch(runtime: RuntimeDep, principal: CanRead, batch_id: str) -> Response:
    row = await runtime.db.run(store.get_batch, runtime.db, principal.workspace_id, batch_id)
    return json_response(batch_out(row))


@router.get(
    "/{batch_id}/items",
    response_model=ItemList,
    summary="A batch's items in order, with their outputs (filter by status)",
    responses={404: {"description": "No such batch"}},
)
async def list_items(
    runtime: RuntimeDep,
    principal: CanRead,
    base_url: BaseUrlDep,
    batch_id: str,
    status_: Annotated[ItemStatus | None, Query(alias="status")] = None,
    limit: LimitQuery = 50,
    cursor: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
) -> Response:
    await runtime.db.run(store.get_batch, runtime.db, principal.workspace_id, batch_id)
    rows, outputs = await runtime.db.run(
        store.list_items,
        runtime.db,
        batch_id,
        limit=limit,
        cursor=cursor,
        status=status_.value if status_ else None,
    )
    items = [item_out(r, outputs, base_url) for r in rows]
    next_cursor = str(items[-1].item_id) if len(items) == limit else None
    return json_response(ItemList(items=items, next_cursor=next_cursor))


@router.post(
    "/{batch_id}/cancel",
    response_model=BatchOut,
    summary="Cancel the batch: pending items are cancelled, running executions stopped",
    responses={404: {"description": "No such batch"}, 409: {"description": "Already ended"}},
)
async def cancel_batch(runtime: RuntimeDep, principal: CanExecute, batch_id: str) -> Response:
    await runtime.batches.cancel(principal.workspace_id, batch_id)
    row = await runtime.db.run(store.get_batch, runtime.db, principal.workspace_id, batch_id)
    return json_response(batch_out(row))


@router.post(
    "/{batch_id}/retry-failed",
    response_model=RetryOut,
    summary="Run failed items again (all of them, or those named)",
    responses={404: {"description": "No such batch or item"}, 409: {"description": "Cancelled"}},
)
async def retry_failed(
    runtime: RuntimeDep,
    principal: CanExecute,
    batch_id: str,
    body: RetryRequest | None = None,
) -> Response:
    retried = await runtime.batches.retry_failed(
        principal.workspace_id, batch_id, body.item_ids if body is not None else None
    )
    row = await runtime.db.run(store.get_batch, runtime.db, principal.workspace_id, batch_id)
    return json_response(RetryOut(retried=retried, batch=batch_out(row)))


@router.post(
    "/{batch_id}/review",
    response_model=ReviewOut,
    summary="Set the review state of the batch's outputs (all, or the items/assets named)",
    responses={404: {"description": "No such batch"}},
)
async def review_batch(
    runtime: RuntimeDep, principal: CanWrite, batch_id: str, body: ReviewRequest
) -> Response:
    updated = await runtime.db.run(
        store.review,
        runtime.db,
        principal.workspace_id,
        batch_id,
        body.state,
        datetime.now(UTC),
        item_ids=body.item_ids,
        asset_ids=body.asset_ids,
        current=body.current_state,
        note=body.note,
    )
    return json_response(ReviewOut(updated=updated))


@router.get(
    "/{batch_id}/manifest",
    summary="The manifest: each item's inputs, output files and how each was made",
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}}},
        404: {"description": "No such batch"},
    },
)
async def get_manifest(runtime: RuntimeDep, principal: CanRead, batch_id: str) -> Response:
    found = await runtime.db.run(manifests.build, runtime.db, principal.workspace_id, batch_id)
    return Response(json.dumps(found), media_type="application/json")


@router.post(
    "/{batch_id}/export",
    response_model=ExportOut,
    summary="Write the batch's files and manifest to a folder on the server",
    responses={404: {"description": "No such batch"}},
)
async def export_batch(
    runtime: RuntimeDep, principal: CanWrite, batch_id: str, body: ExportRequest | None = None
) -> Response:
    found = await runtime.db.run(manifests.build, runtime.db, principal.workspace_id, batch_id)
    parent = runtime.settings.export_dir_or_default()
    if body is not None and body.directory:
        if ".." in body.directory.split("/"):
            raise InvalidInput(
                "directory must stay inside the export directory",
                [Issue("invalid_field", "no '..' in directory", field="directory")],
            )
        parent = parent / body.directory
    root = await asyncio.to_thread(manifests.export_to, found, runtime.blobs, parent)
    files = sum(len(entry["outputs"]) for entry in found["items"])
    return json_response(ExportOut(path=str(root), files=files))


@router.get(
    "/{batch_id}/export.zip",
    summary="The batch's files and manifest as one zip, in the export layout",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
        404: {"description": "No such batch"},
    },
)
async def download_zip(runtime: RuntimeDep, principal: CanRead, batch_id: str) -> Response:
    found = await runtime.db.run(manifests.build, runtime.db, principal.workspace_id, batch_id)

    def make() -> Path:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - handed to the response
            prefix="imagegraph-", suffix=".zip", delete=False
        )
        with handle:
            manifests.write_zip(found, runtime.blobs, handle)
        return Path(str(handle.name))

    path = await asyncio.to_thread(make)
    return FileResponse(
        path,
        media_type="application/zip",
        filename=f"{found['folder']}.zip",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


@router.get(
    "/{batch_id}/compare",
    response_model=CompareOut,
    summary="Prompt variants side by side: each item and run, one column per variant",
    responses={404: {"description": "No such batch"}},
)
async def compare(
    runtime: RuntimeDep, principal: CanRead, base_url: BaseUrlDep, batch_id: str
) -> Response:
    batch = await runtime.db.run(store.get_batch, runtime.db, principal.workspace_id, batch_id)
    items, outputs, _runs = await runtime.db.run(store.all_items, runtime.db, batch_id)
    names = [v["name"] for v in batch["options"].get("variants") or []] or [""]
    rows: dict[tuple[int, int], CompareRow] = {}
    summary: dict[str, dict[str, Any]] = {
        name: {"completed": 0, "failed": 0, "approved": 0, "quality": {}} for name in names
    }
    sums: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for row in items:
        out = item_out(row, outputs, base_url)
        key = (row["item_index"], row["run"])
        entry = rows.get(key)
        if entry is None:
            entry = rows[key] = CompareRow(
                index=row["item_index"],
                run=row["run"],
                seed=row["seed"],
                inputs=row["inputs"],
                variants={},
            )
        variant = row["variant"]
        entry.variants[variant or "default"] = out
        tally = summary.setdefault(
            variant, {"completed": 0, "failed": 0, "approved": 0, "quality": {}}
        )
        if row["status"] == ItemStatus.COMPLETED.value:
            tally["completed"] += 1
        elif row["status"] == ItemStatus.FAILED.value:
            tally["failed"] += 1
        for output in out.outputs:
            if output.review_state == "approved":
                tally["approved"] += 1
            for metric, value in (output.quality or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    sums.setdefault(variant, {}).setdefault(metric, []).append(float(value))
    for variant, metrics in sums.items():
        summary[variant]["quality"] = {
            metric: round(sum(values) / len(values), 4) for metric, values in metrics.items()
        }
    return json_response(
        CompareOut(
            variants=[n or "default" for n in names],
            rows=[rows[k] for k in sorted(rows)],
            summary={(k or "default"): v for k, v in summary.items()},
        )
    )
