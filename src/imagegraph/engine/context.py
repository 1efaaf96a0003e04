"""The `NodeContext` the engine gives each node run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from PIL import Image
from sqlalchemy import RowMapping

from imagegraph.blobs import BlobStore, sha256_hex
from imagegraph.engine.assets import AssetRecorder
from imagegraph.engine.events import Event, EventBus
from imagegraph.engine.lru import LRU
from imagegraph.engine.processes import ProcessLost, ProcessPool
from imagegraph.errors import NodeError, TransientNodeError
from imagegraph.netguard import SafeFetcher
from imagegraph.nodes import imaging
from imagegraph.nodes.base import AssetKind, RegenerationTarget
from imagegraph.nodes.values import ImageValue
from imagegraph.providers.hub import ProviderHub
from imagegraph.store import assets as asset_store
from imagegraph.store.db import Database

T = TypeVar("T")

# Image work on at most this many pixels (128 x 128) takes less time than handing it to a
# thread and back (about 150 us here), so it runs on the event loop.
INLINE_PIXELS = 128 * 128


class RunContext:
    """One node run's view of the world: images, safe fetches, progress, CPU threads."""

    def __init__(
        self,
        *,
        providers: ProviderHub | None,
        provider_job: Mapping[str, Any] | None,
        save_provider_job: Callable[[Mapping[str, Any]], Awaitable[None]],
        workspace_id: str,
        execution_id: str,
        node_id: str,
        node_type: str,
        params_json: Mapping[str, Any],
        attempt: int,
        db: Database,
        blobs: BlobStore,
        images: LRU[str, Image.Image],
        cpu: Executor,
        background: Executor,
        processes: ProcessPool | None,
        fetcher: SafeFetcher,
        bus: EventBus,
        max_pixels: int,
        regeneration_target: RegenerationTarget | None = None,
    ) -> None:
        self._providers = providers
        self._provider_job = provider_job
        self._save_provider_job = save_provider_job
        self._workspace_id = workspace_id
        self._execution_id = execution_id
        self._node_id = node_id
        self._node_type = node_type
        self._params_json = params_json
        self._attempt = attempt
        self._db = db
        self._blobs = blobs
        self._images = images
        self._cpu = cpu
        self._background = background
        self._processes = processes
        self._fetcher = fetcher
        self._bus = bus
        self._loop = asyncio.get_running_loop()
        self.max_pixels = max_pixels
        self.regeneration_target = regeneration_target
        self._assets = AssetRecorder(workspace_id, execution_id, node_id, node_type, params_json)

    @property
    def new_assets(self) -> list[dict[str, Any]]:
        """The asset rows of the images this run stored, inserted when it succeeds."""
        return self._assets.new_assets

    @property
    def execution_id(self) -> str:
        return self._execution_id

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def attempt(self) -> int:
        return self._attempt

    def load_image(self, value: ImageValue) -> Image.Image:
        cached = self._images.get(value.sha256)
        if cached is not None:
            return cached
        image = imaging.decode(self.read_bytes(value), self.max_pixels)
        self._images.put(value.sha256, image)
        return image

    def read_bytes(self, value: ImageValue) -> bytes:
        try:
            return self._blobs.get(value.sha256)
        except KeyError:
            raise NodeError(
                f"stored image {value.sha256[:12]}… of asset {value.asset_id} is missing",
                code="asset_missing",
            ) from None

    def store_image(
        self,
        image: Image.Image | bytes | ImageValue,
        *,
        parents: Sequence[ImageValue] = (),
        generation: Mapping[str, Any] | None = None,
        kind: AssetKind = "intermediate",
        format: str | None = None,
        quality: int | None = None,
    ) -> ImageValue:
        if isinstance(image, ImageValue):  # stored already: a new asset of the same bytes
            if image.size_bytes is None:
                image = replace(image, size_bytes=len(self.read_bytes(image)))
            kept = self._assets.keep_image(image, parents=parents, generation=generation, kind=kind)
            assert kept is not None  # its size is known
            return kept
        data, fmt, width, height = imaging.for_storage(
            image,
            self.max_pixels,
            format=format,
            quality=quality,
            intermediate=kind == "intermediate",
        )
        sha = self._blobs.put(data, sha256_hex(data))
        if isinstance(image, Image.Image):
            self._images.put(sha, image)
        return self._assets.record(sha, fmt, width, height, len(data), parents, generation, kind)

    async def run_cpu(
        self, fn: Callable[..., T], *args: Any, pixels: int | None = None, urgent: bool = True
    ) -> T:
        # Small urgent work runs right here: a thread hand-off would cost more. Work with
        # time to spare always leaves the event loop, which others are waiting on.
        if urgent and pixels is not None and pixels <= INLINE_PIXELS:
            return fn(*args)
        pool = self._cpu if urgent else self._background
        return await self._loop.run_in_executor(pool, fn, *args)

    async def run_process(self, fn: Callable[..., T], *args: Any, urgent: bool = True) -> T:
        if self._processes is None:
            return await self.run_cpu(fn, *args, urgent=urgent)
        try:
            return await self._processes.run(fn, *args)
        except ProcessLost as exc:
            raise TransientNodeError(str(exc), code="worker_process_lost") from None

    async def fetch(self, url: str) -> bytes:
        return await self._fetcher.fetch(url)

    async def find_asset(self, asset_id: str) -> ImageValue:
        row = await self._db.run(asset_store.get_asset, self._db, self._workspace_id, asset_id)
        if row is None:
            raise NodeError(f"asset {asset_id} does not exist", code="asset_not_found")
        return asset_value(row)

    @property
    def providers(self) -> ProviderHub:
        if self._providers is None:
            raise NodeError("this process runs no hosted-model providers", code="internal_error")
        return self._providers

    @property
    def provider_job(self) -> Mapping[str, Any] | None:
        return self._provider_job

    async def save_provider_job(self, job: Mapping[str, Any]) -> None:
        await self._save_provider_job(job)
        self._provider_job = job

    @property
    def watched(self) -> bool:
        return self._bus.listening(self._execution_id)

    def progress(self, fraction: float, message: str | None = None) -> None:
        if not self.watched:
            return  # progress notices are never recorded: nobody would hear this one
        event = Event(
            recorded=False,
            id=None,
            execution_id=self._execution_id,
            type="node.progress",
            node_id=self._node_id,
            data={"progress": max(0.0, min(1.0, fraction)), "message": message},
            created_at=datetime.now(UTC),
        )
        self._bus.publish_threadsafe([event])


def asset_value(row: Mapping[str, Any] | RowMapping) -> ImageValue:
    meta = row["meta"] or {}
    return ImageValue(
        asset_id=row["id"],
        sha256=row["sha256"],
        format=row["format"],
        width=row["width"],
        height=row["height"],
        generation=meta.get("generation") or {},
    )
