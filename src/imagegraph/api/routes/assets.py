"""`/assets`: upload images, read their metadata, download their bytes."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, File, Request, Response, UploadFile, status
from pydantic import Field

from imagegraph.api.auth import CanRead, CanWrite
from imagegraph.api.deps import BaseUrlDep, RuntimeDep
from imagegraph.api.idempotency import Idempotency, IdempotencyKeyHeader, idempotent
from imagegraph.api.schemas import AssetOut, RequestModel, asset_out, json_response
from imagegraph.blobs import sha256_hex
from imagegraph.errors import NotFound, PayloadTooLarge
from imagegraph.ids import new_id
from imagegraph.nodes import imaging
from imagegraph.runtime import Runtime
from imagegraph.store import assets as store

router = APIRouter(prefix="/assets", tags=["assets"])
CHUNK = 1024 * 1024


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=AssetOut,
    summary="Upload an image (multipart/form-data, field `file`)",
    responses={
        413: {"description": "File larger than IMAGEGRAPH_MAX_UPLOAD_BYTES"},
        422: {"description": "Not a supported image, or too many pixels"},
    },
)
async def upload_asset(
    runtime: RuntimeDep,
    principal: CanWrite,
    base_url: BaseUrlDep,
    file: Annotated[UploadFile, File(description="PNG, JPEG, WebP, AVIF, GIF, BMP or TIFF")],
    request: Request,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    limit = runtime.settings.max_upload_bytes
    chunks = []
    size = 0
    while chunk := await file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"file is larger than the upload limit of {limit} bytes", limitBytes=limit
            )
        chunks.append(chunk)
    data = b"".join(chunks)
    # A multipart body differs on every send (its boundary); the file is what identifies it.
    print_ = hashlib.sha256(f"POST {request.url.path}\n{file.filename}\n".encode())
    print_.update(data)
    idempotency = Idempotency.of(
        runtime, principal.workspace_id, idempotency_key, print_.hexdigest()
    )
    return await idempotent(
        idempotency, lambda: _store_upload(runtime, principal.workspace_id, base_url, file, data)
    )


async def _store_upload(
    runtime: Runtime, workspace_id: str, base_url: str, file: UploadFile, data: bytes
) -> Response:
    max_pixels = runtime.settings.max_image_pixels

    def verify_and_store() -> tuple[str, int, int, str]:
        image = imaging.decode(data, max_pixels)  # refuses non-images and decompression bombs
        fmt, width, height = imaging.probe(data, max_pixels)
        sha = runtime.blobs.put(data, sha256_hex(data))
        del image
        return fmt, width, height, sha

    fmt, width, height, sha = await asyncio.to_thread(verify_and_store)
    asset_id = new_id("asset")
    filename = (file.filename or "")[:255] or None
    row = {
        "id": asset_id,
        "workspace_id": workspace_id,
        "kind": "upload",
        "sha256": sha,
        "format": fmt,
        "width": width,
        "height": height,
        "size_bytes": len(data),
        "execution_id": None,
        "node_id": None,
        "prompt": None,
        "negative_prompt": None,
        "seed": None,
        "model": None,
        "params": None,
        "meta": {"generation": {"source": "upload", "filename": filename}, "parents": []},
        "filename": filename,
        "created_at": datetime.now(UTC),
    }
    await runtime.db.run(store.insert_asset, runtime.db, row)
    return json_response(
        asset_out(row, base_url),
        status_code=status.HTTP_201_CREATED,
        headers={"Location": f"/api/v1/assets/{asset_id}"},
    )


@router.get("/{asset_id}", response_model=AssetOut, summary="Asset metadata")
async def get_asset(
    runtime: RuntimeDep, principal: CanRead, base_url: BaseUrlDep, asset_id: str
) -> AssetOut:
    row = await runtime.db.run(store.get_asset, runtime.db, principal.workspace_id, asset_id)
    if row is None:
        raise NotFound(f"asset {asset_id} does not exist")
    return asset_out(row, base_url)


class AssetReview(RequestModel):
    review_state: Literal["pending-review", "approved", "rejected"]
    review_note: str | None = Field(default=None, max_length=2000)


@router.patch(
    "/{asset_id}",
    response_model=AssetOut,
    summary="Review an output: set its review state (and a note)",
    responses={404: {"description": "No such asset"}},
)
async def review_asset(
    runtime: RuntimeDep,
    principal: CanWrite,
    base_url: BaseUrlDep,
    asset_id: str,
    body: AssetReview,
) -> AssetOut:
    row = await runtime.db.run(
        store.set_review,
        runtime.db,
        principal.workspace_id,
        asset_id,
        body.review_state,
        body.review_note,
        datetime.now(UTC),
    )
    return asset_out(row, base_url)


@router.get(
    "/{asset_id}/lineage",
    response_model=list[AssetOut],
    summary="The asset and the images it was made from, nearest first",
)
async def get_asset_lineage(
    runtime: RuntimeDep, principal: CanRead, base_url: BaseUrlDep, asset_id: str
) -> list[AssetOut]:
    chain = await runtime.db.run(store.lineage, runtime.db, principal.workspace_id, asset_id)
    if not chain:
        raise NotFound(f"asset {asset_id} does not exist")
    return [asset_out(row, base_url) for row in chain]


@router.get(
    "/{asset_id}/content",
    summary="Download the image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}, "description": "The stored bytes."}},
)
async def get_asset_content(
    runtime: RuntimeDep, principal: CanRead, asset_id: str, request: Request
) -> Response:
    row = await runtime.db.run(store.get_asset, runtime.db, principal.workspace_id, asset_id)
    if row is None:
        raise NotFound(f"asset {asset_id} does not exist")
    etag = f'"{row["sha256"]}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        data = await asyncio.to_thread(runtime.blobs.get, row["sha256"])
    except KeyError:
        raise NotFound(f"the bytes of asset {asset_id} are missing from storage") from None
    name = row["filename"] or f"{asset_id}.{imaging.extension(row['format'])}"
    headers["Content-Disposition"] = f'inline; filename="{name}"'
    media_type = imaging.MIME_TYPES.get(row["format"], "application/octet-stream")
    return Response(content=data, media_type=media_type, headers=headers)
