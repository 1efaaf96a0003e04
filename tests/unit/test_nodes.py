"""The built-in node types, run against an in-memory context."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat
from pydantic import ValidationError

from imagegraph import drawing
from imagegraph.errors import NodeError
from imagegraph.nodes import builtin_registry, imaging, sandbox
from imagegraph.nodes.base import Outputs
from imagegraph.nodes.values import ImageValue
from imagegraph.testing import MemoryContext

REGISTRY = builtin_registry()

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
WHITE = (255, 255, 255)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

# Mean absolute difference per channel (0..255) above which two images are clearly different.
VISIBLY_DIFFERENT = 15.0


async def run(
    node_type: str,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    ctx: MemoryContext | None = None,
) -> Outputs:
    node = REGISTRY[node_type]
    context = ctx if ctx is not None else MemoryContext()
    return await node.run(context.as_context(), node.parse_params(params or {}), inputs or {})


def halves(width: int = 200, height: int = 100) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    return image


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    stat = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
    return sum(stat.mean) / len(stat.mean)


def pixel(ctx: MemoryContext, value: ImageValue, xy: tuple[int, int]) -> Any:
    return ctx.load_image(value).convert("RGB").getpixel(xy)


def is_close(color: Any, expected: tuple[int, int, int], tolerance: int = 8) -> bool:
    return all(abs(c - e) <= tolerance for c, e in zip(color, expected, strict=True))


# generate:sandbox


async def generate(
    prompt: str = "a red fox in the snow", ctx: MemoryContext | None = None, **params: Any
) -> tuple[MemoryContext, ImageValue]:
    context = ctx if ctx is not None else MemoryContext()
    settings: dict[str, Any] = {"width": 96, "height": 96, "seed": 7, **params}
    out = await run("generate:sandbox", settings, {"prompt": prompt}, context)
    return context, out["image"]


async def test_sandbox_is_deterministic_to_the_byte() -> None:
    first_ctx, first = await generate(steps=12, guidance=3.0)
    second_ctx, second = await generate(steps=12, guidance=3.0)

    first_bytes = first_ctx.bytes_of(first)
    assert first_bytes.startswith(PNG_MAGIC)
    assert first_bytes == second_ctx.bytes_of(second)
    assert first.sha256 == second.sha256


async def test_sandbox_different_prompts_give_visibly_different_images() -> None:
    ctx, fox = await generate("a red fox in the snow")
    _, whale = await generate("a blue whale in the sea", ctx)

    assert mean_difference(ctx.load_image(fox), ctx.load_image(whale)) > VISIBLY_DIFFERENT


async def test_sandbox_different_seeds_give_visibly_different_images() -> None:
    ctx, one = await generate(seed=1)
    _, two = await generate(seed=2, ctx=ctx)

    assert mean_difference(ctx.load_image(one), ctx.load_image(two)) > VISIBLY_DIFFERENT


async def test_sandbox_negative_prompt_changes_the_image() -> None:
    ctx = MemoryContext()
    params = {"width": 96, "height": 96, "seed": 7}
    plain = await run("generate:sandbox", params, {"prompt": "fox"}, ctx)
    negative = await run(
        "generate:sandbox", params, {"prompt": "fox", "negativePrompt": "blurry"}, ctx
    )

    assert plain["image"].sha256 != negative["image"].sha256
    assert negative["image"].generation["negativePrompt"] == "blurry"
    assert plain["image"].generation["negativePrompt"] is None


async def test_sandbox_honours_width_and_height() -> None:
    ctx, image = await generate(width=96, height=160)

    assert (image.width, image.height) == (96, 160)
    assert ctx.load_image(image).size == (96, 160)


@pytest.mark.parametrize(
    "params",
    [{"width": 63}, {"width": 2049}, {"height": 63}, {"height": 2049}, {"seed": -1}],
)
def test_sandbox_size_and_seed_bounds_are_enforced(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        REGISTRY["generate:sandbox"].parse_params(params)


def test_sandbox_accepts_the_size_bounds() -> None:
    params = REGISTRY["generate:sandbox"].parse_params({"width": 64, "height": 2048})

    assert (params.width, params.height) == (64, 2048)


async def test_sandbox_records_how_the_image_was_made() -> None:
    ctx = MemoryContext(node_id="gen-1")
    _, image = await generate("  a fox  ", ctx, steps=5, guidance=2.0)

    assert image.generation == {
        "prompt": "a fox",
        "negativePrompt": None,
        "seed": 7,
        "model": "sandbox",
        "provider": "sandbox",
        "params": {"width": 96, "height": 96, "steps": 5, "guidance": 2.0},
        "nodeId": "gen-1",
    }


async def test_sandbox_random_seed_is_recorded_and_reproduces_the_image() -> None:
    node = REGISTRY["generate:sandbox"]
    params = node.parse_params({"width": 64, "height": 64})
    ctx = MemoryContext()

    out = await node.run(ctx, params, {"prompt": "fox"})

    seed = out["image"].generation["seed"]
    assert isinstance(seed, int)
    assert 0 <= seed <= sandbox.MAX_SEED
    assert node.is_cacheable(params, {}) is False
    _, fixed = await generate("fox", ctx, width=64, height=64, seed=seed)
    assert fixed.sha256 == out["image"].sha256


def test_sandbox_with_a_fixed_seed_is_cacheable() -> None:
    node = REGISTRY["generate:sandbox"]

    assert node.is_cacheable(node.parse_params({"seed": 0}), {}) is True


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
async def test_sandbox_refuses_an_empty_prompt(prompt: str) -> None:
    ctx = MemoryContext()
    with pytest.raises(NodeError) as info:
        await generate(prompt, ctx)

    assert info.value.code == "empty_prompt"
    assert ctx.stored == []


async def test_sandbox_delay_reports_progress() -> None:
    ctx, value = await generate(delayMs=500)

    fractions = [fraction for fraction, _ in ctx.progress_calls]
    assert fractions == pytest.approx([(i + 1) / 6 for i in range(5)])  # every 0.1 s
    assert all(message == "waiting for the sandbox provider" for _, message in ctx.progress_calls)
    assert ctx.stored[-1].value == value  # drawn while waiting, stored once
    assert ctx.process_calls == 1  # drawn in a process of its own


async def test_sandbox_waits_in_one_sleep_while_nobody_follows() -> None:
    ctx, _ = await generate(ctx=MemoryContext(followed=False), delayMs=500)

    assert [fraction for fraction, _ in ctx.progress_calls] == pytest.approx([5 / 6])


async def test_sandbox_without_delay_reports_no_progress() -> None:
    ctx, _ = await generate()

    assert ctx.progress_calls == []
    assert ctx.process_calls == 1


# image:resize


async def resize(source: Image.Image, **params: Any) -> tuple[MemoryContext, ImageValue]:
    ctx = MemoryContext()
    value = ctx.put_image(source)
    out = await run("image:resize", params, {"image": value}, ctx)
    return ctx, out["image"]


@pytest.mark.parametrize(
    ("mode", "box", "expected"),
    [
        ("contain", (100, 100), (100, 50)),
        ("contain", (400, 400), (400, 200)),
        ("contain", (50, 100), (50, 25)),
        ("cover", (100, 100), (100, 100)),
        ("fill", (100, 100), (100, 100)),
        ("exact", (100, 100), (100, 100)),
        ("exact", (30, 70), (30, 70)),
    ],
)
async def test_resize_modes_give_the_expected_size(
    mode: str, box: tuple[int, int], expected: tuple[int, int]
) -> None:
    ctx, image = await resize(halves(200, 100), width=box[0], height=box[1], mode=mode)

    assert (image.width, image.height) == expected
    assert ctx.load_image(image).size == expected


async def test_resize_cover_crops_the_overflow_instead_of_padding() -> None:
    ctx, image = await resize(halves(200, 100), width=100, height=100, mode="cover")

    assert is_close(pixel(ctx, image, (10, 50)), RED)
    assert is_close(pixel(ctx, image, (90, 50)), BLUE)
    assert is_close(pixel(ctx, image, (10, 2)), RED)


async def test_resize_fill_pads_with_the_background_colour() -> None:
    ctx, image = await resize(
        halves(200, 100), width=100, height=100, mode="fill", background="#00ff00"
    )

    assert is_close(pixel(ctx, image, (50, 5)), GREEN)
    assert is_close(pixel(ctx, image, (50, 95)), GREEN)
    assert is_close(pixel(ctx, image, (10, 50)), RED)
    assert is_close(pixel(ctx, image, (90, 50)), BLUE)


async def test_resize_exact_stretches_without_padding() -> None:
    ctx, image = await resize(halves(200, 100), width=100, height=100, mode="exact")

    assert is_close(pixel(ctx, image, (10, 2)), RED)
    assert is_close(pixel(ctx, image, (90, 97)), BLUE)


async def test_resize_records_its_source_as_parent() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(halves())
    await run("image:resize", {"width": 50, "height": 50}, {"image": source}, ctx)

    assert ctx.stored[-1].parents == (source,)
    assert ctx.cpu_calls == 1


async def test_resize_refuses_a_result_over_the_pixel_limit() -> None:
    ctx = MemoryContext(max_pixels=10_000)
    source = ctx.put_image(halves())

    with pytest.raises(NodeError) as info:
        await run("image:resize", {"width": 200, "height": 200}, {"image": source}, ctx)

    assert info.value.code == "image_too_large"
    assert "200x200" in info.value.message
    assert ctx.stored == []


def test_resize_refuses_a_background_that_is_not_a_colour() -> None:
    with pytest.raises(ValidationError, match="is not a color"):
        REGISTRY["image:resize"].parse_params({"background": "blurple"})


# image:crop


async def test_crop_inside_the_image() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(halves(200, 100))

    out = await run(
        "image:crop", {"x": 90, "y": 10, "width": 20, "height": 30}, {"image": source}, ctx
    )

    image = out["image"]
    assert (image.width, image.height) == (20, 30)
    assert pixel(ctx, image, (0, 0)) == RED
    assert pixel(ctx, image, (19, 29)) == BLUE


async def test_crop_of_the_whole_image_is_allowed() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(halves(200, 100))

    out = await run("image:crop", {"width": 200, "height": 100}, {"image": source}, ctx)

    assert (out["image"].width, out["image"].height) == (200, 100)


async def test_crop_outside_the_image_names_the_box_and_the_image_size() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(halves(200, 100))

    with pytest.raises(NodeError) as info:
        await run(
            "image:crop", {"x": 150, "y": 0, "width": 100, "height": 50}, {"image": source}, ctx
        )

    assert info.value.code == "crop_out_of_bounds"
    assert "x=150 y=0 100x50" in info.value.message
    assert "(250, 50)" in info.value.message
    assert "200x100 image" in info.value.message


# upscale:lanczos


@pytest.mark.parametrize(("factor", "expected"), [(2, (60, 40)), (4, (120, 80))])
async def test_upscale_multiplies_the_size(factor: int, expected: tuple[int, int]) -> None:
    ctx = MemoryContext()
    source = ctx.put_image(halves(30, 20))

    out = await run("upscale:lanczos", {"factor": factor}, {"image": source}, ctx)

    assert (out["image"].width, out["image"].height) == expected
    assert ctx.load_image(out["image"]).size == expected


def test_upscale_only_knows_two_and_four() -> None:
    with pytest.raises(ValidationError):
        REGISTRY["upscale:lanczos"].parse_params({"factor": 3})


async def test_upscale_refuses_a_result_over_the_pixel_limit() -> None:
    ctx = MemoryContext(max_pixels=2_000)
    source = ctx.put_image(halves(30, 20))

    with pytest.raises(NodeError) as info:
        await run("upscale:lanczos", {"factor": 2}, {"image": source}, ctx)

    assert info.value.code == "image_too_large"
    assert "60x40" in info.value.message
    assert ctx.stored == []


# convert:format


def detailed_image() -> Image.Image:
    return drawing.render("a detailed test picture", "", 3, 128, 128, 30, 7.5)


def format_of(data: bytes) -> str:
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "avif"
    return "unknown"


CONVERT_FORMATS = [
    "png",
    "jpeg",
    "webp",
    pytest.param(
        "avif",
        marks=pytest.mark.skipif(not imaging.avif_supported(), reason="Pillow without AVIF"),
    ),
]


@pytest.mark.parametrize("fmt", CONVERT_FORMATS)
async def test_convert_writes_the_requested_format(fmt: str) -> None:
    ctx = MemoryContext()
    source = ctx.put_image(halves(64, 32))

    out = await run("convert:format", {"format": fmt}, {"image": source}, ctx)

    data = ctx.bytes_of(out["image"])
    assert format_of(data) == fmt
    assert out["image"].format == fmt
    assert imaging.probe(data, 10_000) == (fmt, 64, 32)


async def test_convert_quality_changes_jpeg_size() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(detailed_image())

    low = await run("convert:format", {"format": "jpeg", "quality": 10}, {"image": source}, ctx)
    high = await run("convert:format", {"format": "jpeg", "quality": 95}, {"image": source}, ctx)

    assert len(ctx.bytes_of(low["image"])) * 2 < len(ctx.bytes_of(high["image"]))


def test_convert_quality_bounds() -> None:
    node = REGISTRY["convert:format"]
    for quality in (0, 101):
        with pytest.raises(ValidationError):
            node.parse_params({"format": "jpeg", "quality": quality})


# output:image


async def test_output_original_stores_the_incoming_bytes_unchanged() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(detailed_image(), "jpeg")

    out = await run("output:image", {"format": "original"}, {"image": source}, ctx)

    stored = ctx.stored[-1]
    assert stored.data == ctx.bytes_of(source)
    assert out["image"].sha256 == source.sha256
    assert out["image"].format == "jpeg"
    assert stored.kind == "output"
    assert stored.parents == (source,)


async def test_output_in_the_incoming_format_keeps_the_bytes() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(detailed_image(), "png")

    out = await run("output:image", {"format": "png"}, {"image": source}, ctx)

    assert out["image"].sha256 == source.sha256


async def test_output_in_another_format_re_encodes() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(detailed_image(), "png")

    out = await run("output:image", {"format": "jpeg", "quality": 80}, {"image": source}, ctx)

    stored = ctx.stored[-1]
    assert format_of(stored.data) == "jpeg"
    assert out["image"].format == "jpeg"
    assert out["image"].sha256 != source.sha256
    assert (stored.kind, stored.quality) == ("output", 80)
    assert (out["image"].width, out["image"].height) == (128, 128)


async def test_output_original_with_a_quality_re_encodes_in_the_same_format() -> None:
    ctx = MemoryContext()
    source = ctx.put_image(detailed_image(), "jpeg")

    out = await run("output:image", {"format": "original", "quality": 10}, {"image": source}, ctx)

    data = ctx.stored[-1].data
    assert format_of(data) == "jpeg"
    assert len(data) < len(ctx.bytes_of(source))
    assert out["image"].format == "jpeg"


@pytest.mark.parametrize("fmt", ["gif", "bmp", "tiff"])
async def test_output_of_a_format_we_only_read_re_encodes_as_png(fmt: str) -> None:
    ctx = MemoryContext()
    source = ctx.put_image(detailed_image().convert("RGB"), "png")
    pillow_name = {"gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}[fmt]
    buffer = io.BytesIO()
    ctx.load_image(source).save(buffer, pillow_name)
    original = ctx.put_bytes(buffer.getvalue())
    assert original.format == fmt

    out = await run("output:image", {"format": "original", "quality": 50}, {"image": original}, ctx)

    assert format_of(ctx.stored[-1].data) == "png"
    assert out["image"].format == "png"


def test_output_filename_must_be_a_plain_name() -> None:
    node = REGISTRY["output:image"]

    assert node.parse_params({"filename": "fox_01.v2"}).filename == "fox_01.v2"
    for bad in ("../etc/passwd", "a/b", ".hidden", ""):
        with pytest.raises(ValidationError):
            node.parse_params({"filename": bad})


# image:grid


async def grid(count: int, **params: Any) -> tuple[MemoryContext, ImageValue, list[ImageValue]]:
    colors = [RED, GREEN, BLUE, (255, 255, 0), (255, 0, 255), (0, 255, 255), (0, 0, 0)]
    ctx = MemoryContext()
    sources = [ctx.put_image(solid(colors[i])) for i in range(count)]
    settings = {"cellWidth": 32, "cellHeight": 32, "gap": 4, **params}
    out = await run("image:grid", settings, {"images": sources}, ctx)
    return ctx, out["image"], sources


async def test_grid_lays_out_images_near_square_in_list_order() -> None:
    ctx, sheet, sources = await grid(5)

    # 5 images -> 3 columns, 2 rows of 32px cells with 4px gaps around and between.
    assert (sheet.width, sheet.height) == (3 * 32 + 4 * 4, 2 * 32 + 3 * 4)
    centers = [(4 + 16 + col * 36, 4 + 16 + row * 36) for row in range(2) for col in range(3)]
    image = ctx.load_image(sheet)
    assert [image.getpixel(c) for c in centers[:5]] == [
        RED,
        GREEN,
        BLUE,
        (255, 255, 0),
        (255, 0, 255),
    ]
    assert image.getpixel(centers[5]) == WHITE  # no sixth image
    assert image.getpixel((1, 1)) == WHITE  # the gap
    assert ctx.stored[-1].parents == tuple(sources)


@pytest.mark.parametrize(("count", "columns", "rows"), [(1, 1, 1), (4, 2, 2), (7, 3, 3)])
async def test_grid_picks_a_near_square_layout(count: int, columns: int, rows: int) -> None:
    _, sheet, _ = await grid(count, gap=0)

    assert math.ceil(math.sqrt(count)) == columns
    assert (sheet.width, sheet.height) == (columns * 32, rows * 32)


async def test_grid_with_fixed_columns() -> None:
    _, sheet, _ = await grid(5, columns=5, gap=2, background="#000000")

    assert (sheet.width, sheet.height) == (5 * 32 + 6 * 2, 32 + 2 * 2)


async def test_grid_of_nothing_is_an_error() -> None:
    with pytest.raises(NodeError) as info:
        await run("image:grid", {}, {"images": []})

    assert info.value.code == "empty_list"


# prompt:template


async def template(
    text: str, inputs: Mapping[str, Any] | None = None, **params: Any
) -> dict[str, Any]:
    return await run("prompt:template", {"template": text, **params}, inputs or {})


async def test_template_substitutes_text_and_numbers() -> None:
    out = await template(
        "${count} ${animal}s, ${size}m tall, ${age} years",
        {"count": 5.0, "animal": "fox", "size": 2.5, "age": 3},
    )

    assert out["text"] == "5 foxs, 2.5m tall, 3 years"
    assert out["negativePrompt"] == ""


async def test_template_double_dollar_is_a_dollar_and_lone_dollars_are_text() -> None:
    out = await template("$$${price} or $5, $name and $", {"price": 10})

    assert out["text"] == "$10 or $5, $name and $"


async def test_template_values_are_not_substituted_again() -> None:
    out = await template("${a}", {"a": "${b} costs $$"})

    assert out["text"] == "${b} costs $$"


async def test_template_uses_defaults_and_inputs_override_them() -> None:
    params = {"variables": {"animal": "fox", "place": "snow"}}

    defaults = await template("${animal} in ${place}", {}, **params)
    overridden = await template("${animal} in ${place}", {"place": "rain"}, **params)

    assert defaults["text"] == "fox in snow"
    assert overridden["text"] == "fox in rain"


async def test_template_missing_variable_is_named() -> None:
    with pytest.raises(NodeError) as info:
        await template("${animal} in ${place}", {"animal": "fox"})

    assert info.value.code == "missing_variable"
    assert "place" in info.value.message
    assert "animal" not in info.value.message
    assert info.value.extra == {"variables": ["place"]}


@pytest.mark.parametrize(
    ("own", "shared", "expected"),
    [
        ("blurry", "low quality", "blurry, low quality"),
        ("", "low quality", "low quality"),
        ("  blurry ", None, "blurry"),
        ("", None, ""),
        ("blurry", "   ", "blurry"),
    ],
)
async def test_template_appends_the_shared_negative_prompt(
    own: str, shared: str | None, expected: str
) -> None:
    inputs: dict[str, Any] = {"subject": "fox"}
    if shared is not None:
        inputs["negativePrompt"] = shared

    out = await template("${subject}", inputs, negativePrompt=own)

    assert out["negativePrompt"] == expected
    assert out["text"] == "fox"


# control:branch


async def branch(value: Any, payload: Any = None, **params: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"value": value}
    if payload is not None:
        inputs["input"] = payload
    return await run("control:branch", params, inputs)


@pytest.mark.parametrize(
    ("operator", "compare_to", "value", "route"),
    [
        ("eq", 5, 5, "true"),
        ("eq", 5, 5.0, "true"),
        ("eq", 5, 6, "false"),
        ("ne", 5, 6, "true"),
        ("ne", 5, 5, "false"),
        ("gt", 3, 5, "true"),
        ("gt", 5, 5, "false"),
        ("gte", 5, 5, "true"),
        ("gte", 5, 4.9, "false"),
        ("lt", 3, 5, "false"),
        ("lt", 5, 4, "true"),
        ("lte", 5, 5, "true"),
        ("lte", 5, 6, "false"),
        ("gt", 3, " 7 ", "true"),
        ("eq", "5", 5, "true"),
        ("eq", 5, "5.0", "true"),  # text that reads as a number compares as one
        ("ne", 5, "5.0", "false"),
        ("eq", 5, "five", "false"),
    ],
)
async def test_branch_numeric_operators(
    operator: str, compare_to: Any, value: Any, route: str
) -> None:
    out = await branch(value, operator=operator, compareTo=compare_to)

    assert out == {route: value}


@pytest.mark.parametrize(
    ("operator", "compare_to", "value", "case_sensitive", "route"),
    [
        ("eq", "fox", "FOX", False, "true"),
        ("eq", "fox", "FOX", True, "false"),
        ("ne", "fox", "FOX", True, "true"),
        ("contains", "Fox", "a red fox", False, "true"),
        ("contains", "Fox", "a red fox", True, "false"),
        ("contains", "wolf", "a red fox", False, "false"),
        ("not_contains", "wolf", "a red fox", False, "true"),
        ("matches", r"^a .* FOX$", "a red fox", False, "true"),
        ("matches", r"^a .* FOX$", "a red fox", True, "false"),
        ("matches", r"\d{3}", "code 123", True, "true"),
        ("empty", None, "", False, "true"),
        ("empty", None, "   ", False, "true"),
        ("empty", None, "x", False, "false"),
        ("not_empty", None, "x", False, "true"),
        ("not_empty", None, " ", False, "false"),
    ],
)
async def test_branch_text_operators(
    operator: str, compare_to: Any, value: Any, case_sensitive: bool, route: str
) -> None:
    out = await branch(value, operator=operator, compareTo=compare_to, caseSensitive=case_sensitive)

    assert out == {route: value}


async def test_branch_routes_input_when_it_is_given() -> None:
    payload = ImageValue("asset_x", "abc", "png", 1, 1)

    taken = await branch(10, payload, operator="gt", compareTo=3)
    not_taken = await branch(1, payload, operator="gt", compareTo=3)

    assert taken == {"true": payload}
    assert not_taken == {"false": payload}


async def test_branch_numeric_operator_on_text_that_is_not_a_number() -> None:
    with pytest.raises(NodeError) as info:
        await branch("lots", operator="gt", compareTo=3)

    assert info.value.code == "invalid_value"
    assert "'lots'" in info.value.message


# control:collect


async def test_collect_keeps_the_order_of_its_inputs() -> None:
    images = [ImageValue(f"asset_{i}", f"sha{i}", "png", 8, 8) for i in (2, 0, 1)]

    out = await run("control:collect", {}, {"images": images})

    assert out == {"images": images}
    assert out["images"] is not images


# input:text and input:number


async def test_input_text_outputs_its_text() -> None:
    assert await run("input:text", {"text": "a red fox"}) == {"text": "a red fox"}


@pytest.mark.parametrize(("value", "expected"), [(5.0, 5), (2.5, 2.5), (-3, -3)])
async def test_input_number_outputs_whole_numbers_as_ints(value: float, expected: float) -> None:
    out = await run("input:number", {"value": value})

    assert out == {"number": expected}
    assert type(out["number"]) is type(expected)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"value": 11, "maximum": 10}, "above the maximum 10"),
        ({"value": -1, "minimum": 0}, "below the minimum 0"),
    ],
)
def test_input_number_bounds(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        REGISTRY["input:number"].parse_params(params)


# input:image


def png_bytes(image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or halves(20, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def test_input_image_decodes_a_data_uri() -> None:
    data = png_bytes()
    ctx = MemoryContext()

    out = await run("input:image", {"image": data_uri(data)}, ctx=ctx)

    image = out["image"]
    assert ctx.bytes_of(image) == data
    assert (image.format, image.width, image.height) == ("png", 20, 10)
    assert image.generation == {"source": "data-uri"}
    assert ctx.stored[-1].kind == "upload"


async def test_input_image_data_uri_with_invalid_base64() -> None:
    with pytest.raises(NodeError) as info:
        await run("input:image", {"image": "data:image/png;base64,not*base64!"})

    assert info.value.code == "invalid_image"
    assert "not valid base64" in info.value.message


async def test_input_image_data_uri_must_be_base64() -> None:
    with pytest.raises(NodeError) as info:
        await run("input:image", {"image": "data:image/png,rawbytes"})

    assert info.value.code == "invalid_image"
    assert "base64" in info.value.message


async def test_input_image_data_uri_that_is_not_an_image() -> None:
    ctx = MemoryContext()
    with pytest.raises(NodeError) as info:
        await run("input:image", {"image": data_uri(b"hello, world")}, ctx=ctx)

    assert info.value.code == "invalid_image"
    assert "not a supported image" in info.value.message
    assert ctx.stored == []


async def test_input_image_refuses_an_image_over_the_pixel_limit() -> None:
    ctx = MemoryContext(max_pixels=100)

    with pytest.raises(NodeError) as info:
        await run("input:image", {"image": data_uri(png_bytes())}, ctx=ctx)

    assert info.value.code == "invalid_image"
    assert "20x10" in info.value.message


def test_input_image_refuses_a_data_uri_of_another_media_type() -> None:
    node = REGISTRY["input:image"]
    params = node.parse_params({"image": data_uri(b"hello", "text/plain")})

    assert [(i.code, i.field) for i in node.check(params)] == [("invalid_param", "params.image")]


async def test_input_image_fetches_a_url() -> None:
    url = "https://images.example.com/fox.png"
    data = png_bytes()
    ctx = MemoryContext(fetchable={url: data})

    out = await run("input:image", {"image": url}, ctx=ctx)

    assert ctx.fetched == [url]
    assert ctx.bytes_of(out["image"]) == data
    assert out["image"].generation == {"source": "url", "url": url}


async def test_input_image_url_that_is_not_an_image() -> None:
    url = "https://example.com/page.html"
    ctx = MemoryContext(fetchable={url: b"<html></html>"})

    with pytest.raises(NodeError) as info:
        await run("input:image", {"image": url}, ctx=ctx)

    assert info.value.code == "invalid_image"


async def test_input_image_looks_up_an_asset() -> None:
    asset_id = "asset_01HZZZZZZZZZZZZZZZZZZZZZZZ"
    value = ImageValue(asset_id, "abc", "png", 4, 4)
    ctx = MemoryContext(assets={asset_id: value})

    out = await run("input:image", {"image": asset_id}, ctx=ctx)

    assert out == {"image": value}
    assert ctx.fetched == []


def test_input_image_reports_its_asset_and_url_references() -> None:
    node = REGISTRY["input:image"]
    asset_id = "asset_01HZZZZZZZZZZZZZZZZZZZZZZZ"
    url = "https://example.com/a.png"

    assert node.asset_refs(node.parse_params({"image": asset_id})) == {"params.image": asset_id}
    assert node.url_refs(node.parse_params({"image": asset_id})) == {}
    assert node.url_refs(node.parse_params({"image": url})) == {"params.image": url}
    assert node.asset_refs(node.parse_params({"image": url})) == {}
