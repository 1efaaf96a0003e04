"""Request and response bodies of the REST API (JSON in camelCase)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from sqlalchemy import RowMapping
from starlette.responses import Response

from imagegraph.keys import Scope
from imagegraph.nodes.imaging import MIME_TYPES
from imagegraph.webhooks import EventType


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class RequestModel(ApiModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# -- workflows -------------------------------------------------------------------------------


class WorkflowOut(ApiModel):
    id: str
    name: str
    description: str
    version: int
    latest_version: int
    created_at: datetime
    updated_at: datetime
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    viewport: dict[str, Any] | None = None


class WorkflowSummary(ApiModel):
    id: str
    name: str
    description: str
    version: int
    node_count: int
    created_at: datetime
    updated_at: datetime


class WorkflowList(ApiModel):
    items: list[WorkflowSummary]
    next_cursor: str | None = None


class VersionOut(ApiModel):
    version: int
    name: str
    created_at: datetime


class VersionList(ApiModel):
    items: list[VersionOut]


class ValidationResult(ApiModel):
    valid: bool
    errors: list[dict[str, str]] = Field(default_factory=list)


# -- executions ------------------------------------------------------------------------------


class ExecuteRequest(RequestModel):
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="Values for input nodes, keyed by node id or label.",
        examples=[{"Prompt": "a red fox in the snow"}],
    )
    nodes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Partial nodes ({id, data: {params}}) whose params override the saved ones.",
    )
    edges: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Must be empty: an execution cannot rewire a workflow.",
    )
    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Version to run; latest if unset."
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="Where to POST a signed notice when the execution ends.",
    )


class ExecuteResponse(ApiModel):
    execution_id: str
    status: str


class OutputOut(ApiModel):
    node_id: str | None
    asset_id: str
    url: str
    width: int
    height: int
    format: str
    mime_type: str
    sha256: str
    size_bytes: int


class PollOut(ApiModel):
    execution_id: str
    status: str
    outputs: list[OutputOut]
    error: dict[str, Any] | None = None


class ProviderRunOut(ApiModel):
    provider: str
    model: str
    route: int = Field(description="Position in the catalog's routes (0: the preferred one).")
    job_id: str | None = Field(default=None, description="The provider's job id, if any.")
    skipped: list[dict[str, str]] = Field(
        default_factory=list, description="Routes passed over, and why (fallbacks)."
    )
    previous_attempt_in_doubt: bool = Field(
        default=False,
        description="An earlier attempt was cut off mid-call: the provider may have done "
        "(and charged) that work too.",
    )


class NodeRunOut(ApiModel):
    node_id: str
    node_type: str
    label: str | None = None
    status: str
    attempts: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    credits: float
    cached: bool
    progress: float | None = None
    outputs: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    provider: ProviderRunOut | None = Field(
        default=None, description="For hosted models: the route that served the node."
    )
    regenerations: int = Field(
        default=0, description="How many times a quality gate sent this run back to run again."
    )
    adjust: dict[str, Any] | None = Field(
        default=None,
        description="Params a quality gate changed for this run's latest generation "
        '(`{"seed": 43, "steps": 28}`).',
    )


class Totals(ApiModel):
    nodes: int
    pending: int
    running: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int
    cached: int
    attempts: int
    credits: float
    outputs: int


class ExecutionOut(ApiModel):
    execution_id: str
    workflow_id: str | None
    workflow_version: int | None
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    inputs: dict[str, Any]
    error: dict[str, Any] | None = None
    outputs: list[OutputOut]
    totals: Totals
    nodes: list[NodeRunOut]


class ExecutionSummary(ApiModel):
    execution_id: str
    workflow_id: str | None
    workflow_version: int | None
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    credits: float
    error: dict[str, Any] | None = None


class ExecutionList(ApiModel):
    items: list[ExecutionSummary]
    next_cursor: str | None = None


class CancelResponse(ApiModel):
    execution_id: str
    status: str


# -- assets and nodes ------------------------------------------------------------------------


class AssetOut(ApiModel):
    id: str
    kind: str
    url: str
    sha256: str
    format: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    execution_id: str | None = None
    node_id: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    model: str | None = None
    params: dict[str, Any] | None = None
    generation: dict[str, Any] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list)
    operation: dict[str, Any] | None = None
    filename: str | None = None
    # Measurements of quality nodes, by metric ({"sharpness": 312.5, "phash": "c3a1…"}).
    quality: dict[str, Any] | None = None
    # pending-review, approved or rejected.
    review_state: str | None = None
    created_at: datetime


class PortIn(ApiModel):
    name: str
    type: str
    required: bool
    accepts: list[str]
    multiple: bool


class PortOut(ApiModel):
    name: str
    type: str


class NodeTypeOut(ApiModel):
    type: str
    category: str
    version: str
    title: str
    description: str
    inputs: list[PortIn]
    outputs: list[PortOut]
    params: dict[str, Any]
    dynamic_inputs: bool
    execution_input: str | None = None


class Health(ApiModel):
    status: str
    version: str | None = None
    checks: dict[str, str] = Field(default_factory=dict)


# -- builders --------------------------------------------------------------------------------


def json_response(
    body: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A ready response for hot endpoints: serialized once by pydantic, not re-validated."""
    return Response(
        content=body.model_dump_json(by_alias=True),
        status_code=status_code,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def asset_url(base_url: str, asset_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v1/assets/{asset_id}/content"


def asset_out(row: RowMapping | Mapping[str, Any], base_url: str) -> AssetOut:
    meta = row["meta"] or {}
    return AssetOut(
        id=row["id"],
        kind=row["kind"],
        url=asset_url(base_url, row["id"]),
        sha256=row["sha256"],
        format=row["format"],
        mime_type=MIME_TYPES.get(row["format"], "application/octet-stream"),
        width=row["width"],
        height=row["height"],
        size_bytes=row["size_bytes"],
        execution_id=row["execution_id"],
        node_id=row["node_id"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        seed=row["seed"],
        model=row["model"],
        params=row["params"],
        generation=meta.get("generation") or {},
        parents=meta.get("parents") or [],
        operation=meta.get("operation"),
        filename=row["filename"],
        quality=row.get("quality"),
        review_state=row.get("review_state"),
        created_at=row["created_at"],
    )


def output_out(row: RowMapping | Mapping[str, Any], base_url: str) -> OutputOut:
    return OutputOut(
        node_id=row["node_id"],
        asset_id=row["id"],
        url=asset_url(base_url, row["id"]),
        width=row["width"],
        height=row["height"],
        format=row["format"],
        mime_type=MIME_TYPES.get(row["format"], "application/octet-stream"),
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
    )


# -- keys, workspace, credits, usage ---------------------------------------------------------


class KeyCreate(RequestModel):
    name: str = Field(min_length=1, max_length=200)
    mode: Literal["live", "test"] = Field(
        default="live", description="Test keys run every generation on the sandbox, free."
    )
    scopes: list[Scope] = Field(
        min_length=1,
        description="workflows:read, workflows:write, executions:write and/or admin.",
    )


class KeyOut(ApiModel):
    id: str
    name: str
    mode: str
    prefix: str
    last4: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class KeyCreated(KeyOut):
    key: str | None = Field(
        description="The secret key. Shown in this response only: store it now. "
        "Null when this response is an idempotent replay (secrets are never stored)."
    )


class KeyList(ApiModel):
    items: list[KeyOut]


class PlanOut(ApiModel):
    name: str
    requests_per_minute: int | None
    execution_starts_per_minute: int | None
    executions_per_day: int | None


class CreditsOut(ApiModel):
    balance: float
    held: float = Field(description="Set aside for executions under way.")
    available: float


class WorkspaceOut(ApiModel):
    id: str
    name: str
    plan: PlanOut
    credits: CreditsOut
    mode: str = Field(description="The mode of the key making this request.")
    scopes: list[str] = Field(description="The scopes of the key making this request.")


class CreditsAdd(RequestModel):
    amount: float = Field(gt=0, le=1_000_000_000, description="Credits to add.")
    note: str | None = Field(default=None, max_length=500)


class LedgerEntry(ApiModel):
    id: int
    kind: str
    amount: float
    execution_id: str | None = None
    node_id: str | None = None
    model: str | None = None
    note: str | None = None
    created_at: datetime


class LedgerList(ApiModel):
    items: list[LedgerEntry]
    next_cursor: str | None = None


class UsageRow(ApiModel):
    executions: int
    images: int
    credits: float
    cost_per_image: float | None = Field(description="Credits per image; null without images.")


class UsageDay(UsageRow):
    date: str


class UsageModel(ApiModel):
    model: str | None
    generations: int
    images: int
    credits: float
    cost_per_image: float | None


class UsageOut(ApiModel):
    start: str = Field(serialization_alias="from")
    end: str = Field(serialization_alias="to")
    totals: UsageRow
    by_day: list[UsageDay]
    by_model: list[UsageModel]


# -- triggers ----------------------------------------------------------------------------


class TriggerOut(ApiModel):
    webhook_id: str
    url: str
    workflow_id: str
    mode: str
    enabled: bool
    created_at: datetime
    last_used_at: datetime | None = None


class TriggerList(ApiModel):
    items: list[TriggerOut]


class TriggerUpdate(RequestModel):
    enabled: bool


# -- webhooks --------------------------------------------------------------------------------


class EndpointCreate(RequestModel):
    url: str = Field(max_length=2048, pattern=r"^https?://")
    events: list[EventType] = Field(min_length=1)
    description: str = Field(default="", max_length=500)


class EndpointUpdate(RequestModel):
    url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://")
    events: list[EventType] | None = Field(default=None, min_length=1)
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None


class EndpointOut(ApiModel):
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None = None
    created_at: datetime
    secret: str | None = Field(
        default=None, description="The whsec_ secret deliveries are signed with."
    )


class EndpointList(ApiModel):
    items: list[EndpointOut]


class AttemptOut(ApiModel):
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: float
    created_at: datetime


class DeliveryOut(ApiModel):
    id: str = Field(description="The webhook-id header: the same on every attempt.")
    endpoint_id: str | None
    url: str
    event_type: str
    payload: dict[str, Any]
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    attempt_log: list[AttemptOut]


class DeliveryList(ApiModel):
    items: list[DeliveryOut]
    next_cursor: str | None = None


class SecretOut(ApiModel):
    secret: str = Field(description="Signs deliveries to executions' own webhookUrl.")


# -- errors ----------------------------------------------------------------------------------


def _absent_not_null(schema: dict[str, Any]) -> None:
    """Optional members of a problem are left out, never sent as null: publish them so."""
    for prop in schema.get("properties", {}).values():
        options = prop.pop("anyOf", None)
        if options is not None:
            prop.update(next(o for o in options if o != {"type": "null"}))
        prop.pop("default", None)


class ProblemIssue(ApiModel):
    """One problem of a request or a workflow, located as precisely as possible."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, json_schema_extra=_absent_not_null
    )

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_field`.")
    message: str
    node_id: str | None = Field(default=None, description="The workflow node at fault.")
    edge_id: str | None = Field(default=None, description="The workflow edge at fault.")
    port: str | None = Field(default=None, description="The node's input or output port.")
    field: str | None = Field(
        default=None, description="Where in the request, e.g. `nodes[0].data.params.width`."
    )


class Problem(ApiModel):
    """An error, as `application/problem+json` (RFC 9457). Some errors add members of
    their own (`retryAfter`, `requiredScope`, `limitBytes`, ...)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        json_schema_extra=_absent_not_null,
    )

    type: str = Field(description="`urn:imagegraph:problem:<code>`.")
    title: str
    status: int = Field(ge=100, le=599)
    detail: str
    code: str = Field(description="Stable machine-readable code, e.g. `not_found`.")
    request_id: str | None = Field(
        default=None, description="The `X-Request-Id` of the request; quote it in reports."
    )
    errors: list[ProblemIssue] | None = Field(
        default=None, description="Every problem found (validation failures)."
    )
