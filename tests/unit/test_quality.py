"""Quality measurements (`imagegraph.quality`) and the quality nodes on an in-memory context."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter
from pydantic import ValidationError

from imagegraph import quality
from imagegraph.drawing import render
from imagegraph.nodes import builtin_registry
from imagegraph.nodes.base import Outputs
from imagegraph.nodes.values import ImageValue
from imagegraph.testing import MemoryContext

REGISTRY = builtin_registry()


def checkerboard(size: int = 256, square: int = 8) -> Image.Image:
    cells = np.indices((size, size)).sum(axis=0) // square
    return Image.fromarray(((cells % 2) * 255).astype(np.uint8))


def sandbox(seed: int, width: int = 256, height: int = 256) -> Image.Image:
    return render("a lighthouse at dusk", "", seed, width, height, 20, 7.5)


def noise(size: int = 128, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))


def gradient(size: int = 128) -> Image.Image:
    return Image.linear_gradient("L").resize((size, size))


def jpeg(image: Image.Image, q: int = 80) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=q)
    return Image.open(io.BytesIO(buffer.getvalue()))


def flip(hex_hash: str, *bits: int) -> str:
    value = int(hex_hash, 16)
    for bit in bits:
        value ^= 1 << bit
    return f"{value:016x}"


# Sharpness, brightness, contrast


def test_a_sharp_checkerboard_is_sharper_than_its_blurred_copy() -> None:
    sharp = checkerboard()
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    assert quality.laplacian_variance(sharp) > 10 * quality.laplacian_variance(blurred)
    assert quality.laplacian_variance(blurred) > 0


def test_a_flat_image_has_no_sharpness_and_no_contrast() -> None:
    flat = Image.new("RGB", (100, 60), (100, 100, 100))
    assert quality.laplacian_variance(flat) == 0.0
    assert quality.luminance_stats(flat) == (100.0, 0.0)


def test_brightness_and_contrast_of_known_images() -> None:
    halves = Image.new("L", (100, 50), 0)
    halves.paste(255, (50, 0, 100, 50))
    assert quality.luminance_stats(halves) == (127.5, 127.5)
    # Luma of pure red: 0.299 * 255.
    brightness, contrast = quality.luminance_stats(Image.new("RGB", (10, 10), (255, 0, 0)))
    assert (brightness, contrast) == (76.0, 0.0)
    assert quality.luminance_stats(gradient(256))[0] == pytest.approx(127.5, abs=1)


def test_transparent_pixels_count_as_white() -> None:
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert quality.luminance_stats(clear) == (255.0, 0.0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (8, 8), 257 * 100)
    assert quality.luminance_stats(image) == (100.0, 0.0)


def test_measure_scales_large_images_down_and_says_so() -> None:
    found = quality.measure(sandbox(3, 1024, 768))
    assert found.measured_at == (512, 384)
    small = quality.measure(sandbox(3, 200, 100))
    assert small.measured_at == (200, 100)
    assert small.sharpness > 0
    assert 0 < small.brightness < 255
    assert small.contrast > 0


# Perceptual hash and SSIM


def test_phash_is_64_bits_of_hex() -> None:
    value = quality.phash(sandbox(1))
    assert len(value) == 16
    int(value, 16)


def test_phash_survives_resizing_and_jpeg_reencoding() -> None:
    original = sandbox(5, 512, 512)
    copy = jpeg(original.resize((460, 460), Image.Resampling.BICUBIC), q=80)
    assert quality.hamming(quality.phash(original), quality.phash(copy)) <= 4


def test_phash_tells_different_images_apart() -> None:
    hashes = [quality.phash(sandbox(seed)) for seed in (1, 2, 3)]
    for i, a in enumerate(hashes):
        for b in hashes[i + 1 :]:
            assert quality.hamming(a, b) > 12
    assert quality.hamming(quality.phash(noise()), quality.phash(gradient())) > 12


def test_hamming_counts_differing_bits_and_refuses_mismatches() -> None:
    assert quality.hamming("0000000000000000", "ffffffffffffffff") == 64
    assert quality.hamming("00f0", "00f0") == 0
    with pytest.raises(ValueError, match="different lengths"):
        quality.hamming("00", "000")
    with pytest.raises(ValueError, match="not a hex hash"):
        quality.hamming("zz", "00")


def test_ssim_is_one_for_identical_images() -> None:
    image = sandbox(9)
    assert quality.ssim(image, image.copy()) == 1.0


def test_ssim_of_noise_against_a_gradient_is_low() -> None:
    assert quality.ssim(noise(), gradient()) < 0.5


def test_ssim_resizes_the_second_image_and_ranks_similarity() -> None:
    image = sandbox(4, 200, 200)
    near = quality.ssim(image, jpeg(image.resize((300, 300)), q=80))
    far = quality.ssim(image, sandbox(12, 200, 200))
    assert 0.8 < near < 1.0
    assert far < near


def test_ssim_works_on_images_smaller_than_its_window() -> None:
    tiny = Image.new("L", (5, 7), 40)
    assert quality.ssim(tiny, tiny) == 1.0


# Near-duplicate groups


def test_near_duplicate_groups_keep_the_first_and_pick_the_nearest_keeper() -> None:
    a = "f0f0f0f0f0f0f0f0"
    b = "0f0f0f0f0f0f0f0f"  # 64 bits from a
    hashes = [
        a,
        flip(a, 1),  # 1: a's duplicate
        b,
        flip(a, 1, 2, 3),  # 3: 3 bits from a
        b,  # 4: b exactly
        flip(a, *range(10)),  # 5: 10 bits from a: a new keeper at max_distance 6
        flip(a, *range(9)),  # 6: 1 bit from item 5, 9 from a: joins the nearer keeper
    ]
    groups = quality.near_duplicate_groups(hashes, 6)
    assert [(g.keeper, [(d.index, d.distance) for d in g.duplicates]) for g in groups] == [
        (0, [(1, 1), (3, 3)]),
        (2, [(4, 0)]),
        (5, [(6, 1)]),
    ]
    assert groups[0].indices == (0, 1, 3)
    assert all(d.duplicate_of == g.keeper for g in groups for d in g.duplicates)


def test_near_duplicate_groups_do_not_drift_along_a_chain() -> None:
    a = "0000000000000000"
    chain = [a, flip(a, *range(5)), flip(a, *range(10)), flip(a, *range(15))]
    groups = quality.near_duplicate_groups(chain, 6)
    # 1 joins 0; 2 is 5 bits from 1 but 10 from keeper 0, so it keeps; 3 joins 2.
    assert [(g.keeper, [d.index for d in g.duplicates]) for g in groups] == [(0, [1]), (2, [3])]


def test_near_duplicate_groups_edge_cases() -> None:
    assert quality.near_duplicate_groups([], 6) == []
    assert quality.near_duplicate_groups(["0" * 16, "f" * 16], 6) == []
    assert len(quality.near_duplicate_groups(["0" * 16, "0" * 16], 0)) == 1
    with pytest.raises(ValueError, match="hash 1"):
        quality.near_duplicate_groups(["0" * 16, "abc"], 6)
    with pytest.raises(ValueError, match="hash 0"):
        quality.near_duplicate_groups(["g" * 16], 6)


# The nodes, on a context in memory


def stored(ctx: MemoryContext, image: Image.Image, **quality_so_far: Any) -> ImageValue:
    value = ctx.store_image(image)
    return ImageValue(
        value.asset_id,
        value.sha256,
        value.format,
        value.width,
        value.height,
        {"seed": 1},
        quality=quality_so_far,
    )


async def run(
    ctx: MemoryContext, node_type: str, params: Mapping[str, Any], inputs: Mapping[str, Any]
) -> Outputs:
    node = REGISTRY[node_type]
    return await node.run(ctx.as_context(), node.parse_params(params), inputs)


async def test_check_passes_a_good_image_on_with_its_measurements() -> None:
    ctx = MemoryContext()
    source = stored(ctx, sandbox(2, 320, 180), earlier=1)
    out = await run(
        ctx,
        "quality:check",
        {"minWidth": 300, "aspectRatio": "16:9", "minSharpness": 10, "minContrast": 5},
        {"image": source},
    )
    assert out["passed"] is True
    scores = out["scores"]
    assert scores["failures"] == []
    assert (scores["width"], scores["height"], scores["aspectRatio"]) == (320, 180, 1.7778)
    assert scores["measuredAt"] == [320, 180]
    assert scores["nearBlank"] is False
    image = out["image"]
    assert (image.asset_id, image.sha256, image.generation) == (
        source.asset_id,
        source.sha256,
        source.generation,
    )
    assert image.quality["earlier"] == 1
    assert image.quality["sharpness"] == scores["sharpness"] > 10
    assert len(ctx.stored) == 1  # passed on, not stored again


async def test_check_names_every_failed_check_with_value_and_limit() -> None:
    ctx = MemoryContext()
    out = await run(
        ctx,
        "quality:check",
        {
            "minWidth": 4000,
            "minHeight": 3000,
            "aspectRatio": 1.5,
            "minSharpness": 1e9,
            "minBrightness": 250,
            "minContrast": 200,
        },
        {"image": stored(ctx, sandbox(2, 200, 100))},
    )
    assert out["passed"] is False
    failures = out["scores"]["failures"]
    assert [f.split(" ", 1)[0] for f in failures] == [
        "width",
        "height",
        "aspect",
        "sharpness",
        "brightness",
        "contrast",
    ]
    assert "width 200 is below minWidth 4000" in failures
    assert any("aspectRatio 1.5" in f and "33.3% off" in f for f in failures)
    assert any(f.startswith("sharpness ") and "minSharpness 1e+09" in f for f in failures)


async def test_check_flags_a_near_blank_image_even_without_limits() -> None:
    ctx = MemoryContext()
    flat = Image.fromarray(
        (np.full((64, 64), 120) + np.random.default_rng(0).integers(-2, 3, (64, 64))).astype(
            np.uint8
        )
    )
    out = await run(ctx, "quality:check", {}, {"image": stored(ctx, flat)})
    assert out["passed"] is False
    assert out["scores"]["nearBlank"] is True
    [failure] = out["scores"]["failures"]
    assert "near blank" in failure
    assert "blankThreshold 4" in failure
    off = await run(ctx, "quality:check", {"blankThreshold": 0}, {"image": stored(ctx, flat)})
    assert off["passed"] is True


def test_check_params_refuse_nonsense() -> None:
    node = REGISTRY["quality:check"]
    for bad in (
        {"aspectRatio": "wide"},
        {"aspectRatio": "16:0"},
        {"aspectRatio": 0},
        {"minBrightness": 200, "maxBrightness": 100},
        {"minWidth": 0},
        {"minSharpness": -1},
        {"blank": 1},
    ):
        with pytest.raises(ValidationError):
            node.parse_params(bad)
    assert node.parse_params({"aspectRatio": "4/3", "aspectTolerance": 0.1}).aspect_ratio == "4/3"


async def test_similarity_against_an_input_and_against_an_asset() -> None:
    ctx = MemoryContext()
    image = stored(ctx, sandbox(6))
    same = await run(ctx, "quality:similarity", {}, {"image": image, "reference": image})
    assert same["passed"] is True
    assert same["scores"]["hashDistance"] == 0
    assert same["scores"]["ssim"] == 1.0
    assert same["image"].quality["phash"] == same["scores"]["referencePhash"]

    other = stored(ctx, sandbox(7))
    ctx.assets["asset_01J0000000000000000000000A"] = other
    node = REGISTRY["quality:similarity"]
    params = {"referenceAssetId": "asset_01J0000000000000000000000A"}
    assert [p.name for p in node.input_ports(node.parse_params(params))] == ["image"]
    assert node.asset_refs(node.parse_params(params)) == {
        "params.referenceAssetId": "asset_01J0000000000000000000000A"
    }
    differs = await run(ctx, "quality:similarity", params, {"image": image})
    assert differs["passed"] is False
    assert differs["scores"]["hashDistance"] > 10
    assert differs["scores"]["referenceAssetId"] == other.asset_id
    assert any(f.startswith("hash distance ") for f in differs["scores"]["failures"])
    assert any(f.startswith("SSIM ") for f in differs["scores"]["failures"])


def test_similarity_reference_asset_id_must_be_an_asset_id() -> None:
    node = REGISTRY["quality:similarity"]
    assert node.parse_params({"referenceAssetId": ""}).reference_asset_id is None
    assert [p.name for p in node.input_ports(node.parse_params({}))] == ["image", "reference"]
    with pytest.raises(ValidationError, match="not an asset id"):
        node.parse_params({"referenceAssetId": "cat.png"})


async def test_dedupe_keeps_first_occurrences_in_order() -> None:
    ctx = MemoryContext()
    a, b = sandbox(1), sandbox(2)
    images = [
        stored(ctx, a),
        stored(ctx, b),
        stored(ctx, jpeg(a.resize((240, 240)), q=80)),
        stored(ctx, a),
        stored(ctx, sandbox(3)),
    ]
    out = await run(ctx, "quality:dedupe", {}, {"images": images})
    assert [v.sha256 for v in out["images"]] == [images[i].sha256 for i in (0, 1, 4)]
    assert all(v.quality["phash"] for v in out["images"])
    assert [(d["index"], d["duplicateOf"]) for d in out["duplicates"]] == [(2, 0), (3, 0)]
    assert out["duplicates"][1]["distance"] == 0
    assert (out["scores"]["count"], out["scores"]["kept"], out["scores"]["dropped"]) == (5, 3, 2)
    # Any two 64-bit hashes are at most 64 bits apart.
    loose = await run(ctx, "quality:dedupe", {"maxDistance": 64}, {"images": images})
    assert [v.sha256 for v in loose["images"]] == [images[0].sha256]
    assert {d["duplicateOf"] for d in loose["duplicates"]} == {0}


async def test_dedupe_of_nothing_is_nothing() -> None:
    out = await run(MemoryContext(), "quality:dedupe", {}, {"images": []})
    assert (out["images"], out["duplicates"], out["scores"]["count"]) == ([], [], 0)
