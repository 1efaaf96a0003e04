"""The model catalog: which node types hosted models serve, through which providers, at
what price, taking which params. Data (`models.yaml`), not code; an operator's file
(`IMAGEGRAPH_CATALOG_FILE`) adds entries or replaces them by node type.

    catalog = load_catalog(None)
    spec = catalog["generate:flux_2_pro"]
    [route.label for route in spec.routes]     # ['bfl:flux-2-pro', 'fal:fal-ai/flux-2-pro', ...]
    spec.price_of(width=1024, height=1024, images=1)   # 3.15 credits
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from imagegraph.errors import InvalidInput
from imagegraph.graph.model import decode_document
from imagegraph.providers.base import Route

Operation = Literal["generate", "edit", "upscale", "remove_background"]
# Our params a model may take, and their types.
PARAM_TYPES: dict[str, type] = {
    "width": int,
    "height": int,
    "seed": int,
    "steps": int,
    "guidance": float,
    "numImages": int,
    "outputFormat": str,
    "safetyTolerance": int,
    "scale": int,
}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ParamSpec(_Spec):
    default: Any = None
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    choices: list[Any] | None = None
    description: str | None = None


class PriceSpec(_Spec):
    per_image: float | None = Field(default=None, ge=0)
    per_megapixel: float | None = Field(default=None, ge=0)
    minimum: float = Field(default=0.0, ge=0)  # per image, with per_megapixel

    @model_validator(mode="after")
    def _one_rule(self) -> PriceSpec:
        if (self.per_image is None) == (self.per_megapixel is None):
            raise ValueError("give exactly one of perImage and perMegapixel")
        return self


class RouteSpec(_Spec):
    provider: str
    model: str
    version: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    def route(self) -> Route:
        return Route(self.provider, self.model, self.version, dict(self.options))


class ModelSpec(_Spec):
    """One catalog entry: a node type and how it is served."""

    type: str = ""  # set from the key
    title: str
    description: str = ""
    operation: Operation
    price: PriceSpec
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    routes: list[RouteSpec] = Field(min_length=1)
    # Inputs beyond the operation's own: a prompt for an upscaler, a negative prompt, a mask.
    prompt: bool | None = None
    negative_prompt: bool = False
    mask: bool = False
    version: str = "1.0.0"

    @model_validator(mode="after")
    def _known_params(self) -> ModelSpec:
        unknown = sorted(set(self.params) - set(PARAM_TYPES))
        if unknown:
            raise ValueError(f"unknown params {unknown}; known: {sorted(PARAM_TYPES)}")
        return self

    @property
    def takes_prompt(self) -> bool:
        if self.prompt is not None:
            return self.prompt
        return self.operation in ("generate", "edit")

    def price_of(self, width: int | None, height: int | None, images: int) -> float:
        """Credits for `images` images of `width` x `height` (the model's defaults if None)."""
        if self.price.per_image is not None:
            return round(self.price.per_image * images, 6)
        assert self.price.per_megapixel is not None
        w = width or int(self.params.get("width", ParamSpec(default=1024)).default or 1024)
        h = height or int(self.params.get("height", ParamSpec(default=1024)).default or 1024)
        per_image = max(self.price.minimum, self.price.per_megapixel * w * h / 1_000_000)
        return round(math.ceil(per_image * 100) / 100 * images, 6)

    @property
    def routes_resolved(self) -> list[Route]:
        return [r.route() for r in self.routes]


class Catalog(Mapping[str, ModelSpec]):
    def __init__(self, models: Mapping[str, ModelSpec]) -> None:
        self._models = dict(models)

    def __getitem__(self, node_type: str) -> ModelSpec:
        return self._models[node_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)


def load_catalog(path: Path | None) -> Catalog:
    """The built-in catalog, with the entries of `path` (YAML or JSON) added or replacing."""
    builtin = resources.files("imagegraph.catalog").joinpath("models.yaml").read_bytes()
    models = _parse(decode_document(builtin), "the built-in catalog")
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read the catalog file {path}: {exc.strerror}") from None
        models.update(_parse(decode_document(raw), f"the catalog file {path}"))
    return Catalog(models)


def _parse(data: Any, where: str) -> dict[str, ModelSpec]:
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{where} must map node types to models")
    models = {}
    for node_type, entry in data.items():
        if not isinstance(node_type, str) or ":" not in node_type:
            raise InvalidInput(f"{where}: {node_type!r} is not a node type like 'generate:x'")
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(part) for part in first["loc"])
            raise InvalidInput(f"{where}: {node_type}.{loc}: {first['msg']}") from None
        models[node_type] = spec.model_copy(update={"type": node_type})
    return models
