"""Image quality measurements: sharpness, brightness, contrast, perceptual hashes, SSIM.

Pure functions over Pillow images and hash strings; no I/O, no model weights. The quality
nodes run them on a node's image, and the batch layer runs `near_duplicate_groups` over the
hashes stored with a whole batch's assets.

    >>> from PIL import Image
    >>> flat = Image.new("RGB", (64, 64), (128, 128, 128))
    >>> laplacian_variance(flat), luminance_stats(flat)
    (0.0, (128.0, 0.0))
    >>> hamming(phash(flat), phash(flat.resize((48, 48))))
    0

Grayscale means ITU-R 601 luma (Pillow's "L"), on 0..255. Transparent pixels are measured
as they would look flattened onto white, the way a JPEG export shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

FloatArray = npt.NDArray[np.float64]

# Measurements depend on scale (a sharp 4096 px image is soft at 1:1 but crisp when shown
# at 512 px), so they are taken on a copy that fits this box, which also bounds their cost.
MEASURE_SIDE: Final = 512
# pHash: a 32x32 grayscale thumbnail, the 8x8 lowest frequencies of its DCT, one bit each.
_HASH_SIZE: Final = 8
_HASH_SOURCE: Final = 32
# SSIM as Wang et al. (2004) define it: an 11x11 Gaussian window (sigma 1.5), K1, K2 and L.
_SSIM_WINDOW: Final = 11
_SSIM_SIGMA: Final = 1.5
_C1: Final = (0.01 * 255) ** 2
_C2: Final = (0.03 * 255) ** 2


@dataclass(frozen=True)
class Measurements:
    """What `measure` finds in an image: sharpness (variance of the Laplacian), brightness
    (mean luma) and contrast (RMS contrast: standard deviation of luma), taken at
    `measured_at` (width, height)."""

    sharpness: float
    brightness: float
    contrast: float
    measured_at: tuple[int, int]


@dataclass(frozen=True)
class NearDuplicate:
    """Item `index` looks like item `duplicate_of` (its keeper): `distance` bits apart."""

    index: int
    duplicate_of: int
    distance: int


@dataclass(frozen=True)
class DuplicateGroup:
    """A keeper (the first occurrence) and the later items that are near-duplicates of it."""

    keeper: int
    duplicates: tuple[NearDuplicate, ...]

    @property
    def indices(self) -> tuple[int, ...]:
        return (self.keeper, *(d.index for d in self.duplicates))


def for_measurement(image: Image.Image, max_side: int = MEASURE_SIDE) -> Image.Image:
    """`image` scaled down to fit `max_side` x `max_side` (smaller images as they are)."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.mode in ("1", "P"):
        # Pillow resizes these with nearest neighbour only, which would alias.
        image = image.convert("RGBA" if image.mode == "P" else "L")
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def grayscale(image: Image.Image) -> FloatArray:
    """Luma of every pixel, 0..255, as a float array of shape (height, width)."""
    if image.mode.startswith("I"):
        # 16-bit grayscale: Pillow's conversion to "L" clips instead of scaling.
        return np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0.0, 255.0)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float64), 0.0, 255.0)
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    return np.asarray(image.convert("L"), dtype=np.float64)


def laplacian_variance(image: Image.Image) -> float:
    """Sharpness: the variance of the 4-neighbour Laplacian of the grayscale image (what
    OpenCV's `Laplacian(gray, CV_64F).var()` gives, without the border). Higher is sharper;
    0 for a flat image. Depends on scale: see `MEASURE_SIDE`."""
    return _laplacian_variance(grayscale(image))


def luminance_stats(image: Image.Image) -> tuple[float, float]:
    """Brightness (mean luma) and RMS contrast (standard deviation of luma), both 0..255."""
    gray = grayscale(image)
    return float(gray.mean()), float(gray.std())


def measure(image: Image.Image, max_side: int = MEASURE_SIDE) -> Measurements:
    """Sharpness, brightness and contrast of `image`, scaled to fit `max_side` first."""
    measured = for_measurement(image, max_side)
    gray = grayscale(measured)
    return Measurements(
        sharpness=_laplacian_variance(gray),
        brightness=float(gray.mean()),
        contrast=float(gray.std()),
        measured_at=measured.size,
    )


def _laplacian_variance(gray: FloatArray) -> float:
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    centre = gray[1:-1, 1:-1]
    laplacian = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4 * centre
    return float(laplacian.var())


def _dct_matrix(size: int) -> FloatArray:
    k = np.arange(size, dtype=np.float64)[:, None]
    n = np.arange(size, dtype=np.float64)[None, :]
    return np.cos(np.pi * (2 * n + 1) * k / (2 * size))


_DCT: Final = _dct_matrix(_HASH_SOURCE)


def phash(image: Image.Image) -> str:
    """The 64-bit perceptual hash (DCT pHash) of an image, as 16 hex digits.

    The usual construction: a 32x32 grayscale thumbnail, its 2-D DCT, and one bit per
    coefficient of the 8x8 lowest frequencies, set when it is above their median (first
    coefficient in the most significant bit). Resizing and re-encoding barely change it;
    compare hashes with `hamming`.
    """
    thumbnail = for_measurement(image, 4 * _HASH_SOURCE).resize(
        (_HASH_SOURCE, _HASH_SOURCE), Image.Resampling.LANCZOS
    )
    pixels = grayscale(thumbnail)
    # Rounded, so that rounding noise in coefficients that are really 0 (flat areas) never
    # decides a bit.
    low = np.round((_DCT @ pixels @ _DCT.T)[:_HASH_SIZE, :_HASH_SIZE], 6)
    bits = (low > np.median(low)).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:0{_HASH_SIZE * _HASH_SIZE // 4}x}"


def hamming(a: str, b: str) -> int:
    """How many bits two hex hashes of the same length differ in.

    >>> hamming("ff00", "ff01")
    1
    """
    if len(a) != len(b):
        raise ValueError(f"hashes of different lengths cannot be compared: {a!r}, {b!r}")
    return (_hash_int(a) ^ _hash_int(b)).bit_count()


def _hash_int(value: str) -> int:
    try:
        return int(value, 16)
    except ValueError:
        raise ValueError(f"{value!r} is not a hex hash") from None


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Structural similarity of two images' grayscale, -1..1 (1.0 for identical images).

    `b` is resized to the size of `a` first. Standard constants (K1=0.01, K2=0.03, L=255)
    and an 11x11 Gaussian window of sigma 1.5 (smaller for images under 11 px); the mean of
    the SSIM map over the positions where the window fits.
    """
    if b.size != a.size:
        b = b.resize(a.size, Image.Resampling.LANCZOS)
    x, y = grayscale(a), grayscale(b)
    window = _gaussian(min(_SSIM_WINDOW, *x.shape), _SSIM_SIGMA)
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x * mu_x
    var_y = _blur(y * y, window) - mu_y * mu_y
    cov = _blur(x * y, window) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _C1) * (2 * cov + _C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + _C1) * (var_x + var_y + _C2)
    return float(np.mean(numerator / denominator))


def _gaussian(size: int, sigma: float) -> FloatArray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    normalised: FloatArray = weights / weights.sum()
    return normalised


def _blur(values: FloatArray, kernel: FloatArray) -> FloatArray:
    """Separable filter with `kernel`, only where it fits inside (a "valid" convolution)."""
    size = len(kernel)
    rows, cols = values.shape[0] - size + 1, values.shape[1] - size + 1
    across = np.zeros((values.shape[0], cols))
    for i, weight in enumerate(kernel):
        across += weight * values[:, i : i + cols]
    down = np.zeros((rows, cols))
    for i, weight in enumerate(kernel):
        down += weight * across[i : i + rows, :]
    return down


def near_duplicate_groups(hashes: Sequence[str], max_distance: int) -> list[DuplicateGroup]:
    """Group 64-bit hashes (`phash`) that are at most `max_distance` bits apart.

    Items are taken in order; each is compared with the keepers so far (the first item of
    each group) and joins the nearest one within `max_distance` (the earliest on a tie), or
    becomes a keeper itself. Comparing with keepers only means a group cannot drift through
    a chain of small steps. Only groups with duplicates are returned, by keeper.

    >>> near_duplicate_groups(["ffffffffffffffff", "0000000000000000", "fffffffffffffffe"], 4)
    [DuplicateGroup(keeper=0, duplicates=(NearDuplicate(index=2, duplicate_of=0, distance=1),))]
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be 0 or more, not {max_distance}")
    values = np.zeros(len(hashes), dtype=np.uint64)
    for index, text in enumerate(hashes):
        if len(text) != 16:
            raise ValueError(f"hash {index} ({text!r}) is not a 64-bit hex hash")
        try:
            values[index] = int(text, 16)
        except ValueError:
            raise ValueError(f"hash {index} ({text!r}) is not a 64-bit hex hash") from None
    keepers = np.zeros(len(hashes), dtype=np.uint64)
    keeper_index: list[int] = []
    members: dict[int, list[NearDuplicate]] = {}
    for index, value in enumerate(values):
        if keeper_index:
            distances = np.bitwise_count(keepers[: len(keeper_index)] ^ value)
            nearest = int(np.argmin(distances))  # the first of equals
            distance = int(distances[nearest])
            if distance <= max_distance:
                keeper = keeper_index[nearest]
                members.setdefault(keeper, []).append(NearDuplicate(index, keeper, distance))
                continue
        keepers[len(keeper_index)] = value
        keeper_index.append(index)
    return [DuplicateGroup(keeper, tuple(found)) for keeper, found in sorted(members.items())]
