"""Workspace plans: how much a workspace may do. Configuration, not code.

Presets match what hosted workflow APIs offer (Free: 10 requests a minute and 50 executions
a day; Enterprise: 200 requests a minute and no daily cap; both 10 execution starts a
minute), plus a generous `self-hosted` default for a server that answers to its owner.
Operators add or change plans with a YAML or JSON file (`IMAGEGRAPH_PLANS_FILE`):

    free:   {requestsPerMinute: 20, executionStartsPerMinute: 10, executionsPerDay: 100}
    studio: {requestsPerMinute: 600, executionStartsPerMinute: 120, executionsPerDay: null}

`null` (or leaving a limit out) means unlimited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from imagegraph.errors import InvalidInput
from imagegraph.graph.model import decode_document


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int | None
    execution_starts_per_minute: int | None
    executions_per_day: int | None


PRESETS: Mapping[str, Plan] = {
    "free": Plan("free", 10, 10, 50),
    "enterprise": Plan("enterprise", 200, 10, None),
    "self-hosted": Plan("self-hosted", 60_000, 60_000, None),
}


class _PlanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    requests_per_minute: int | None = Field(default=None, ge=1)
    execution_starts_per_minute: int | None = Field(default=None, ge=1)
    executions_per_day: int | None = Field(default=None, ge=1)


def load_plans(path: Path | None) -> dict[str, Plan]:
    """The presets, with the plans of `path` (YAML or JSON) added or replacing them."""
    plans = dict(PRESETS)
    if path is None:
        return plans
    try:
        raw: Any = decode_document(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"cannot read the plans file {path}: {exc.strerror}") from None
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"the plans file {path} must map plan names to their limits")
    for name, spec in raw.items():
        try:
            parsed = _PlanSpec.model_validate(spec or {})
        except ValidationError as exc:
            raise InvalidInput(f"plan {name!r} in {path}: {exc.errors()[0]['msg']}") from None
        plans[str(name)] = Plan(
            str(name),
            parsed.requests_per_minute,
            parsed.execution_starts_per_minute,
            parsed.executions_per_day,
        )
    return plans
