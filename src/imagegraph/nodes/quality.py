"""Quality nodes: measure images and judge them against limits, without model weights.

`quality:check` measures size, aspect ratio, sharpness, brightness and contrast;
`quality:similarity` compares with a reference image (perceptual hash and SSIM), for visual
regression of pinned seeds; `quality:dedupe` drops near-duplicates from an image list.

Each passes its image on as it came, without storing a copy, with its measurements added to
`ImageValue.quality`; they end up on the asset stored from it (an output, say). The
measuring itself lives in `imagegraph.quality`. These nodes are not cached: measuring costs
about what a cache lookup does, and a cached answer would pass on another run's image.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Self

from PIL import Image
from pydantic import AfterValidator, Field, model_validator

from imagegraph import quality
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs
from imagegraph.nodes.image_ops import MAX_SIDE
from imagegraph.nodes.inputs import ASSET_ID
from imagegraph.nodes.values import ImageValue

SCALE_NOTE = (
    f"Measured on a copy scaled to fit {quality.MEASURE_SIDE}x{quality.MEASURE_SIDE} "
    "(smaller images as they are), since the score depends on scale; `scores.measuredAt` "
    "says at what size."
)
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[:/xX]\s*(\d+(?:\.\d+)?)\s*$")


def aspect_value(spec: str | float) -> float:
    """Width / height from "16:9", "16/9", "16x9" or a number.

    >>> round(aspect_value("16:9"), 4), aspect_value(1.5), aspect_value("0.75")
    (1.7778, 1.5, 0.75)
    """
    if isinstance(spec, str):
        match = _RATIO.match(spec)
        if match:
            width, height = float(match.group(1)), float(match.group(2))
            if height == 0:
                raise ValueError(f"aspect ratio {spec!r} divides by zero")
            value = width / height
        else:
            try:
                value = float(spec)
            except ValueError:
                raise ValueError(
                    f'aspect ratio {spec!r} is neither "width:height" (such as "16:9") nor a number'
                ) from None
    else:
        value = float(spec)
    if not 0.01 <= value <= 100:
        raise ValueError(f"aspect ratio {spec!r} is {value:g}, outside 0.01..100")
    return value


def _aspect(spec: str | float) -> str | float:
    aspect_value(spec)
    return spec


def _asset_id(value: str | None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None  # the editor saves an emptied field as ""
    if not ASSET_ID.match(value):
        raise ValueError(f"{value[:60]!r} is not an asset id (asset_…)")
    return value


AspectRatio = Annotated[str | float, AfterValidator(_aspect)]
AssetId = Annotated[str | None, AfterValidator(_asset_id)]


def _measure_image(ctx: NodeContext, value: ImageValue) -> Image.Image:
    return quality.for_measurement(ctx.load_image(value))


def _with_quality(value: ImageValue, measurements: Mapping[str, Any]) -> ImageValue:
    return dataclasses.replace(value, quality={**value.quality, **measurements})


# -- quality:check ---------------------------------------------------------------------------


class CheckParams(NodeParams):
    min_width: int | None = Field(
        default=None, ge=1, le=MAX_SIDE, description="Smallest width accepted, in pixels."
    )
    min_height: int | None = Field(
        default=None, ge=1, le=MAX_SIDE, description="Smallest height accepted, in pixels."
    )
    aspect_ratio: AspectRatio | None = Field(
        default=None,
        description='Width to height required, as "16:9" or a number (1.7778).',
    )
    aspect_tolerance: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="How far the aspect ratio may be off, relatively: 0.02 accepts ±2%.",
    )
    min_sharpness: float | None = Field(
        default=None,
        ge=0,
        description="Smallest sharpness accepted: the variance of the Laplacian of the "
        "grayscale image; higher is sharper, 0 is flat (calibrate on your own images). "
        + SCALE_NOTE,
    )
    min_brightness: float | None = Field(
        default=None, ge=0, le=255, description="Smallest mean luminance accepted (0..255)."
    )
    max_brightness: float | None = Field(
        default=None, ge=0, le=255, description="Largest mean luminance accepted (0..255)."
    )
    min_contrast: float | None = Field(
        default=None,
        ge=0,
        le=255,
        description="Smallest RMS contrast accepted: the standard deviation of luminance (0..255).",
    )
    blank_threshold: float = Field(
        default=4.0,
        ge=0,
        le=255,
        description="Below this RMS contrast an image counts as near blank (one flat "
        "colour), which fails the check whatever else is set; 0 turns this off.",
    )

    @model_validator(mode="after")
    def _brightness_range(self) -> Self:
        low, high = self.min_brightness, self.max_brightness
        if low is not None and high is not None and low > high:
            raise ValueError(f"minBrightness {low:g} is above maxBrightness {high:g}")
        return self


class QualityCheck(Node[CheckParams]):
    """Measures an image and checks it against limits; `passed` says whether all hold.

    The image is passed on with `sharpness`, `brightness`, `contrast`, `nearBlank`,
    `aspectRatio` and `measuredAt` added to its quality measurements.
    """

    type = "quality:check"
    title = "Quality check"
    description = (
        "Measures size, aspect ratio, sharpness, brightness and contrast, and checks them "
        "against limits; flags near-blank images."
    )
    params_model = CheckParams
    inputs = (InputPort("image", PortType.IMAGE),)
    outputs = (
        OutputPort("image", PortType.IMAGE, "The image, with its measurements."),
        OutputPort("passed", PortType.BOOLEAN, "Whether every check holds."),
        OutputPort("scores", PortType.JSON, "Measurements and failed checks."),
    )

    async def run(self, ctx: NodeContext, params: CheckParams, inputs: Inputs) -> Outputs:
        source: ImageValue = inputs["image"]
        return await ctx.run_cpu(
            self._check, ctx, params, source, pixels=source.width * source.height
        )

    def _check(self, ctx: NodeContext, params: CheckParams, source: ImageValue) -> Outputs:
        found = quality.measure(ctx.load_image(source))
        width, height = source.width, source.height
        # Rounded before they are judged, so that a limit is held against what scores show.
        contrast = round(found.contrast, 2)
        measurements: dict[str, Any] = {
            "aspectRatio": round(width / height, 4),
            "sharpness": round(found.sharpness, 2),
            "brightness": round(found.brightness, 2),
            "contrast": contrast,
            "nearBlank": contrast < params.blank_threshold,
            "measuredAt": list(found.measured_at),
        }
        failures = check_failures(params, width, height, measurements)
        scores = {"width": width, "height": height, **measurements, "failures": failures}
        return {
            "image": _with_quality(source, measurements),
            "passed": not failures,
            "scores": scores,
        }


def check_failures(
    params: CheckParams, width: int, height: int, measured: Mapping[str, Any]
) -> list[str]:
    """A sentence per failed check, naming the check, the value and the limit."""
    failures = []
    if params.min_width is not None and width < params.min_width:
        failures.append(f"width {width} is below minWidth {params.min_width}")
    if params.min_height is not None and height < params.min_height:
        failures.append(f"height {height} is below minHeight {params.min_height}")
    if params.aspect_ratio is not None:
        target = aspect_value(params.aspect_ratio)
        off = abs(width / height / target - 1)
        if off > params.aspect_tolerance:
            failures.append(
                f"aspect ratio {width / height:.4g} ({width}x{height}) is {off:.1%} off "
                f"aspectRatio {params.aspect_ratio} ({target:.4g}), more than "
                f"aspectTolerance {params.aspect_tolerance:.1%}"
            )
    sharpness, brightness, contrast = (
        measured["sharpness"],
        measured["brightness"],
        measured["contrast"],
    )
    if params.min_sharpness is not None and sharpness < params.min_sharpness:
        failures.append(
            f"sharpness {sharpness:g} is below minSharpness {params.min_sharpness:g} "
            f"(measured at {measured['measuredAt'][0]}x{measured['measuredAt'][1]})"
        )
    if params.min_brightness is not None and brightness < params.min_brightness:
        failures.append(
            f"brightness {brightness:g} is below minBrightness {params.min_brightness:g}"
        )
    if params.max_brightness is not None and brightness > params.max_brightness:
        failures.append(
            f"brightness {brightness:g} is above maxBrightness {params.max_brightness:g}"
        )
    if params.min_contrast is not None and contrast < params.min_contrast:
        failures.append(f"contrast {contrast:g} is below minContrast {params.min_contrast:g}")
    if measured["nearBlank"]:
        failures.append(
            f"image is near blank: contrast {contrast:g} is below blankThreshold "
            f"{params.blank_threshold:g}"
        )
    return failures


# -- quality:similarity ----------------------------------------------------------------------


class SimilarityParams(NodeParams):
    reference_asset_id: AssetId = Field(
        default=None,
        description="A stored image (asset_…) to compare with, instead of connecting the "
        "`reference` input; the node has no `reference` input while this is set.",
    )
    max_hash_distance: int = Field(
        default=10,
        ge=0,
        le=64,
        description="Most bits the 64-bit perceptual hashes may differ in (0: same hash).",
    )
    min_ssim: float = Field(
        default=0.9,
        ge=-1,
        le=1,
        description="Smallest structural similarity (SSIM, grayscale) accepted; 1 is "
        "identical. " + SCALE_NOTE,
    )


REFERENCE_IN = InputPort(
    "reference",
    PortType.IMAGE,
    description="The image to compare with (or set params.referenceAssetId instead).",
)


class QualitySimilarity(Node[SimilarityParams]):
    """Compares an image with a reference: perceptual-hash distance and SSIM.

    The reference comes from the `reference` input or, when `referenceAssetId` is set, from
    that stored asset, in which case the node has no `reference` input: connecting one is
    then an unknown port, and leaving both out a missing input, both found before the
    execution is queued. The image is passed on with `phash`, `referencePhash`,
    `hashDistance` and `ssim` added to its quality measurements.
    """

    type = "quality:similarity"
    title = "Similarity to a reference"
    description = (
        "Perceptual-hash distance and SSIM against a reference image or asset, for visual "
        "regression of pinned seeds."
    )
    params_model = SimilarityParams
    inputs = (InputPort("image", PortType.IMAGE), REFERENCE_IN)
    outputs = (
        OutputPort("image", PortType.IMAGE, "The image, with its measurements."),
        OutputPort("passed", PortType.BOOLEAN, "Whether both limits hold."),
        OutputPort("scores", PortType.JSON, "Hashes, distance, SSIM and failed checks."),
    )

    def input_ports(self, params: SimilarityParams) -> tuple[InputPort, ...]:
        if params.reference_asset_id is not None:
            return self.inputs[:1]
        return self.inputs

    def asset_refs(self, params: SimilarityParams) -> dict[str, str]:
        if params.reference_asset_id is None:
            return {}
        return {"params.referenceAssetId": params.reference_asset_id}

    async def run(self, ctx: NodeContext, params: SimilarityParams, inputs: Inputs) -> Outputs:
        source: ImageValue = inputs["image"]
        reference: ImageValue | None = inputs.get("reference")
        if reference is None:
            assert params.reference_asset_id is not None  # the ports say one of them is there
            reference = await ctx.find_asset(params.reference_asset_id)
        pixels = source.width * source.height + reference.width * reference.height
        return await ctx.run_cpu(self._compare, ctx, params, source, reference, pixels=pixels)

    def _compare(
        self, ctx: NodeContext, params: SimilarityParams, source: ImageValue, ref: ImageValue
    ) -> Outputs:
        image = _measure_image(ctx, source)
        reference = _measure_image(ctx, ref)
        ours, theirs = quality.phash(image), quality.phash(reference)
        measurements: dict[str, Any] = {
            "phash": ours,
            "referencePhash": theirs,
            "hashDistance": quality.hamming(ours, theirs),
            "ssim": round(quality.ssim(image, reference), 4),
            "measuredAt": list(image.size),
        }
        failures: list[str] = []
        if measurements["hashDistance"] > params.max_hash_distance:
            failures.append(
                f"hash distance {measurements['hashDistance']} is above maxHashDistance "
                f"{params.max_hash_distance}"
            )
        if measurements["ssim"] < params.min_ssim:
            failures.append(f"SSIM {measurements['ssim']:g} is below minSsim {params.min_ssim:g}")
        scores = {**measurements, "referenceAssetId": ref.asset_id, "failures": failures}
        return {
            "image": _with_quality(source, measurements),
            "passed": not failures,
            "scores": scores,
        }


# -- quality:dedupe --------------------------------------------------------------------------


class DedupeParams(NodeParams):
    max_distance: int = Field(
        default=6,
        ge=0,
        le=64,
        description="Images whose 64-bit perceptual hashes differ in at most this many bits "
        "are near-duplicates; the first one is kept.",
    )


class QualityDedupe(Node[DedupeParams]):
    """Drops near-duplicates from an image list, keeping each first occurrence.

    Each image kept is passed on with its `phash`; `duplicates` lists what was dropped:
    `{"index", "duplicateOf", "distance"}`, indexes into the incoming list.
    """

    type = "quality:dedupe"
    title = "Drop near-duplicates"
    description = "Keeps the first of each group of images with near-equal perceptual hashes."
    params_model = DedupeParams
    inputs = (InputPort("images", PortType.IMAGE_LIST, multiple=True),)
    outputs = (
        OutputPort("images", PortType.IMAGE_LIST, "The images kept, in order."),
        OutputPort("duplicates", PortType.JSON, "The images dropped, and what they duplicate."),
        OutputPort("scores", PortType.JSON, "Counts and every image's hash."),
    )

    async def run(self, ctx: NodeContext, params: DedupeParams, inputs: Inputs) -> Outputs:
        sources: list[ImageValue] = list(inputs.get("images") or [])
        pixels = sum(v.width * v.height for v in sources)
        return await ctx.run_cpu(self._dedupe, ctx, params, sources, pixels=pixels)

    def _dedupe(
        self, ctx: NodeContext, params: DedupeParams, sources: Sequence[ImageValue]
    ) -> Outputs:
        hashes = [quality.phash(_measure_image(ctx, value)) for value in sources]
        groups = quality.near_duplicate_groups(hashes, params.max_distance)
        dropped = sorted((d for g in groups for d in g.duplicates), key=lambda d: d.index)
        gone = {d.index for d in dropped}
        kept = [
            _with_quality(value, {"phash": hashes[index]})
            for index, value in enumerate(sources)
            if index not in gone
        ]
        return {
            "images": kept,
            "duplicates": [
                {"index": d.index, "duplicateOf": d.duplicate_of, "distance": d.distance}
                for d in dropped
            ],
            "scores": {
                "count": len(sources),
                "kept": len(kept),
                "dropped": len(dropped),
                "phashes": hashes,
            },
        }
