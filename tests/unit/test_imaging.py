"""Safe decoding and encoding of images."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, ImageChops, ImageFile, ImageStat

from imagegraph.drawing import render
from imagegraph.errors import InvalidImage
from imagegraph.nodes import imaging

MAX_PIXELS = 50_000_000
SUPPORTED = ("avif", "bmp", "gif", "jpeg", "png", "tiff", "webp")


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header declares a `width` x `height` RGB canvas."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def picture() -> Image.Image:
    return render("a test picture", "", 11, 96, 64, 20, 7.5)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    stat = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
    return sum(stat.mean) / len(stat.mean)


def color_at(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 4) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def refused(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """decode and probe both refuse `data`; returns decode's message."""
    with pytest.raises(InvalidImage) as from_probe:
        imaging.probe(data, max_pixels)
    with pytest.raises(InvalidImage) as from_decode:
        imaging.decode(data, max_pixels)
    assert from_probe.value.code == "invalid_image"
    return from_decode.value.message


# Decoding


def test_a_non_image_is_refused_with_the_supported_formats() -> None:
    message = refused(b"definitely not an image, just some text")

    assert message == f"not a supported image (expected one of: {', '.join(SUPPORTED)})"


def test_a_format_pillow_knows_but_we_do_not_accept_is_refused() -> None:
    message = refused(encoded(Image.new("RGB", (8, 8)), "PPM"))

    assert message.startswith("not a supported image")


def test_empty_bytes_are_refused() -> None:
    assert refused(b"") == "image is empty (0 bytes)"


def test_a_truncated_file_is_refused() -> None:
    data = imaging.encode(picture(), "png")

    with pytest.raises(InvalidImage) as info:
        imaging.decode(data[: len(data) // 2], MAX_PIXELS)

    assert info.value.message.startswith("image could not be decoded")


def test_a_file_cut_inside_its_header_is_refused() -> None:
    data = imaging.encode(picture(), "png")

    refused(data[:20])


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to decode pixels."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_huge_declared_canvas_is_refused_from_the_header() -> None:
    bomb = png_declaring(100_000, 100_000)
    assert len(bomb) < 100

    message = refused(bomb)

    assert "decompression bomb" in message
    assert "limit" in message


@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_canvas_over_our_limit_is_refused_naming_the_limit() -> None:
    message = refused(png_declaring(5_000, 5_000), max_pixels=16_000_000)

    assert message == (
        "image is 5000x5000 pixels (25.0 MP); the limit is 16.0 MP "
        "(refused as a possible decompression bomb)"
    )


@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_canvas_between_pillows_warning_and_error_sizes_is_refused() -> None:
    # 100 MP: Pillow warns (errors under strict warning filters) but does not refuse it.
    message = refused(png_declaring(10_000, 10_000))

    assert "decompression bomb" in message
    assert "10000x10000" in message or "100000000 pixels" in message


@pytest.mark.usefixtures("no_pixel_decoding")
def test_where_pillow_only_warns_our_own_limit_refuses_it() -> None:
    with pytest.warns(Image.DecompressionBombWarning):
        message = refused(png_declaring(10_000, 10_000))

    assert message.startswith("image is 10000x10000 pixels (100.0 MP); the limit is 50.0 MP")


def test_an_image_at_the_limit_is_accepted() -> None:
    data = imaging.encode(Image.new("RGB", (100, 50)), "png")

    assert imaging.probe(data, 5_000) == ("png", 100, 50)
    assert imaging.decode(data, 5_000).size == (100, 50)
    assert refused(data, 4_999).startswith("image is 100x50 pixels")


# Encoding


@pytest.mark.parametrize(
    "fmt",
    [
        "png",
        "jpeg",
        "webp",
        pytest.param(
            "avif",
            marks=pytest.mark.skipif(not imaging.avif_supported(), reason="Pillow without AVIF"),
        ),
    ],
)
def test_each_output_format_round_trips(fmt: str) -> None:
    original = picture()

    data = imaging.encode(original, fmt)

    assert imaging.probe(data, MAX_PIXELS) == (fmt, 96, 64)
    decoded = imaging.decode(data, MAX_PIXELS)
    assert decoded.size == (96, 64)
    assert mean_difference(original, decoded) < 8


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_lossless_encodings_keep_every_pixel(fmt: str) -> None:
    original = picture()

    decoded = imaging.decode(imaging.encode(original, fmt, quality=100), MAX_PIXELS)

    assert ImageChops.difference(original, decoded.convert("RGB")).getbbox() is None


def test_jpg_is_an_alias_for_jpeg() -> None:
    data = imaging.encode(picture(), "JPG")

    assert imaging.probe(data, MAX_PIXELS)[0] == "jpeg"


def test_an_unknown_output_format_is_refused() -> None:
    with pytest.raises(InvalidImage, match="cannot write images as 'gif'"):
        imaging.encode(picture(), "gif")


def test_jpeg_quality_changes_the_size() -> None:
    low = imaging.encode(picture(), "jpeg", quality=10)
    high = imaging.encode(picture(), "jpeg", quality=95)

    assert len(low) * 2 < len(high)


def test_jpeg_of_an_rgba_image_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (30, 10), (0, 0, 0, 0))  # transparent black
    image.paste((255, 0, 0, 255), (10, 0, 20, 10))  # opaque red
    image.paste((0, 0, 255, 128), (20, 0, 30, 10))  # half-transparent blue

    decoded = imaging.decode(imaging.encode(image, "jpeg", quality=100), MAX_PIXELS)

    assert decoded.mode == "RGB"
    assert near(color_at(decoded, (5, 5)), (255, 255, 255))  # white, not black
    assert near(color_at(decoded, (15, 5)), (255, 0, 0))
    assert near(color_at(decoded, (25, 5)), (127, 127, 255), tolerance=6)


def test_jpeg_of_a_greyscale_alpha_image_is_flattened_onto_white() -> None:
    image = Image.new("LA", (8, 8), (0, 0))

    decoded = imaging.decode(imaging.encode(image, "jpeg"), MAX_PIXELS)

    assert decoded.convert("RGB").getpixel((4, 4)) == (255, 255, 255)


def test_png_keeps_transparency() -> None:
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))

    decoded = imaging.decode(imaging.encode(image, "png"), MAX_PIXELS)

    assert decoded.mode == "RGBA"
    assert decoded.getpixel((0, 0)) == (10, 20, 30, 0)


def test_webp_keeps_the_transparency_of_a_palette_image() -> None:
    image = Image.new("P", (4, 4), 0)
    image.info["transparency"] = 0

    decoded = imaging.decode(imaging.encode(image, "webp", quality=100), MAX_PIXELS)

    assert decoded.mode == "RGBA"
    assert color_at(decoded, (0, 0))[3] == 0


def test_png_of_a_cmyk_image_is_converted_to_rgb() -> None:
    image = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red

    decoded = imaging.decode(imaging.encode(image, "png"), MAX_PIXELS)

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_fast_png_is_not_smaller_than_normal_png() -> None:
    fast = imaging.encode(picture(), "png", fast=True)
    normal = imaging.encode(picture(), "png")

    assert len(fast) >= len(normal)
    assert (
        imaging.decode(fast, MAX_PIXELS).tobytes() == imaging.decode(normal, MAX_PIXELS).tobytes()
    )


def test_avif_is_refused_when_pillow_cannot_write_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "avif_supported", lambda: False)

    assert imaging.output_formats() == ("png", "jpeg", "webp")
    with pytest.raises(InvalidImage, match="AVIF is not supported"):
        imaging.encode(picture(), "avif")


def test_output_formats_include_avif_when_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "avif_supported", lambda: True)

    assert imaging.output_formats() == ("png", "jpeg", "webp", "avif")


@pytest.mark.parametrize(("fmt", "ext"), [("jpeg", "jpg"), ("png", "png"), ("webp", "webp")])
def test_file_extensions(fmt: str, ext: str) -> None:
    assert imaging.extension(fmt) == ext
