"""`output:image`: where an image leaves the workflow as a stored output asset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imagegraph.errors import Issue
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes import imaging
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs, Recorder
from imagegraph.nodes.values import ImageValue


class OutputParams(NodeParams):
    format: Literal["original", "png", "jpeg", "webp", "avif"] = Field(
        default="original",
        description="Format of the stored file; 'original' keeps the incoming bytes as they are.",
    )
    quality: int | None = Field(default=None, ge=1, le=100, description="For lossy formats.")
    filename: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
        description="Base name for the file when outputs are written to a directory.",
    )


class OutputImage(Node[OutputParams]):
    type = "output:image"
    title = "Output image"
    description = "Stores its image as an output of the execution, with how it was made."
    params_model = OutputParams
    inputs = (InputPort("image", PortType.IMAGE),)
    outputs = (OutputPort("image", PortType.IMAGE),)
    is_output = True

    def check(self, params: OutputParams) -> list[Issue]:
        if params.format not in ("original", *imaging.output_formats()):
            return [
                Issue(
                    "unsupported_format",
                    f"format {params.format!r} is not supported by this server",
                    field="params.format",
                )
            ]
        return []

    # In its original format, the output is a new asset of the stored bytes: nothing to read,
    # write or compute, so it is recorded in the transaction that gives it its image.
    settles = True

    def settle(self, params: OutputParams, inputs: Inputs, recorder: Recorder) -> Outputs | None:
        source = inputs.get("image")
        if not isinstance(source, ImageValue) or not _kept_as_is(params, source):
            return None
        kept = recorder.keep_image(source, parents=[source], kind="output")
        return None if kept is None else {"image": kept}

    async def run(self, ctx: NodeContext, params: OutputParams, inputs: Inputs) -> Outputs:
        source = inputs["image"]
        if _kept_as_is(params, source):
            # The stored bytes as they are: a new asset of them, nothing to read or write.
            return {"image": ctx.store_image(source, parents=[source], kind="output")}

        def convert() -> Outputs:
            fmt = params.format
            if fmt == "original":
                # GIF, BMP and TIFF can be read but are not written: keep them lossless.
                writable = source.format in imaging.output_formats()
                fmt = source.format if writable else "png"
            stored = ctx.store_image(
                ctx.load_image(source),
                parents=[source],
                kind="output",
                format=fmt,
                quality=params.quality,
            )
            return {"image": stored}

        return await ctx.run_cpu(convert, pixels=source.width * source.height)


def _kept_as_is(params: OutputParams, source: ImageValue) -> bool:
    return params.format in ("original", source.format) and params.quality is None
