"""What the API returns, as frozen models with snake_case attributes.

Parsed from the server's camelCase JSON; fields a newer server adds are ignored, so an older
client keeps working. Statuses are plain strings (see `TERMINAL_STATUSES`) for the same
reason.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
"""Execution statuses after which nothing changes."""
BATCH_TERMINAL_STATUSES = frozenset({"COMPLETED", "CANCELLED"})
"""Batch statuses after which nothing changes (until failed items are retried)."""

T = TypeVar("T")


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


class Page(Model, Generic[T]):
    """One page of a list; pass `next_cursor` as `cursor` for the next (None: last page)."""

    items: list[T]
    next_cursor: str | None = None


# -- workflows -------------------------------------------------------------------------------


class Workflow(Model):
    """A saved workflow at one version, with its graph."""

    id: str
    name: str
    description: str = ""
    version: int
    latest_version: int
    created_at: datetime
    updated_at: datetime
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    viewport: dict[str, Any] | None = None

    def document(self) -> dict[str, Any]:
        """The workflow as a document to save again (`update_workflow`, `create_workflow`)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "nodes": self.nodes,
            "edges": self.edges,
        }
        if self.viewport is not None:
            doc["viewport"] = self.viewport
        return doc


class WorkflowSummary(Model):
    id: str
    name: str
    description: str = ""
    version: int
    node_count: int
    created_at: datetime
    updated_at: datetime


class Validation(Model):
    """The outcome of `validate_workflow`: every problem at once, each located."""

    valid: bool
    errors: list[dict[str, Any]] = Field(default_factory=list)


# -- executions ------------------------------------------------------------------------------


class ExecutionHandle(Model):
    """A queued (or cancelled) execution. `replayed` is true when the server answered an
    `Idempotency-Key` it had seen before with the first response."""

    execution_id: str
    status: str
    replayed: bool = False


class Output(Model):
    """An image an `output:image` node stored; `url` downloads it (with the API key)."""

    node_id: str | None = None
    asset_id: str
    url: str
    width: int
    height: int
    format: str
    mime_type: str
    sha256: str
    size_bytes: int


class Poll(Model):
    """Status and outputs of an execution."""

    execution_id: str
    status: str
    outputs: list[Output] = Field(default_factory=list)
    error: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES


class NodeRun(Model):
    node_id: str
    node_type: str
    label: str | None = None
    status: str
    attempts: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    credits: float = 0.0
    cached: bool = False
    progress: float | None = None
    outputs: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # How many times a quality gate sent the run back, and the params it changed.
    regenerations: int = 0
    adjust: dict[str, Any] | None = None


class Totals(Model):
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


class Execution(Model):
    """The full record of an execution: every node's status, attempts, timing and credits."""

    execution_id: str
    workflow_id: str | None = None
    workflow_version: int | None = None
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    outputs: list[Output] = Field(default_factory=list)
    totals: Totals
    nodes: list[NodeRun] = Field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def node(self, node_id: str) -> NodeRun:
        """The run of one node; KeyError if the execution has no such node."""
        for run in self.nodes:
            if run.node_id == node_id:
                return run
        raise KeyError(node_id)


class ExecutionSummary(Model):
    execution_id: str
    workflow_id: str | None = None
    workflow_version: int | None = None
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    credits: float = 0.0
    error: dict[str, Any] | None = None


class Event(Model):
    """One server-sent event of an execution; `data` is its JSON payload."""

    id: str | None = None
    type: str
    data: dict[str, Any] = Field(default_factory=dict)


# -- assets ----------------------------------------------------------------------------------


class Asset(Model):
    """A stored image and how it was made."""

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
    # Measurements of quality nodes by metric, and the review state of an output.
    quality: dict[str, Any] | None = None
    review_state: str | None = None
    created_at: datetime


# -- workspace, credits, usage, keys ---------------------------------------------------------


class Plan(Model):
    name: str
    requests_per_minute: int | None = None
    execution_starts_per_minute: int | None = None
    executions_per_day: int | None = None


class Credits(Model):
    balance: float
    held: float
    available: float


class Workspace(Model):
    """The workspace of the calling key, with the key's own mode and scopes."""

    id: str
    name: str
    plan: Plan
    credits: Credits
    mode: str
    scopes: list[str]


class UsageRow(Model):
    executions: int
    images: int
    credits: float
    cost_per_image: float | None = None


class UsageDay(UsageRow):
    date: date


class UsageByModel(Model):
    model: str | None = None
    generations: int
    images: int
    credits: float
    cost_per_image: float | None = None


class Usage(Model):
    """Executions, images and credits between `start` and `end` (both included, UTC)."""

    start: date = Field(alias="from")
    end: date = Field(alias="to")
    totals: UsageRow
    by_day: list[UsageDay] = Field(default_factory=list)
    by_model: list[UsageByModel] = Field(default_factory=list)


class Key(Model):
    """An API key as listed: never its secret."""

    id: str
    name: str
    mode: str
    prefix: str
    last4: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class CreatedKey(Key):
    """A new API key. `key` is the secret, shown this once (None on an idempotent replay)."""

    key: str | None = None


# -- triggers and webhooks -------------------------------------------------------------------


class Trigger(Model):
    """A public URL that starts a workflow without an API key (see `fire_trigger`)."""

    webhook_id: str
    url: str
    workflow_id: str
    mode: str
    enabled: bool
    created_at: datetime
    last_used_at: datetime | None = None


class WebhookEndpoint(Model):
    """Where the server POSTs execution events; `secret` signs them (shown on creation)."""

    id: str
    url: str
    events: list[str]
    description: str = ""
    enabled: bool
    disabled_reason: str | None = None
    created_at: datetime
    secret: str | None = None


class DeliveryAttempt(Model):
    attempt: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: float
    created_at: datetime


class Delivery(Model):
    """One webhook message and every attempt to deliver it."""

    id: str
    endpoint_id: str | None = None
    url: str
    event_type: str
    payload: dict[str, Any]
    state: str
    attempts: int
    next_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    attempt_log: list[DeliveryAttempt] = Field(default_factory=list)


# -- batches ---------------------------------------------------------------------------------


class BatchCreated(Model):
    """A batch the server accepted; `deduplicated` runs take the outcome of an identical one."""

    batch_id: str
    status: str
    total: int
    deduplicated: int = 0


class BatchCounts(Model):
    """A batch's items by status; `pending + running + completed + failed + cancelled` is
    `total`."""

    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int
    deduplicated: int = 0


class Batch(Model):
    """A batch's progress: counts by status, credits spent, rate and estimated time left."""

    batch_id: str
    name: str = ""
    status: str
    workflow_id: str
    workflow_version: int
    mode: str
    concurrency: int
    counts: BatchCounts
    progress: float
    credits: float = 0.0
    images_per_minute: float | None = None
    eta_seconds: float | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in BATCH_TERMINAL_STATUSES


class BatchOutput(Model):
    """An output of a batch item; `url` downloads it (`Client.download(output.url)`)."""

    asset_id: str
    node_id: str | None = None
    url: str
    review_state: str | None = None
    quality: dict[str, Any] | None = None


class BatchItem(Model):
    """One run of a batch: an item's inputs, its variant and run number, seed and outcome."""

    item_id: int
    index: int
    variant: str | None = None
    run: int
    inputs: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    status: str
    execution_id: str | None = None
    duplicate_of: int | None = None
    attempts: int = 0
    error: dict[str, Any] | None = None
    credits: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outputs: list[BatchOutput] = Field(default_factory=list)


class BatchRetry(Model):
    """How many failed items run again, and the batch afterwards."""

    retried: int
    batch: Batch
