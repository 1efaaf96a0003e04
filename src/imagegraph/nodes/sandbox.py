"""`generate:sandbox`: a deterministic image generator that needs no key and costs nothing
(unless its `credits` param simulates a price).

The image is a pure function of (prompt, negative prompt, seed, size, params), drawn by
`imagegraph.drawing` in a worker process, as a provider draws on its own machines.
`delayMs` is the provider's latency: the image is drawn while it passes, and nothing else
waits meanwhile.
"""

from __future__ import annotations

import asyncio
import secrets

from pydantic import Field

from imagegraph.drawing import render_png
from imagegraph.errors import NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs
from imagegraph.nodes.values import ImageValue

MAX_SEED = 2**32 - 1


class SandboxParams(NodeParams):
    width: int = Field(default=512, ge=64, le=2048, description="Image width in pixels.")
    height: int = Field(default=512, ge=64, le=2048, description="Image height in pixels.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Fixed seed for reproducible output; empty picks a random one.",
    )
    steps: int = Field(default=20, ge=1, le=100, description="More steps draw more shapes.")
    guidance: float = Field(default=7.5, ge=0, le=30, description="Higher is more saturated.")
    delay_ms: int = Field(
        default=0, ge=0, le=600_000, description="Simulated provider latency in milliseconds."
    )
    credits: float = Field(
        default=0.0,
        ge=0,
        le=1_000_000,
        description="Simulated price per image in credits (to try out credit limits).",
    )


class SandboxGenerate(Node[SandboxParams]):
    type = "generate:sandbox"
    title = "Sandbox generator"
    description = "Deterministic test images; no key, no cost."
    params_model = SandboxParams
    inputs = (
        InputPort("prompt", PortType.TEXT),
        InputPort("negativePrompt", PortType.TEXT, required=False),
    )
    outputs = (OutputPort("image", PortType.IMAGE),)
    cacheable = True

    def is_cacheable(self, params: SandboxParams, inputs: Inputs) -> bool:
        return params.seed is not None  # a random seed is a request for a new image

    def price(self, params: SandboxParams) -> float:
        return params.credits

    def model(self, params: SandboxParams) -> str:
        return "sandbox"

    async def run(self, ctx: NodeContext, params: SandboxParams, inputs: Inputs) -> Outputs:
        prompt = str(inputs["prompt"]).strip()
        if not prompt:
            raise NodeError("prompt is empty", code="empty_prompt")
        negative = str(inputs.get("negativePrompt") or "").strip()
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        generation = {
            "prompt": prompt,
            "negativePrompt": negative or None,
            "seed": seed,
            "model": "sandbox",
            "provider": "sandbox",
            "params": {
                "width": params.width,
                "height": params.height,
                "steps": params.steps,
                "guidance": params.guidance,
            },
            "nodeId": ctx.node_id,
        }

        size = (params.width, params.height)
        picture = (prompt, negative, seed, *size, params.steps, params.guidance)
        pixels = params.width * params.height

        def store(png: bytes) -> ImageValue:
            return ctx.store_image(png, generation=generation)

        # Drawn in a worker process, as a provider draws on its own machines: the drawing holds
        # the interpreter lock for most of its time (see engine.processes).
        if not params.delay_ms:
            png = await ctx.run_process(render_png, *picture)
            return await ctx.run_cpu(lambda: {"image": store(png)}, pixels=pixels)

        # With a delay the picture is made while it passes, and stored in the lane for work
        # with time to spare, never ahead of what executions are waiting for.
        async def draw_and_store_meanwhile() -> Outputs:
            png = await ctx.run_process(render_png, *picture, urgent=False)
            return await ctx.run_cpu(lambda: {"image": store(png)}, pixels=pixels, urgent=False)

        outputs, _ = await asyncio.gather(
            draw_and_store_meanwhile(), _wait(ctx, params.delay_ms / 1000)
        )
        return outputs


async def _wait(ctx: NodeContext, seconds: float) -> None:
    """Wait `seconds`, reporting progress along the way to whoever follows the execution
    (while nobody does, in one sleep). Each step sleeps until its own point in time, so
    small scheduling delays do not add up over the steps."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    ticks = max(1, min(10, int(seconds / 0.1)))  # every 0.1 s at most
    tick = 0
    while tick < ticks:
        tick = tick + 1 if ctx.watched else ticks
        await asyncio.sleep(max(0.0, started + seconds * tick / ticks - loop.time()))
        ctx.progress(tick / (ticks + 1), "waiting for the sandbox provider")
