"""`generate:sandbox`: a deterministic image generator that needs no key and costs nothing
(unless its `credits` param simulates a price).

The image is a pure function of (prompt, negative prompt, seed, size, params): a PRNG seeded
from their hash picks a gradient, shapes and colours, and the prompt is written on the
image. Same inputs give byte-identical PNGs; a different prompt or seed gives a visibly
different picture. `delayMs` is the provider's latency: the image is drawn while it passes,
and nothing else waits meanwhile.
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import json
import random
import secrets
import textwrap
import threading

from PIL import Image, ImageDraw, ImageFont, ImageOps
from pydantic import Field

from imagegraph.errors import NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes import imaging
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs

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

        def store(png: bytes) -> Outputs:
            return {"image": ctx.store_image(png, generation=generation)}

        pixels = params.width * params.height
        size = (params.width, params.height, params.steps, params.guidance)
        # Drawn in a process of its own, as a provider draws on its own machines: the
        # drawing holds the interpreter lock for most of its time (see engine.processes).
        if not params.delay_ms:
            png = await ctx.run_process(render_png, prompt, negative, seed, *size)
            return await ctx.run_cpu(store, png, pixels=pixels)

        # Like a provider, the image is made during the latency, not after it; and as a
        # provider's work would, it leaves our image threads to what executions wait for.
        async def draw_and_store() -> Outputs:
            png = await ctx.run_process(render_png, prompt, negative, seed, *size, urgent=False)
            return await ctx.run_cpu(store, png, pixels=pixels, urgent=False)

        outputs, _ = await asyncio.gather(draw_and_store(), _wait(ctx, params.delay_ms / 1000))
        return outputs


async def _wait(ctx: NodeContext, seconds: float) -> None:
    """Wait `seconds`, reporting progress along the way. Each step sleeps until its own
    point in time, so small scheduling delays do not add up over the steps."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    ticks = max(1, min(10, int(seconds / 0.1)))  # every 0.1 s at most
    for tick in range(1, ticks + 1):
        await asyncio.sleep(max(0.0, started + seconds * tick / ticks - loop.time()))
        ctx.progress(tick / (ticks + 1), "waiting for the sandbox provider")


def render(
    prompt: str, negative: str, seed: int, width: int, height: int, steps: int, guidance: float
) -> Image.Image:
    """Draw the sandbox image. Pure: the same arguments always give the same pixels."""
    material = json.dumps([prompt, negative, seed, width, height, steps, guidance])
    rng = random.Random(int.from_bytes(hashlib.sha256(material.encode()).digest()[:16], "big"))
    saturation = 0.35 + 0.6 * min(guidance, 15) / 15

    def color(alpha: int | None = None) -> tuple[int, ...]:
        hue = rng.random()
        rgb = _hsv(hue, saturation * rng.uniform(0.7, 1.0), rng.uniform(0.35, 1.0))
        return rgb if alpha is None else (*rgb, alpha)

    gradient = Image.radial_gradient("L") if rng.random() < 0.4 else Image.linear_gradient("L")
    if rng.random() < 0.5:
        gradient = gradient.transpose(Image.Transpose.ROTATE_90)
    background = ImageOps.colorize(gradient, color(), color()).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    scale = min(width, height)
    for _ in range(6 + steps // 2):
        kind = rng.choice(("ellipse", "rectangle", "polygon", "line"))
        x, y = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.05, 0.5) * scale, rng.uniform(0.05, 0.5) * scale
        fill = color(rng.randint(90, 210))
        if kind == "ellipse":
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        elif kind == "rectangle":
            draw.rectangle((x, y, x + w, y + h), fill=fill)
        elif kind == "polygon":
            points = [
                (x + rng.uniform(0, w), y + rng.uniform(0, h)) for _ in range(rng.randint(3, 6))
            ]
            draw.polygon(points, fill=fill)
        else:
            draw.line((x, y, x + w, y + h), fill=fill, width=max(1, scale // 60))
    image = Image.alpha_composite(background.convert("RGBA"), layer)
    _caption(image, prompt, seed)
    return image.convert("RGB")


def render_png(
    prompt: str, negative: str, seed: int, width: int, height: int, steps: int, guidance: float
) -> bytes:
    """`render`, encoded as the engine stores a generated image (PNG, quick to write)."""
    image = render(prompt, negative, seed, width, height, steps, guidance)
    return imaging.encode(image, "png", fast=True)


def _caption(image: Image.Image, prompt: str, seed: int) -> None:
    width, height = image.size
    size = max(10, min(width, height) // 24)
    font = _font(size)
    chars_per_line = max(8, int(width / (size * 0.55)))
    lines = textwrap.wrap(prompt, chars_per_line)[:4]
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    line_height = int(size * 1.25)
    top = height - line_height * len(lines) - size
    draw.rectangle((0, top - size // 2, width, height), fill=(0, 0, 0, 140))
    for index, line in enumerate(lines):
        draw.text(
            (size // 2, top + index * line_height), line, font=font, fill=(255, 255, 255, 255)
        )
    draw.text((size // 2, size // 2), f"seed {seed}", font=font, fill=(255, 255, 255, 200))
    image.alpha_composite(overlay)


_fonts = threading.local()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Loading the font is a good part of drawing a small image: do it once per size, in
    each thread (a FreeType face is not to be shared between threads)."""
    cache: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] | None = getattr(
        _fonts, "by_size", None
    )
    if cache is None:
        cache = _fonts.by_size = {}
    font = cache.get(size)
    if font is None:
        font = cache[size] = ImageFont.load_default(size=size)
    return font


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return round(r * 255), round(g * 255), round(b * 255)
