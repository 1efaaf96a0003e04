"""From a batch request to the runs it makes, and from one run to its execution's inputs.

Pure: no I/O. A batch is items (rows of input values) times prompt variants times runs
per item. Every run gets its seed here, once, so the same batch always makes the same
images; the seed is recorded on the item and in the manifest.

How an item's columns reach the workflow, first match wins:
- an input node's id or label (`Prompt`, `input_1`): that node's value;
- `seed`: the item's seed (run k of the item uses seed + k);
- a `${variable}` of a `prompt:template` node: the value of that variable;
- `<nodeId>.<param>`: that param of that node (`gen_1.steps`).
Anything else is refused, naming the column.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from imagegraph.errors import InvalidInput, Issue
from imagegraph.graph.model import WorkflowDoc
from imagegraph.nodes.base import NodeRegistry
from imagegraph.nodes.prompt import template_variables
from imagegraph.store.batches import NewItem

SEED_COLUMN = "seed"
SEED_LIMIT = 2**31 - 1
MAX_ITEMS = 100_000
SeedStrategy = Literal["hash", "increment", "fixed", "random", "workflow"]


class _Camel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Seeds(_Camel):
    """How runs get their seeds. `hash` (default): from the item's inputs, the run number
    and `base`, so identical items get identical seeds (and dedupe) and reruns reproduce;
    `increment`: base + item index x runs + run; `fixed`: base for every item, + run;
    `random`: drawn once per run and recorded; `workflow`: the workflow's own seeds.
    A `seed` column overrides the strategy for its item."""

    strategy: SeedStrategy = "hash"
    base: int = Field(default=0, ge=0, le=SEED_LIMIT)


class Variant(_Camel):
    """A prompt variant: partial nodes whose params override the workflow's for this
    variant's runs (the shape of an execution's `nodes`). Every variant runs every item
    with the same seeds, so variants compare side by side."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    nodes: list[dict[str, Any]] = Field(default_factory=list)


class BatchOptions(_Camel):
    """What a batch request may say besides its items."""

    workflow_id: str = Field(min_length=1, max_length=40)
    workflow_version: int | None = Field(default=None, ge=1)
    name: str = Field(default="", max_length=200)
    concurrency: int = Field(default=10, ge=1, le=1000)
    dedupe: bool = True
    runs_per_item: int = Field(default=1, ge=1, le=100)
    seeds: Seeds = Field(default_factory=Seeds)
    variants: list[Variant] = Field(default_factory=list, max_length=10)
    negative_prompts: list[str] = Field(default_factory=list, max_length=20)
    # Values for every item (items' own columns win), and param overrides for every item.
    inputs: dict[str, Any] = Field(default_factory=dict)
    nodes: list[dict[str, Any]] = Field(default_factory=list)
    webhook_url: str | None = Field(default=None, max_length=2048)

    @model_validator(mode="after")
    def _distinct_variants(self) -> BatchOptions:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variants: each variant needs its own name")
        return self


@dataclass(frozen=True)
class Item:
    """One item as given: its values by column, and where it came from (for errors)."""

    values: Mapping[str, Any]
    where: str  # "line 7" of a file, or "items[6]"


@dataclass(frozen=True)
class Run:
    """What one execution of a batch gets: inputs by input node, and param overrides."""

    inputs: dict[str, Any]
    overrides: list[dict[str, Any]] = field(default_factory=list)


class Columns:
    """Where each column of a batch's items goes in one workflow (see the module doc)."""

    def __init__(
        self,
        doc: WorkflowDoc,
        registry: NodeRegistry,
        overrides: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """`overrides`: partial nodes a batch applies (its `nodes`, its variants'), whose
        templates may name variables the saved template does not."""
        self._inputs: dict[str, str] = {}
        self._templates: dict[str, list[str]] = {}
        self._params: dict[str, set[str]] = {}
        self._input_params: dict[str, str] = {}
        self._negatives: list[str] = []
        self._seeded: list[str] = []
        labels: dict[str, list[str]] = {}
        for node in doc.nodes:
            impl = registry.get(node.node_type)
            if impl is None:
                continue
            fields = {
                name: f.alias or to_camel(name)
                for name, f in impl.params_model.model_fields.items()
            }
            self._params[node.id] = set(fields.values())
            if impl.input_param is not None:
                self._inputs[node.id] = node.id
                self._input_params[node.id] = impl.input_param
                if node.label:
                    labels.setdefault(node.label.strip(), []).append(node.id)
            if node.node_type == "prompt:template":
                self._negatives.append(node.id)
                templates = [node.data.params.get("template", "${subject}")]
                templates += [
                    ((o.get("data") or {}).get("params") or {}).get("template")
                    for o in overrides
                    if o.get("id") == node.id
                ]
                for template in templates:
                    if not isinstance(template, str):
                        continue
                    for name in template_variables(template):
                        users = self._templates.setdefault(name, [])
                        if node.id not in users:
                            users.append(node.id)
            if "seed" in fields:
                self._seeded.append(node.id)
        for label, ids in labels.items():
            if len(ids) == 1:
                self._inputs.setdefault(label, ids[0])
        self._doc = doc

    @property
    def seeded(self) -> bool:
        return bool(self._seeded)

    def required_inputs(self) -> list[tuple[str, str]]:
        """Input nodes whose saved value is empty: (node id, label) — every item needs them."""
        missing = []
        for node in self._doc.nodes:
            param = self._input_params.get(node.id)
            if param is not None and node.data.params.get(param) in (None, ""):
                missing.append((node.id, node.label or ""))
        return missing

    def check(self, column: str) -> str | None:
        """Why a column cannot be used, or None."""
        if column == SEED_COLUMN or column in self._inputs or column in self._templates:
            return None
        node_id, dot, param = column.partition(".")
        if dot and node_id in self._params:
            if param in self._params[node_id]:
                return None
            return f"column {column!r}: node {node_id} has no param {param!r}"
        known = sorted({*self._inputs, *self._templates})
        return (
            f"column {column!r} is not an input node's id or label, a template variable, "
            f"`seed`, or `<nodeId>.<param>` (this workflow takes: {', '.join(known) or 'none'})"
        )

    def run(
        self,
        values: Mapping[str, Any],
        seed: int | None,
        variant: Variant | None,
        shared: Sequence[Mapping[str, Any]],
        negative: str,
    ) -> Run:
        inputs: dict[str, Any] = {}
        params: dict[str, dict[str, Any]] = {}
        template_vars: dict[str, dict[str, Any]] = {}
        for column, value in values.items():
            if column == SEED_COLUMN:
                continue
            if column in self._inputs:
                inputs[self._inputs[column]] = value
            elif column in self._templates:
                for node_id in self._templates[column]:
                    template_vars.setdefault(node_id, {})[column] = value
            else:
                node_id, _, param = column.partition(".")
                params.setdefault(node_id, {})[param] = value
        if seed is not None:
            for node_id in self._seeded:
                params.setdefault(node_id, {})["seed"] = seed
        overrides: list[dict[str, Any]] = [dict(o) for o in shared]
        if variant is not None:
            overrides.extend(dict(o) for o in variant.nodes)
        for node_id, found in template_vars.items():
            own = self._params_of(node_id, overrides)
            used = set(template_variables(str(own.get("template", "${subject}"))))
            saved = dict(own.get("variables") or {})
            wanted = {name: value for name, value in found.items() if name in used}
            params.setdefault(node_id, {})["variables"] = {**saved, **wanted}
        if negative:
            for node_id in self._negatives:
                current = str(self._params_of(node_id, overrides).get("negativePrompt") or "")
                joined = ", ".join(part for part in (current.strip(), negative) if part)
                params.setdefault(node_id, {})["negativePrompt"] = joined
        overrides.extend({"id": node_id, "data": {"params": p}} for node_id, p in params.items())
        return Run(inputs, overrides)

    def _params_of(self, node_id: str, overrides: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        params = dict(next(n.data.params for n in self._doc.nodes if n.id == node_id))
        for override in overrides:
            if override.get("id") == node_id:
                params.update((override.get("data") or {}).get("params") or {})
        return params

    @property
    def takes_negative(self) -> bool:
        return bool(self._negatives)


def expand(items: Sequence[Item], options: BatchOptions, columns: Columns) -> list[NewItem]:
    """Every run of every item, in order (item, then variant, then run), with its seed and
    dedupe key. Raises InvalidInput naming every bad column or value at once."""
    issues: list[Issue] = []
    if not items:
        raise InvalidInput(
            "the batch has no items",
            [Issue("empty_batch", "the batch has no items", field="items")],
        )
    if len(items) * max(1, len(options.variants)) * options.runs_per_item > MAX_ITEMS:
        raise InvalidInput(
            f"a batch makes at most {MAX_ITEMS} runs; this one would make "
            f"{len(items) * max(1, len(options.variants)) * options.runs_per_item}",
            [Issue("too_many_items", "too many runs", field="items")],
        )
    seen: set[str] = set()
    for item in items:
        for column in item.values:
            if column in seen:
                continue
            seen.add(column)
            problem = columns.check(column)
            if problem is not None:
                issues.append(Issue("unknown_column", f"{item.where}: {problem}", field=column))
    for column in options.inputs:
        problem = columns.check(column)
        if problem is not None:
            issues.append(Issue("unknown_input", f"inputs: {problem}", field=f"inputs.{column}"))
    given = seen | set(options.inputs)
    for node_id, label in columns.required_inputs():
        if node_id not in given and (not label or label not in given):
            name = f"{label!r} (node {node_id})" if label else f"node {node_id}"
            issues.append(
                Issue(
                    "missing_column",
                    f"no column gives input {name}, which has no saved value; "
                    f"add a column named {label or node_id!r}",
                    node_id=node_id,
                    field=label or node_id,
                )
            )
    if options.negative_prompts and not columns.takes_negative:
        issues.append(
            Issue(
                "invalid_field",
                "negativePrompts: this workflow has no prompt:template node to append them to",
                field="negativePrompts",
            )
        )
    if issues:
        raise InvalidInput(f"batch items are invalid: {issues[0].message}", issues)

    runs: list[NewItem] = []
    variants: list[Variant | None] = list(options.variants) or [None]
    rng = random.SystemRandom()
    for index, item in enumerate(items):
        values = {**options.inputs, **item.values}
        try:
            own_seed = _own_seed(values.get(SEED_COLUMN))
        except ValueError as exc:
            issues.append(Issue("invalid_seed", f"{item.where}: {exc}", field=SEED_COLUMN))
            continue
        for run in range(options.runs_per_item):
            seed = _seed(options.seeds, own_seed, values, index, run, options.runs_per_item, rng)
            if not columns.seeded:
                seed = None
            for variant in variants:
                name = variant.name if variant is not None else ""
                key = _digest(
                    {
                        "values": values,
                        "seed": seed,
                        "variant": name,
                        "run": run if seed is None else 0,
                    }
                )
                runs.append(NewItem(index, name, run, dict(item.values), seed, key))
    if issues:
        raise InvalidInput(f"batch items are invalid: {issues[0].message}", issues)
    return runs


def _own_seed(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        seed = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"seed {raw!r} is not a whole number") from None
    if not 0 <= seed <= SEED_LIMIT:
        raise ValueError(f"seed {seed} is outside 0..{SEED_LIMIT}")
    return seed


def _seed(
    seeds: Seeds,
    own: int | None,
    values: Mapping[str, Any],
    index: int,
    run: int,
    runs: int,
    rng: random.Random,
) -> int | None:
    if own is not None:
        return (own + run) % (SEED_LIMIT + 1)
    match seeds.strategy:
        case "workflow":
            return None
        case "fixed":
            return (seeds.base + run) % (SEED_LIMIT + 1)
        case "increment":
            return (seeds.base + index * runs + run) % (SEED_LIMIT + 1)
        case "random":
            return rng.randint(0, SEED_LIMIT)
        case _:
            digest = hashlib.sha256(_canonical({"base": seeds.base, "values": values, "run": run}))
            return int.from_bytes(digest.digest()[:8], "big") % (SEED_LIMIT + 1)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _digest(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def batch_overrides(options: BatchOptions) -> list[dict[str, Any]]:
    """Every partial node a batch applies: its own `nodes`, then each variant's."""
    return [*options.nodes, *(o for v in options.variants for o in v.nodes)]
