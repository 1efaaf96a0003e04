"""An in-memory `NodeContext`."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from imagegraph.errors import NodeError
from imagegraph.nodes import imaging
from imagegraph.nodes.base import AssetKind, NodeContext, RegenerationTarget
from imagegraph.nodes.values import ImageValue, inherited_generation
from imagegraph.providers.hub import ProviderHub

T = TypeVar("T")

DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class StoredImage:
    """One `store_image` call, as the context saw it."""

    value: ImageValue
    data: bytes
    kind: AssetKind
    parents: tuple[ImageValue, ...]
    format: str | None
    quality: int | None


@dataclass
class MemoryContext:
    """Stores images as the engine does (same encoding), but in dicts; runs CPU work inline;
    records what the node stored, fetched and reported.

    >>> import asyncio
    >>> from imagegraph.nodes import builtin_registry
    >>> node = builtin_registry()["generate:sandbox"]
    >>> ctx = MemoryContext()
    >>> params = node.parse_params({"width": 64, "height": 64, "seed": 1})
    >>> out = asyncio.run(node.run(ctx.as_context(), params, {"prompt": "a fox"}))
    >>> (out["image"].width, ctx.stored[0].kind)
    (64, 'intermediate')
    """

    node_id: str = "node"
    execution_id: str = "exec_memory"
    attempt: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    fetchable: dict[str, bytes] = field(default_factory=dict)
    assets: dict[str, ImageValue] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    images: dict[str, Image.Image] = field(default_factory=dict)
    stored: list[StoredImage] = field(default_factory=list)
    progress_calls: list[tuple[float, str | None]] = field(default_factory=list)
    followed: bool = True  # whether someone follows the execution's live events
    fetched: list[str] = field(default_factory=list)
    cpu_calls: int = 0
    process_calls: int = 0
    # For nodes of hosted models: the hub they call, and the job records they save.
    hub: ProviderHub | None = None
    saved_jobs: list[Mapping[str, Any]] = field(default_factory=list)
    resumed_job: Mapping[str, Any] | None = None
    # For a quality gate: the generation it may send back, as the engine would describe it.
    regeneration_target: RegenerationTarget | None = None

    def as_context(self) -> NodeContext:
        """This object, typed as the protocol it implements (a static check of that)."""
        return self

    def load_image(self, value: ImageValue) -> Image.Image:
        cached = self.images.get(value.sha256)
        if cached is None:
            cached = self.images[value.sha256] = imaging.decode(
                self.read_bytes(value), self.max_pixels
            )
        return cached

    def read_bytes(self, value: ImageValue) -> bytes:
        try:
            return self.blobs[value.sha256]
        except KeyError:
            raise NodeError(f"no bytes for {value.sha256}", code="asset_missing") from None

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
            data = self.read_bytes(image)
            sha, fmt, width, height = image.sha256, image.format, image.width, image.height
        else:
            data, fmt, width, height = imaging.for_storage(
                image,
                self.max_pixels,
                format=format,
                quality=quality,
                intermediate=kind == "intermediate",
            )
            sha = hashlib.sha256(data).hexdigest()
            self.blobs[sha] = data
            if isinstance(image, Image.Image):
                self.images[sha] = image
        value = ImageValue(
            f"asset_{len(self.stored)}",
            sha,
            fmt,
            width,
            height,
            inherited_generation(generation, parents),
            size_bytes=len(data),
        )
        self.stored.append(StoredImage(value, data, kind, tuple(parents), format, quality))
        return value

    async def run_cpu(
        self, fn: Callable[..., T], *args: Any, pixels: int | None = None, urgent: bool = True
    ) -> T:
        self.cpu_calls += 1
        return fn(*args)

    async def run_process(self, fn: Callable[..., T], *args: Any, urgent: bool = True) -> T:
        """Runs here, after a pickling round trip: what the engine's processes would
        refuse (a lambda, an open file) fails here too."""
        self.process_calls += 1
        fn, args = pickle.loads(pickle.dumps((fn, args)))  # noqa: S301 (our own bytes)
        return fn(*args)

    async def fetch(self, url: str) -> bytes:
        self.fetched.append(url)
        try:
            return self.fetchable[url]
        except KeyError:
            raise NodeError(f"nothing to fetch at {url}", code="fetch_failed") from None

    async def find_asset(self, asset_id: str) -> ImageValue:
        try:
            return self.assets[asset_id]
        except KeyError:
            raise NodeError(f"asset {asset_id} does not exist", code="asset_not_found") from None

    def progress(self, fraction: float, message: str | None = None) -> None:
        self.progress_calls.append((fraction, message))

    @property
    def watched(self) -> bool:
        return self.followed

    @property
    def providers(self) -> ProviderHub:
        if self.hub is None:
            raise NodeError("this MemoryContext was given no ProviderHub", code="internal_error")
        return self.hub

    @property
    def provider_job(self) -> Mapping[str, Any] | None:
        return self.saved_jobs[-1] if self.saved_jobs else self.resumed_job

    async def save_provider_job(self, job: Mapping[str, Any]) -> None:
        self.saved_jobs.append(dict(job))

    # Setting the scene for a node under test.

    def put_image(self, image: Image.Image, fmt: str = "png") -> ImageValue:
        """Store a source image as if an upstream node had produced it."""
        return self.put_bytes(imaging.encode(image, fmt))

    def put_bytes(self, data: bytes) -> ImageValue:
        """Store already encoded bytes (any readable format) as an upstream image. The
        context's own pixel limit is for the node under test, not for the scene."""
        fmt, width, height = imaging.probe(data, max(self.max_pixels, DEFAULT_MAX_PIXELS))
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return ImageValue(f"asset_src_{sha[:8]}", sha, fmt, width, height, {})

    def bytes_of(self, value: ImageValue) -> bytes:
        return self.blobs[value.sha256]
