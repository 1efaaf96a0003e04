"""Decoding and encoding images safely. Pure functions over bytes and Pillow images.

Decoding refuses anything that is not one of a few well-known formats and checks the pixel
count from the header before decoding a single pixel, so a small file that declares a huge
canvas (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import re
from typing import Final

from PIL import Image, UnidentifiedImageError, features

from imagegraph.errors import InvalidImage

# Pillow format name -> our lower-case name.
_DECODERS: Final = {
    "PNG": "png",
    "JPEG": "jpeg",
    "WEBP": "webp",
    "AVIF": "avif",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
MIME_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}
EXTENSIONS: Final = {"jpeg": "jpg"}
DEFAULT_QUALITY: Final = {"jpeg": 90, "webp": 90, "avif": 75}


def avif_supported() -> bool:
    return bool(features.check("avif"))


def output_formats() -> tuple[str, ...]:
    """Formats images can be written in with the installed Pillow."""
    return ("png", "jpeg", "webp", "avif") if avif_supported() else ("png", "jpeg", "webp")


def extension(fmt: str) -> str:
    return EXTENSIONS.get(fmt, fmt)


def probe(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Format and size of an encoded image, read from its header only."""
    image = _open(data, max_pixels)
    return _DECODERS[image.format or ""], image.width, image.height


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an image, refusing unknown formats, truncated files and decompression bombs."""
    image = _open(data, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"image could not be decoded: {exc}") from None
    return image


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    # Our pixel limit is below Pillow's warning threshold (see settings), so Pillow's own
    # bomb check only ever fires as an error for images far beyond ours, or as a warning for
    # ones we refuse below anyway; where warnings are errors, that warning is raised here.
    try:
        image = Image.open(io.BytesIO(data), formats=list(_DECODERS))
    except UnidentifiedImageError:
        names = ", ".join(sorted(set(_DECODERS.values())))
        raise InvalidImage(f"not a supported image (expected one of: {names})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.1f} MP ({found.group(1)} pixels)" if found else "huge"
        raise InvalidImage(
            f"image is {size}; the limit is {max_pixels / 1e6:.1f} MP "
            "(refused as a possible decompression bomb)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"image header could not be read: {exc}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise InvalidImage(
            f"image is {image.width}x{image.height} pixels ({pixels / 1e6:.1f} MP); "
            f"the limit is {max_pixels / 1e6:.1f} MP (refused as a possible decompression bomb)"
        )
    return image


def for_storage(
    image: Image.Image | bytes,
    max_pixels: int,
    *,
    format: str | None = None,
    quality: int | None = None,
    intermediate: bool = False,
) -> tuple[bytes, str, int, int]:
    """The bytes to store for an image, with their format and size.

    Encoded bytes are kept as they are (and checked); a Pillow image is encoded in `format`
    (PNG by default). Intermediate results in the default format favour speed over size.
    """
    if isinstance(image, bytes):
        fmt, width, height = probe(image, max_pixels)
        return image, fmt, width, height
    fmt = format or "png"
    data = encode(image, fmt, quality, fast=format is None and intermediate)
    return data, fmt, image.width, image.height


def encode(
    image: Image.Image, fmt: str, quality: int | None = None, *, fast: bool = False
) -> bytes:
    """Encode an image. `fast` trades PNG size for speed (intermediate results)."""
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    buffer = io.BytesIO()
    if fmt == "png":
        image = _for_png(image)
        image.save(buffer, "PNG", compress_level=1 if fast else 6)
    elif fmt == "jpeg":
        _flatten(image).save(
            buffer, "JPEG", quality=quality or DEFAULT_QUALITY["jpeg"], optimize=not fast
        )
    elif fmt == "webp":
        q = quality or DEFAULT_QUALITY["webp"]
        _for_webp(image).save(buffer, "WEBP", quality=q, lossless=q >= 100, method=4)
    elif fmt == "avif":
        if not avif_supported():
            raise InvalidImage("AVIF is not supported by the installed Pillow")
        _for_webp(image).save(buffer, "AVIF", quality=quality or DEFAULT_QUALITY["avif"], speed=6)
    else:
        raise InvalidImage(f"cannot write images as {fmt!r}; use one of {output_formats()}")
    return buffer.getvalue()


def _for_png(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "1"):
        return image
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def _for_webp(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "RGBA"):
        return image
    has_alpha = "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if has_alpha else "RGB")


def _flatten(image: Image.Image) -> Image.Image:
    """JPEG has no alpha: composite on white rather than letting transparent pixels go black."""
    if image.mode in ("RGB", "L"):
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
