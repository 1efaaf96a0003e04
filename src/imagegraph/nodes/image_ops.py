"""Local image operations: resize, crop, Lanczos upscale, format conversion, contact sheet.

They run in the image thread pool (`ImageOperation.compute`), are deterministic, and so are
answered from the output cache when their inputs and params repeat.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from PIL import Image, ImageColor, ImageOps
from pydantic import AfterValidator, Field

from imagegraph.errors import Issue, NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes import imaging
from imagegraph.nodes.base import ImageOperation, Inputs, NodeContext, NodeParams, Outputs

IMAGE_IN = (InputPort("image", PortType.IMAGE),)
IMAGE_OUT = (OutputPort("image", PortType.IMAGE),)
MAX_SIDE = 16_384

Resample = Literal["lanczos", "bicubic", "bilinear", "nearest"]
_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _color(value: str) -> str:
    try:
        ImageColor.getrgb(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a color (use a name or #rrggbb)") from None
    return value


Color = Annotated[str, AfterValidator(_color)]


def _check_size(ctx: NodeContext, width: int, height: int) -> None:
    if width * height > ctx.max_pixels:
        raise NodeError(
            f"result would be {width}x{height} pixels, over the limit of "
            f"{ctx.max_pixels / 1e6:.1f} MP",
            code="image_too_large",
        )


class ResizeParams(NodeParams):
    width: int = Field(default=1024, ge=1, le=MAX_SIDE)
    height: int = Field(default=1024, ge=1, le=MAX_SIDE)
    mode: Literal["contain", "cover", "fill", "exact"] = Field(
        default="contain",
        description="contain: fit inside, keep aspect; cover: fill and crop the overflow; "
        "fill: fit inside and pad with `background`; exact: stretch to the size.",
    )
    background: Color = Field(default="#000000", description="Padding color for mode=fill.")
    resample: Resample = "lanczos"


class Resize(ImageOperation[ResizeParams]):
    type = "image:resize"
    title = "Resize"
    description = "Resizes to a box: contain, cover, fill (pad) or exact."
    params_model = ResizeParams
    inputs = IMAGE_IN
    outputs = IMAGE_OUT

    def compute(self, ctx: NodeContext, params: ResizeParams, inputs: Inputs) -> Outputs:
        source = inputs["image"]
        _check_size(ctx, params.width, params.height)
        image = ctx.load_image(source)
        size = (params.width, params.height)
        method = _RESAMPLE[params.resample]
        if params.mode == "contain":
            result = ImageOps.contain(image, size, method=method)
        elif params.mode == "cover":
            result = ImageOps.fit(image, size, method=method)
        elif params.mode == "fill":
            if image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            result = ImageOps.pad(
                image, size, method=method, color=ImageColor.getrgb(params.background)
            )
        else:
            result = image.resize(size, method)
        return {"image": ctx.store_image(result, parents=[source])}


class CropParams(NodeParams):
    x: int = Field(default=0, ge=0, description="Left edge, in pixels.")
    y: int = Field(default=0, ge=0, description="Top edge, in pixels.")
    width: int = Field(default=512, ge=1, le=MAX_SIDE)
    height: int = Field(default=512, ge=1, le=MAX_SIDE)


class Crop(ImageOperation[CropParams]):
    type = "image:crop"
    title = "Crop"
    description = "Cuts out a rectangle given by its top-left corner and size."
    params_model = CropParams
    inputs = IMAGE_IN
    outputs = IMAGE_OUT

    def compute(self, ctx: NodeContext, params: CropParams, inputs: Inputs) -> Outputs:
        source = inputs["image"]
        right, bottom = params.x + params.width, params.y + params.height
        if right > source.width or bottom > source.height:
            raise NodeError(
                f"crop box x={params.x} y={params.y} {params.width}x{params.height} reaches "
                f"({right}, {bottom}), outside the {source.width}x{source.height} image",
                code="crop_out_of_bounds",
            )
        image = ctx.load_image(source)
        result = image.crop((params.x, params.y, right, bottom))
        return {"image": ctx.store_image(result, parents=[source])}


class UpscaleParams(NodeParams):
    factor: Literal[2, 4] = Field(default=2, description="Scale factor.")


class UpscaleLanczos(ImageOperation[UpscaleParams]):
    type = "upscale:lanczos"
    title = "Upscale (Lanczos)"
    description = "Enlarges 2x or 4x with Lanczos resampling; no model needed."
    params_model = UpscaleParams
    inputs = IMAGE_IN
    outputs = IMAGE_OUT

    def compute(self, ctx: NodeContext, params: UpscaleParams, inputs: Inputs) -> Outputs:
        source = inputs["image"]
        size = (source.width * params.factor, source.height * params.factor)
        _check_size(ctx, *size)
        image = ctx.load_image(source)
        result = image.resize(size, Image.Resampling.LANCZOS)
        return {"image": ctx.store_image(result, parents=[source])}


class ConvertParams(NodeParams):
    format: Literal["png", "jpeg", "webp", "avif"] = "webp"
    quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Lossy quality (JPEG, WebP, AVIF); WebP at 100 is lossless. "
        "Defaults: JPEG 90, WebP 90, AVIF 75.",
    )


class ConvertFormat(ImageOperation[ConvertParams]):
    type = "convert:format"
    title = "Convert format"
    description = "Re-encodes as PNG, JPEG, WebP or AVIF (when Pillow supports it)."
    params_model = ConvertParams
    inputs = IMAGE_IN
    outputs = IMAGE_OUT

    def check(self, params: ConvertParams) -> list[Issue]:
        if params.format not in imaging.output_formats():
            return [
                Issue(
                    "unsupported_format",
                    f"format {params.format!r} is not supported by "
                    f"this server (supported: {', '.join(imaging.output_formats())})",
                    field="params.format",
                )
            ]
        return []

    def compute(self, ctx: NodeContext, params: ConvertParams, inputs: Inputs) -> Outputs:
        source = inputs["image"]
        image = ctx.load_image(source)
        stored = ctx.store_image(
            image, parents=[source], format=params.format, quality=params.quality
        )
        return {"image": stored}


class GridParams(NodeParams):
    columns: int = Field(default=0, ge=0, le=64, description="0 picks a near-square layout.")
    cell_width: int = Field(default=256, ge=16, le=4096)
    cell_height: int = Field(default=256, ge=16, le=4096)
    gap: int = Field(default=8, ge=0, le=256)
    background: Color = "#ffffff"


class Grid(ImageOperation[GridParams]):
    type = "image:grid"
    title = "Contact sheet"
    description = "Lays an image list out as one grid image, in list order."
    params_model = GridParams
    inputs = (InputPort("images", PortType.IMAGE_LIST),)
    outputs = IMAGE_OUT

    def compute(self, ctx: NodeContext, params: GridParams, inputs: Inputs) -> Outputs:
        sources = inputs["images"]
        if not sources:
            raise NodeError("no images to lay out", code="empty_list")
        columns = params.columns or math.ceil(math.sqrt(len(sources)))
        rows = math.ceil(len(sources) / columns)
        width = columns * params.cell_width + (columns + 1) * params.gap
        height = rows * params.cell_height + (rows + 1) * params.gap
        _check_size(ctx, width, height)
        sheet = Image.new("RGB", (width, height), ImageColor.getrgb(params.background))
        for index, source in enumerate(sources):
            tile = ImageOps.contain(
                ctx.load_image(source).convert("RGB"), (params.cell_width, params.cell_height)
            )
            col, row = index % columns, index // columns
            x = params.gap + col * (params.cell_width + params.gap)
            y = params.gap + row * (params.cell_height + params.gap)
            sheet.paste(
                tile,
                (
                    x + (params.cell_width - tile.width) // 2,
                    y + (params.cell_height - tile.height) // 2,
                ),
            )
        return {"image": ctx.store_image(sheet, parents=list(sources))}
