"""Input nodes: where values enter a workflow. An execution's `inputs` set their params."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Self

from pydantic import Field, model_validator

from imagegraph.errors import InvalidImage, Issue, NodeError
from imagegraph.graph.ports import OutputPort, PortType
from imagegraph.nodes import imaging
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs

ASSET_ID = re.compile(r"^asset_[0-9A-Z]{26}$")
DATA_URI = re.compile(r"^data:(?P<mime>image/[a-z0-9.+-]+)?(?P<b64>;base64)?,", re.IGNORECASE)
# A data URI inside a workflow is capped well below uploads: big images belong in assets.
MAX_DATA_URI_CHARS = 16 * 1024 * 1024


class TextParams(NodeParams):
    text: str = Field(default="", max_length=20_000, description="The text this node outputs.")


class InputText(Node[TextParams]):
    type = "input:text"
    title = "Text"
    description = "A piece of text, such as a prompt, given when the workflow is executed."
    params_model = TextParams
    outputs = (OutputPort("text", PortType.TEXT),)
    input_param = "text"

    def settled_outputs(self, params: TextParams) -> Outputs:
        return {"text": params.text}

    async def run(self, ctx: NodeContext, params: TextParams, inputs: Inputs) -> Outputs:
        return self.settled_outputs(params)


class NumberParams(NodeParams):
    value: float = Field(default=0.0, description="The number this node outputs.")
    minimum: float | None = Field(default=None, description="Smallest value accepted.")
    maximum: float | None = Field(default=None, description="Largest value accepted.")

    @model_validator(mode="after")
    def _within_bounds(self) -> Self:
        if self.minimum is not None and self.value < self.minimum:
            raise ValueError(f"value {self.value:g} is below the minimum {self.minimum:g}")
        if self.maximum is not None and self.value > self.maximum:
            raise ValueError(f"value {self.value:g} is above the maximum {self.maximum:g}")
        return self


class InputNumber(Node[NumberParams]):
    type = "input:number"
    title = "Number"
    description = "A number given when the workflow is executed, optionally within bounds."
    params_model = NumberParams
    outputs = (OutputPort("number", PortType.NUMBER),)
    input_param = "value"

    def settled_outputs(self, params: NumberParams) -> Outputs:
        value: float | int = int(params.value) if params.value.is_integer() else params.value
        return {"number": value}

    async def run(self, ctx: NodeContext, params: NumberParams, inputs: Inputs) -> Outputs:
        return self.settled_outputs(params)


class ImageParams(NodeParams):
    image: str = Field(
        default="",
        max_length=MAX_DATA_URI_CHARS,
        description="An uploaded asset id (asset_…), a data: URI, or an http(s) URL.",
    )


class InputImage(Node[ImageParams]):
    type = "input:image"
    title = "Image"
    description = "An image given as an uploaded asset id, a data URI or an http(s) URL."
    params_model = ImageParams
    outputs = (OutputPort("image", PortType.IMAGE),)
    input_param = "image"

    def check(self, params: ImageParams) -> list[Issue]:
        source = params.image.strip()
        if not source:
            return [
                Issue(
                    "missing_value",
                    "no image given (set params.image or pass it in the execution's inputs)",
                    field="params.image",
                )
            ]
        if ASSET_ID.match(source) or DATA_URI.match(source):
            return []
        if source.lower().startswith(("http://", "https://")):
            return []
        return [
            Issue(
                "invalid_param",
                "params.image must be an asset id (asset_…), a data: URI or an http(s) URL",
                field="params.image",
            )
        ]

    def asset_refs(self, params: ImageParams) -> dict[str, str]:
        source = params.image.strip()
        return {"params.image": source} if ASSET_ID.match(source) else {}

    def url_refs(self, params: ImageParams) -> dict[str, str]:
        source = params.image.strip()
        is_url = source.lower().startswith(("http://", "https://"))
        return {"params.image": source} if is_url else {}

    async def run(self, ctx: NodeContext, params: ImageParams, inputs: Inputs) -> Outputs:
        source = params.image.strip()
        if ASSET_ID.match(source):
            return {"image": await ctx.find_asset(source)}
        if DATA_URI.match(source):
            data = decode_data_uri(source)
            origin: dict[str, Any] = {"source": "data-uri"}
        else:
            data = await ctx.fetch(source)
            origin = {"source": "url", "url": source}

        def verify_and_store() -> Any:
            imaging.decode(data, ctx.max_pixels)  # refuses bombs and broken files
            return ctx.store_image(data, generation=origin, kind="upload")

        try:
            return {"image": await ctx.run_cpu(verify_and_store)}
        except InvalidImage as exc:
            raise NodeError(exc.message, code="invalid_image") from None


def decode_data_uri(uri: str) -> bytes:
    match = DATA_URI.match(uri)
    if match is None:
        raise NodeError("not a data: URI", code="invalid_image")
    payload = uri[match.end() :]
    if not match.group("b64"):
        raise NodeError("data: URIs of images must be base64-encoded", code="invalid_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise NodeError("data: URI is not valid base64", code="invalid_image") from None
