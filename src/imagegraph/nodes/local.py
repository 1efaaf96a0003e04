"""`generate:local`: text to image with a Hugging Face diffusers pipeline on this machine.

It needs the optional extra (`pip install 'imagegraph[local]'`: torch, diffusers,
transformers). This module imports without it, so the node is listed on every server, and
running it where the extra is missing fails with a `NodeError` that says how to install it.

Weights are never downloaded. A model is a diffusers pipeline directory (with
`model_index.json`): an absolute path, a name under `models_dir`, or a repo id already in
the local Hugging Face cache. Loaded pipelines stay warm in a `PipelineCache` bounded by the
bytes of their parameters; each pipeline runs one generation at a time.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import inspect
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from PIL import Image
from pydantic import Field

from imagegraph.errors import NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs
from imagegraph.nodes.sandbox import MAX_SEED

V = TypeVar("V")

INSTALL_HINT = "pip install 'imagegraph[local]'"
# What the `local` extra installs; importing these is deferred until a run needs them.
BACKEND_MODULES = ("torch", "diffusers", "transformers")
# Arguments a pipeline's __call__ must take to be driven as text to image.
TEXT_TO_IMAGE_ARGUMENTS = ("prompt", "width", "height", "num_inference_steps", "generator")


class LocalParams(NodeParams):
    model: str = Field(
        min_length=1,
        max_length=512,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description=(
            "A diffusers pipeline directory: an absolute path, a name under the models "
            "directory, or a Hugging Face repo id already in the local cache."
        ),
    )
    width: int = Field(
        default=512, ge=64, le=2048, multiple_of=8, description="Image width in pixels."
    )
    height: int = Field(
        default=512, ge=64, le=2048, multiple_of=8, description="Image height in pixels."
    )
    steps: int = Field(default=30, ge=1, le=150, description="Denoising steps.")
    guidance: float = Field(default=7.5, ge=0, le=30, description="Classifier-free guidance scale.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Fixed seed for reproducible output; empty picks a random one.",
    )


def missing_extra() -> str | None:
    """What is missing for `generate:local` to run here, or None when the extra is installed.

    Cheap: it looks the modules up without importing them.
    """
    missing = [name for name in BACKEND_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"generate:local needs {', '.join(missing)}: {INSTALL_HINT}"


@dataclass(eq=False)
class WarmPipeline(Generic[V]):
    """A loaded pipeline, its size in bytes, and the lock its generations take turns on."""

    key: str
    pipeline: V
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    pins: int = 0


class PipelineCache(Generic[V]):
    """Loaded pipelines by key, bounded by their total size in bytes.

    Beyond `max_bytes` the least recently used pipelines are dropped, except those in use
    (pinned by `use`), which go once released. A new pipeline is weighed after loading and
    room is made before `place` moves it to its device; one bigger than the whole budget is
    used, then dropped. Thread-safe; pipelines load one at a time.

    >>> cache: PipelineCache[str] = PipelineCache(10, weigh=len)
    >>> with cache.use("a", lambda: "123456") as warm:
    ...     warm.pipeline
    '123456'
    >>> with cache.use("b", lambda: "abcdef"):  # "a" makes room for it
    ...     cache.keys()
    ['b']
    >>> cache.weight, cache.loads
    (6, 2)
    """

    def __init__(
        self,
        max_bytes: int,
        weigh: Callable[[V], int],
        place: Callable[[V], V] = lambda pipeline: pipeline,
        dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self.max_bytes = max_bytes
        self.loads = 0
        self._weigh = weigh
        self._place = place
        # Called (outside the lock) after pipelines were dropped, to hand memory back.
        self._dropped = dropped
        self._entries: OrderedDict[str, WarmPipeline[V]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()
        self._loading = threading.Lock()

    @property
    def weight(self) -> int:
        """Bytes of the pipelines held now."""
        return self._weight

    def keys(self) -> list[str]:
        """The keys held now, least recently used first."""
        with self._lock:
            return list(self._entries)

    @contextmanager
    def use(self, key: str, load: Callable[[], V]) -> Iterator[WarmPipeline[V]]:
        """The pipeline for `key`, loaded by `load` unless warm; pinned until the block ends."""
        warm = self._acquire(key, load)
        try:
            yield warm
        finally:
            with self._lock:
                warm.pins -= 1
                count = self._evict(room=0)
            if count:
                self._dropped()

    def _acquire(self, key: str, load: Callable[[], V]) -> WarmPipeline[V]:
        with self._lock:
            warm = self._pin(key)
        if warm is not None:
            return warm
        with self._loading:
            with self._lock:
                warm = self._pin(key)  # loaded by another thread while this one waited
            if warm is not None:
                return warm
            pipeline = load()
            size = self._weigh(pipeline)
            with self._lock:
                self.loads += 1
                count = self._evict(room=size)
            if count:
                self._dropped()
            warm = WarmPipeline(key, self._place(pipeline), size, pins=1)
            with self._lock:
                self._entries[key] = warm
                self._weight += size
            return warm

    def _pin(self, key: str) -> WarmPipeline[V] | None:
        warm = self._entries.get(key)
        if warm is not None:
            self._entries.move_to_end(key)
            warm.pins += 1
        return warm

    def _evict(self, room: int) -> int:
        """Drop unpinned pipelines, least recently used first, until `room` more bytes fit."""
        count = 0
        while self._weight + room > self.max_bytes:
            victim = next((w for w in self._entries.values() if w.pins == 0), None)
            if victim is None:
                break
            del self._entries[victim.key]
            self._weight -= victim.size
            count += 1
        return count


class LocalGenerate(Node[LocalParams]):
    """Runs diffusers text-to-image pipelines in this process, offline.

        node = LocalGenerate(cache_bytes=8 * 1024**3, models_dir=Path("/srv/models"))
        params = node.parse_params({"model": "sd-turbo", "steps": 4, "seed": 7})
        outputs = await node.run(ctx, params, {"prompt": "a fox in the snow"})

    `device` defaults to CUDA when torch sees it, else the CPU; `cache_dir` to the Hugging
    Face cache that huggingface_hub's own settings point at.
    """

    type = "generate:local"
    title = "Local diffusers"
    description = "Text to image with a diffusers pipeline on this server; never downloads."
    params_model = LocalParams
    inputs = (
        InputPort("prompt", PortType.TEXT),
        InputPort("negativePrompt", PortType.TEXT, required=False),
    )
    outputs = (OutputPort("image", PortType.IMAGE),)
    cacheable = True

    def __init__(
        self,
        cache_bytes: int = 4 * 1024**3,
        device: str | None = None,
        models_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self._device = device
        self._models_dir = models_dir
        self._cache_dir = cache_dir
        self._pipelines: PipelineCache[Any] = PipelineCache(
            cache_bytes, weigh=parameter_bytes, place=self._to_device, dropped=self._free_memory
        )

    @property
    def pipelines(self) -> PipelineCache[Any]:
        """The warm pipelines, by model directory."""
        return self._pipelines

    def unavailable(self) -> str | None:
        return missing_extra()

    def is_cacheable(self, params: LocalParams, inputs: Inputs) -> bool:
        return params.seed is not None  # a random seed is a request for a new image

    def price(self, params: LocalParams) -> float:
        return 0.0

    def model(self, params: LocalParams) -> str:
        return "local:" + params.model

    async def run(self, ctx: NodeContext, params: LocalParams, inputs: Inputs) -> Outputs:
        prompt = str(inputs["prompt"]).strip()
        if not prompt:
            raise NodeError("prompt is empty", code="empty_prompt")
        negative = str(inputs.get("negativePrompt") or "").strip()
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        stop = threading.Event()
        try:
            # Minutes of work on a model's own time: the lane that never delays image work.
            return await ctx.run_cpu(
                self._generate, ctx, params, prompt, negative, seed, stop, urgent=False
            )
        except asyncio.CancelledError:
            stop.set()  # the thread cannot be cancelled, but the pipeline stops at its next step
            raise

    def _generate(
        self,
        ctx: NodeContext,
        params: LocalParams,
        prompt: str,
        negative: str,
        seed: int,
        stop: threading.Event,
    ) -> Outputs:
        _import_backend()
        import torch

        directory = self._locate(params.model)
        dtype = torch.float16 if torch.device(self._device_name()).type == "cuda" else torch.float32

        def load() -> Any:
            return _load(params.model, directory, dtype)

        with self._pipelines.use(str(directory), load) as warm, warm.lock:
            image = _text_to_image(warm.pipeline, ctx, params, prompt, negative, seed, stop)
        generation = {
            "prompt": prompt,
            "negativePrompt": negative or None,
            "seed": seed,
            "model": self.model(params),
            "provider": "local",
            "pipeline": type(warm.pipeline).__name__,
            "params": {
                "width": params.width,
                "height": params.height,
                "steps": params.steps,
                "guidance": params.guidance,
            },
            "nodeId": ctx.node_id,
        }
        return {"image": ctx.store_image(image, generation=generation)}

    def _locate(self, name: str) -> Path:
        """The pipeline directory `name` stands for; never reaches the network.

        A workflow may only name directories the operator put under the models directory
        (or in the Hugging Face cache): an absolute path elsewhere is refused, so a workflow
        cannot make the server read whatever directory it likes.
        """
        path = Path(name)
        if path.is_absolute():
            root = self._models_dir
            if root is None or not path.resolve().is_relative_to(root.resolve()):
                where = "nowhere" if root is None else f"under {root} only"
                raise NodeError(
                    f"model {name!r}: absolute paths are allowed {where} "
                    "(IMAGEGRAPH_LOCAL_MODELS_DIR); name the model relative to it instead",
                    code="local_model_not_found",
                )
            return _pipeline_directory(name, path)
        if self._models_dir is not None and ".." not in path.parts:
            candidate = self._models_dir / path
            if candidate.is_dir():
                return _pipeline_directory(name, candidate)
        return self._from_hf_cache(name)

    def _from_hf_cache(self, name: str) -> Path:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            HFValidationError,
            IncompleteSnapshotError,
            LocalEntryNotFoundError,
        )

        cache = self._cache_dir if self._cache_dir is not None else Path(constants.HF_HUB_CACHE)
        models_dir = self._models_dir
        try:
            folder = snapshot_download(name, cache_dir=cache, local_files_only=True)
        except HFValidationError:
            where = "an absolute path" if models_dir is None else f"a directory under {models_dir}"
            raise NodeError(
                f"model {name!r} is neither {where} nor a Hugging Face repo id",
                code="local_model_not_found",
            ) from None
        except IncompleteSnapshotError as exc:
            raise NodeError(
                f"model {name!r} is only partly downloaded to the Hugging Face cache at {cache}, "
                f"and imagegraph does not download weights: {exc}",
                code="local_model_not_found",
            ) from None
        except LocalEntryNotFoundError:
            nowhere = "" if models_dir is None else f"there is no {models_dir / name} and "
            raise NodeError(
                f"model {name!r} is not on this server, and imagegraph does not download "
                f"weights: {nowhere}the Hugging Face cache at {cache} has no snapshot of it. "
                f"Download it there first (for example `hf download {name}`).",
                code="local_model_not_found",
            ) from None
        return _pipeline_directory(name, Path(str(folder)))

    def _device_name(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _to_device(self, pipeline: Any) -> Any:
        device = self._device_name()
        return pipeline if device == "cpu" else pipeline.to(device)

    def _free_memory(self) -> None:
        if self._device_name() != "cpu":
            import torch

            gc.collect()  # pipelines hold reference cycles: collect them before emptying
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class _Interrupted(Exception):
    """Raised from a step callback to stop a generation nobody waits for any more."""


def _import_backend() -> None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise NodeError(
            f"generate:local cannot run on this server ({exc}): {INSTALL_HINT}",
            code="local_unavailable",
        ) from exc


def _pipeline_directory(name: str, directory: Path) -> Path:
    if not (directory / "model_index.json").is_file():
        raise NodeError(
            f"model {name!r}: {directory} is not a diffusers pipeline directory "
            "(it has no model_index.json)",
            code="local_model_not_found",
        )
    return directory


def _load(name: str, directory: Path, dtype: Any) -> Any:
    """Load a pipeline from a directory onto the CPU, offline."""
    from diffusers import DiffusionPipeline

    try:
        pipeline = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
            directory,
            local_files_only=True,
            # Weights only as safetensors: a pickled checkpoint can run code when loaded.
            use_safetensors=True,
            dtype=dtype,
            # Without accelerate diffusers falls back to this anyway, with a warning each time.
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except Exception as exc:
        raise NodeError(
            f"model {name!r} could not be loaded from {directory}: {type(exc).__name__}: {exc}",
            code="local_model_invalid",
        ) from exc
    accepted = inspect.signature(pipeline.__call__).parameters
    missing = [argument for argument in TEXT_TO_IMAGE_ARGUMENTS if argument not in accepted]
    if missing:
        raise NodeError(
            f"model {name!r} is a {type(pipeline).__name__}, not a text-to-image pipeline "
            f"(it takes no {', '.join(missing)})",
            code="local_model_invalid",
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _text_to_image(
    pipeline: Any,
    ctx: NodeContext,
    params: LocalParams,
    prompt: str,
    negative: str,
    seed: int,
    stop: threading.Event,
) -> Image.Image:
    import torch

    accepted = inspect.signature(pipeline.__call__).parameters

    def step_ended(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if stop.is_set():
            raise _Interrupted
        total = getattr(pipe, "num_timesteps", None) or params.steps
        ctx.progress((step + 1) / (total + 1), f"step {step + 1} of {total}")
        return tensors

    arguments: dict[str, Any] = {
        "prompt": prompt,
        "width": params.width,
        "height": params.height,
        "num_inference_steps": params.steps,
        # Seeded on the CPU, so a seed gives the same starting noise on every device.
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "pil",
    }
    if negative:
        if "negative_prompt" not in accepted:
            raise NodeError(
                f"{type(pipeline).__name__} takes no negative prompt", code="local_model_invalid"
            )
        arguments["negative_prompt"] = negative
    if "guidance_scale" in accepted:
        arguments["guidance_scale"] = params.guidance
    if "callback_on_step_end" in accepted:
        arguments["callback_on_step_end"] = step_ended
    try:
        images = pipeline(**arguments).images
    except _Interrupted:
        raise NodeError("generation interrupted", code="cancelled") from None
    except torch.OutOfMemoryError as exc:
        raise NodeError(
            f"out of memory generating {params.width}x{params.height} with {params.model!r} on "
            f"{pipeline.device}: try a smaller image or a smaller pipeline cache ({exc})",
            code="local_out_of_memory",
        ) from exc
    image: Image.Image = images[0]
    return image


def parameter_bytes(pipeline: Any) -> int:
    """Bytes of the parameters and buffers of a pipeline's torch modules (shared ones once)."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total
