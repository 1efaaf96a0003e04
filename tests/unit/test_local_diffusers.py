"""`generate:local`, run for real on a tiny randomly initialised Stable Diffusion pipeline
that the tests save to disk (weights cannot be downloaded here, and the node never tries).

The `local` extra (torch, diffusers, transformers) must be installed: without it these tests
fail rather than skip.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from PIL import Image
from pydantic import ValidationError

from imagegraph.errors import NodeError
from imagegraph.nodes.local import INSTALL_HINT, LocalGenerate, PipelineCache
from imagegraph.nodes.values import ImageValue
from imagegraph.testing import MemoryContext
from tests.tiny_pipelines import put_in_hf_cache, save_tiny_pipeline

T = TypeVar("T")

REPO_ID = "imagegraph-tests/tiny-sd"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Models:
    """Where the tiny pipelines were saved."""

    root: Path  # a models directory holding "tiny-sd" and "tiny-sd-copy"
    cache: Path  # a Hugging Face cache holding REPO_ID


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    base = tmp_path_factory.mktemp("local-diffusers")
    root = base / "models"
    save_tiny_pipeline(root / "tiny-sd", base / "tokenizer-source")
    shutil.copytree(root / "tiny-sd", root / "tiny-sd-copy")
    cache = base / "hf-cache"
    put_in_hf_cache(root / "tiny-sd", cache, REPO_ID)
    return Models(root, cache)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test: the node works offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("generate:local tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@dataclass
class ThreadedContext(MemoryContext):
    """Runs CPU work in a thread, as the engine does, and notes whether it was urgent."""

    urgent_calls: list[bool] = field(default_factory=list)

    async def run_cpu(
        self, fn: Callable[..., T], *args: Any, pixels: int | None = None, urgent: bool = True
    ) -> T:
        self.cpu_calls += 1
        self.urgent_calls.append(urgent)
        return await asyncio.to_thread(fn, *args)


async def generate(
    node: LocalGenerate,
    params: Mapping[str, Any],
    prompt: str = "a fox in the snow",
    negative: str | None = None,
    ctx: MemoryContext | None = None,
) -> tuple[ImageValue, MemoryContext]:
    context = ctx if ctx is not None else MemoryContext()
    inputs = {"prompt": prompt, "negativePrompt": negative}
    outputs = await node.run(context.as_context(), node.parse_params(params), inputs)
    return outputs["image"], context


def small(model: str = "tiny-sd", **params: Any) -> dict[str, Any]:
    return {"model": model, "width": 64, "height": 64, "steps": 2, **params}


async def test_generates_an_image_of_the_requested_size(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root)

    image, ctx = await generate(node, small(width=64, height=96, seed=3, guidance=5.0))

    assert (image.width, image.height) == (64, 96)
    assert ctx.stored[0].data.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(ctx.stored[0].data)).size == (64, 96)
    assert ctx.cpu_calls == 1
    assert image.generation == {
        "prompt": "a fox in the snow",
        "negativePrompt": None,
        "seed": 3,
        "model": "local:tiny-sd",
        "provider": "local",
        "pipeline": "StableDiffusionPipeline",
        "params": {"width": 64, "height": 96, "steps": 2, "guidance": 5.0},
        "nodeId": "node",
    }


async def test_the_same_seed_gives_the_same_png_and_another_seed_another(
    models: Models,
) -> None:
    node = LocalGenerate(models_dir=models.root)

    first, ctx_first = await generate(node, small(seed=1))
    again, ctx_again = await generate(node, small(seed=1))
    other, ctx_other = await generate(node, small(seed=2))

    assert ctx_first.stored[0].data == ctx_again.stored[0].data
    assert first.sha256 == again.sha256 != other.sha256
    assert ctx_other.stored[0].data != ctx_first.stored[0].data


async def test_a_negative_prompt_is_used(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root)

    plain, _ = await generate(node, small(seed=5))
    steered, _ = await generate(node, small(seed=5), negative="  blurry dark  ")

    assert steered.generation["negativePrompt"] == "blurry dark"
    assert steered.sha256 != plain.sha256


async def test_each_step_reports_progress(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root)

    _, three = await generate(node, small(steps=3, seed=1))
    _, one = await generate(node, small(steps=1, seed=1))

    assert three.progress_calls == [
        (1 / 4, "step 1 of 3"),
        (2 / 4, "step 2 of 3"),
        (3 / 4, "step 3 of 3"),
    ]
    assert one.progress_calls == [(1 / 2, "step 1 of 1")]


async def test_a_loaded_pipeline_stays_warm(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root)

    first, _ = await generate(node, small())
    second, _ = await generate(node, small())

    assert node.pipelines.loads == 1
    assert node.pipelines.keys() == [str(models.root / "tiny-sd")]
    assert node.pipelines.weight > 0
    # Without a seed each run draws one, and records it.
    assert isinstance(first.generation["seed"], int)
    assert isinstance(second.generation["seed"], int)


async def test_pipelines_beyond_the_memory_budget_are_evicted_least_recent_first(
    models: Models,
) -> None:
    probe = LocalGenerate(models_dir=models.root)
    await generate(probe, small(seed=1))
    size = probe.pipelines.weight
    node = LocalGenerate(cache_bytes=size * 3 // 2, models_dir=models.root)

    await generate(node, small("tiny-sd", seed=1))
    await generate(node, small("tiny-sd-copy", seed=1))
    assert node.pipelines.keys() == [str(models.root / "tiny-sd-copy")]
    assert (node.pipelines.loads, node.pipelines.weight) == (2, size)

    await generate(node, small("tiny-sd-copy", seed=1))
    assert node.pipelines.loads == 2
    await generate(node, small("tiny-sd", seed=1))
    assert node.pipelines.loads == 3
    assert node.pipelines.keys() == [str(models.root / "tiny-sd")]


async def test_loads_a_repo_id_from_the_hugging_face_cache_offline(models: Models) -> None:
    node = LocalGenerate(cache_dir=models.cache)

    image, _ = await generate(node, small(REPO_ID, seed=1))

    assert (image.width, image.height) == (64, 64)
    assert image.generation["model"] == "local:" + REPO_ID
    (key,) = node.pipelines.keys()
    assert Path(key).parent.parent == models.cache / "models--imagegraph-tests--tiny-sd"


async def test_a_model_that_is_not_downloaded_is_a_clear_error(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root, cache_dir=models.cache)

    with pytest.raises(NodeError) as info:
        await generate(node, small("imagegraph-tests/not-downloaded"))

    assert info.value.code == "local_model_not_found"
    message = info.value.message
    assert "'imagegraph-tests/not-downloaded'" in message
    assert "imagegraph does not download weights" in message
    assert str(models.cache) in message
    assert str(models.root / "imagegraph-tests/not-downloaded") in message


@pytest.mark.parametrize("name", ["../models/tiny-sd", "tiny-sd/unet", "/"])
async def test_only_pipeline_directories_inside_the_models_dir_or_absolute_load(
    models: Models, name: str
) -> None:
    node = LocalGenerate(models_dir=models.root, cache_dir=models.cache)

    with pytest.raises(NodeError) as info:
        await generate(node, small(name))

    assert info.value.code == "local_model_not_found"
    assert node.pipelines.loads == 0


async def test_an_absolute_path_under_the_models_dir_loads(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root)

    image, _ = await generate(node, small(str(models.root / "tiny-sd-copy"), seed=1))

    assert image.generation["model"] == f"local:{models.root / 'tiny-sd-copy'}"


@pytest.mark.parametrize("under_models_dir", [True, False])
async def test_an_absolute_path_elsewhere_is_refused(
    models: Models, under_models_dir: bool
) -> None:
    node = LocalGenerate(models_dir=models.root / "tiny-sd" if under_models_dir else None)

    with pytest.raises(NodeError) as info:
        await generate(node, small(str(models.root / "tiny-sd-copy"), seed=1))

    assert info.value.code == "local_model_not_found"
    assert "absolute paths are allowed" in info.value.message
    assert node.pipelines.loads == 0


async def test_cancelling_a_run_stops_its_pipeline_at_the_next_step(models: Models) -> None:
    node = LocalGenerate(models_dir=models.root)
    ctx = ThreadedContext()
    params = node.parse_params(small(steps=150, seed=1))
    task = asyncio.create_task(node.run(ctx.as_context(), params, {"prompt": "a cat"}))
    async with asyncio.timeout(30):
        while not ctx.progress_calls:
            await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next run waits for the pipeline until the interrupted one lets go of it.
    await generate(node, small(steps=1), ctx=ThreadedContext())

    assert len(ctx.progress_calls) < 150
    assert ctx.stored == []
    assert ctx.urgent_calls == [False]


def test_params_are_bounded() -> None:
    node = LocalGenerate()
    params = node.parse_params({"model": "tiny-sd"})
    assert (params.width, params.height, params.steps, params.guidance, params.seed) == (
        512,
        512,
        30,
        7.5,
        None,
    )
    for wrong in (
        {},
        {"model": ""},
        {"model": "tiny\nsd"},
        small(width=100),
        small(height=2056),
        small(steps=0),
        small(steps=151),
        small(guidance=31),
        small(seed=-1),
        small(sampler="ddim"),
    ):
        with pytest.raises(ValidationError):
            node.parse_params(wrong)


def test_what_the_node_says_about_itself() -> None:
    node = LocalGenerate()
    seeded = node.parse_params(small(seed=1))
    unseeded = node.parse_params(small())

    assert node.unavailable() is None
    assert node.is_cacheable(seeded, {})
    assert not node.is_cacheable(unseeded, {})
    assert node.price(seeded) == 0
    assert node.model(seeded) == "local:tiny-sd"
    described = node.describe()
    assert [port["name"] for port in described["inputs"]] == ["prompt", "negativePrompt"]
    assert described["params"]["properties"]["width"]["multipleOf"] == 8
    assert described["params"]["required"] == ["model"]


def test_without_the_extra_the_node_is_listed_and_says_how_to_install_it() -> None:
    script = """
import asyncio, sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
from imagegraph.errors import NodeError
from imagegraph.nodes.local import LocalGenerate
from imagegraph.testing import MemoryContext
from tests.tiny_pipelines import put_in_hf_cache, save_tiny_pipeline
node = LocalGenerate()
node.describe()
print(node.unavailable())
params = node.parse_params({"model": "tiny-sd"})
try:
    asyncio.run(node.run(MemoryContext().as_context(), params, {"prompt": "a fox"}))
except NodeError as exc:
    print(exc.code, exc.message)
"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    unavailable, error = result.stdout.splitlines()
    assert unavailable == f"generate:local needs torch, diffusers, transformers: {INSTALL_HINT}"
    assert error.startswith("local_unavailable ")
    assert error.endswith(INSTALL_HINT)


def test_the_cache_never_drops_a_pipeline_in_use() -> None:
    dropped: list[None] = []
    cache: PipelineCache[str] = PipelineCache(10, weigh=len, dropped=lambda: dropped.append(None))

    with cache.use("a", lambda: "123456"):
        with cache.use("b", lambda: "abcdef"):
            assert cache.keys() == ["a", "b"]
            assert cache.weight == 12
        # Over budget: "b" goes as soon as it is released, "a" stays while in use.
        assert cache.keys() == ["a"]
    assert (cache.keys(), cache.weight, len(dropped)) == (["a"], 6, 1)

    with cache.use("c", lambda: "0123456789abc"):
        assert cache.keys() == ["c"]  # "a" made room; "c" alone exceeds the budget
    assert (cache.keys(), cache.weight, len(dropped)) == ([], 0, 3)


def test_the_cache_loads_a_pipeline_once_for_concurrent_users() -> None:
    cache: PipelineCache[str] = PipelineCache(100, weigh=len)

    def load() -> str:
        time.sleep(0.05)  # long enough for the other threads to arrive meanwhile
        return "pipeline"

    def use() -> str:
        with cache.use("a", load) as warm:
            return warm.pipeline

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: use(), range(4)))

    assert results == ["pipeline"] * 4
    assert cache.loads == 1
