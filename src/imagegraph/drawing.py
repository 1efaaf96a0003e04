"""The sandbox's pictures: a deterministic drawing of a prompt, in PIL only.

A pure function of (prompt, negative prompt, seed, size, steps, guidance): a PRNG seeded
from their hash picks a gradient, shapes and colours, and the prompt is written on the
image. Same inputs give byte-identical PNGs; a different prompt or seed gives a visibly
different picture.

Kept apart from the node (`imagegraph.nodes.sandbox`) so that the worker processes that
draw (`imagegraph.engine.processes`) import PIL and this, nothing else.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import random
import textwrap
import threading

from PIL import Image, ImageDraw, ImageFont, ImageOps


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
    """`render`, encoded as the engine stores a generated image (an RGB PNG, quick to
    write: the same bytes as `imaging.encode(image, "png", fast=True)`)."""
    buffer = io.BytesIO()
    render(prompt, negative, seed, width, height, steps, guidance).save(
        buffer, "PNG", compress_level=1
    )
    return buffer.getvalue()


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
