"""The tables. The database is the only source of truth for workflows, executions and assets.

One Alembic lineage (`store/migrations`) creates these on SQLite and PostgreSQL; a test
checks that the migrations and this module agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        return dialect.type_descriptor(DateTime(timezone=dialect.name != "sqlite"))

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # One step instead of two (ours, then SQLite's DATETIME formatting): this runs for
        # several columns of every node run. Same text SQLAlchemy's SQLite DATETIME stores.
        # A transaction stamps many columns with one `now`: remember the last conversion.
        last: list[Any] = [None, None]

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value is last[0]:
                return str(last[1])
            if value.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
            text = value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
            last[0], last[1] = value, text
            return text

        return process

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")

DEFAULT_WORKSPACE = "ws_default"

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("plan", String(64), nullable=False),
    # Spendable credits; `credits_held` of them are set aside for executions under way.
    Column("credits_balance", Float, nullable=False, server_default=text("0")),
    Column("credits_held", Float, nullable=False, server_default=text("0")),
    # Signs deliveries to an execution's own webhookUrl (endpoints have their own secrets).
    Column("webhook_secret", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("mode", String(8), nullable=False),  # live or test
    Column("prefix", String(24), nullable=False),  # shown: "sk-live-AbCd"
    Column("last4", String(4), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the whole key
    Column("scopes", JSONType, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Index(None, "workspace_id"),
)

workflows = Table(
    "workflows",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("latest_version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    Index(None, "workspace_id", "id"),
)

workflow_versions = Table(
    "workflow_versions",
    metadata,
    Column("workflow_id", String(40), ForeignKey("workflows.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("graph", JSONType, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

executions = Table(
    "executions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("workflow_id", String(40), ForeignKey("workflows.id"), nullable=True),
    Column("workflow_version", Integer, nullable=True),
    Column("status", String(16), nullable=False),
    # Executions of test keys run every generation on the sandbox and cost nothing.
    Column("mode", String(8), nullable=False, server_default="live"),
    Column("webhook_url", Text, nullable=True),
    # The graph that runs (the saved version with this execution's params applied).
    Column("graph", JSONType, nullable=False),
    Column("inputs", JSONType, nullable=False),
    Column("error", JSONType, nullable=True),
    Column("node_count", Integer, nullable=False),
    # Node runs not yet in a terminal state; the execution ends when it reaches zero.
    Column("remaining", Integer, nullable=False),
    Column("credits", Float, nullable=False, server_default=text("0")),
    # Credits set aside for node runs that have not been charged yet.
    Column("credits_held", Float, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    # The batch item this execution runs, if any (its end is counted on the batch).
    Column("batch_id", String(40), nullable=True),
    Column("batch_item_id", BigInteger, nullable=True),
    Index(None, "workspace_id", "id"),
    Index(None, "workflow_id", "id"),
    Index(None, "status", "id"),
    Index(None, "batch_id"),
)

node_runs = Table(
    "node_runs",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("execution_id", String(40), ForeignKey("executions.id"), nullable=False),
    Column("node_id", String(128), nullable=False),
    Column("node_type", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("duration_ms", Float, nullable=True),
    Column("credits", Float, nullable=False, server_default=text("0")),
    # What the run was priced at when queued (held from the workspace until it is charged).
    Column("price", Float, nullable=False, server_default=text("0")),
    # The model a generation ran on (for usage by model).
    Column("model", String(200), nullable=True),
    Column("cached", Boolean, nullable=False, server_default=text("false")),
    Column("outputs", JSONType, nullable=True),
    Column("error", JSONType, nullable=True),
    Column("progress", Float, nullable=True),
    Column("provider_job", JSONType, nullable=True),
    # A quality gate sent this run back to make its image again: how many times, and the
    # params changed for the next attempt (new seed, more steps).
    Column("regenerations", Integer, nullable=False, server_default=text("0")),
    Column("adjust", JSONType, nullable=True),
    UniqueConstraint("execution_id", "node_id"),
    # What workers scan to claim work: only runnable rows, oldest first.
    Index(
        "ix_node_runs_runnable",
        "next_attempt_at",
        "id",
        sqlite_where=text("state = 'QUEUED'"),
        postgresql_where=text("state = 'QUEUED'"),
    ),
    Index(
        "ix_node_runs_leased",
        "lease_expires_at",
        sqlite_where=text("state = 'RUNNING'"),
        postgresql_where=text("state = 'RUNNING'"),
    ),
)

assets = Table(
    "assets",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("format", String(16), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("execution_id", String(40), nullable=True),
    Column("node_id", String(128), nullable=True),
    Column("prompt", Text, nullable=True),
    Column("negative_prompt", Text, nullable=True),
    Column("seed", BigInteger, nullable=True),
    Column("model", String(200), nullable=True),
    Column("params", JSONType, nullable=True),
    # How the image was made: generation info, the operation that produced it, its parents.
    Column("meta", JSONType, nullable=False),
    Column("filename", String(255), nullable=True),
    # Measurements of quality nodes, by metric ({"sharpness": 312.5, "phash": "c3a1..."}).
    Column("quality", JSONType, nullable=True),
    # pending-review, approved or rejected: set for outputs of batch items (by a quality
    # gate, else pending-review), changed by a person.
    Column("review_state", String(16), nullable=True),
    Column("review_note", Text, nullable=True),
    Column("reviewed_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "execution_id"),
    Index(None, "sha256"),
    Index(None, "workspace_id", "created_at"),
)

node_cache = Table(
    "node_cache",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("node_type", String(200), nullable=False),
    Column("outputs", JSONType, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

execution_events = Table(
    "execution_events",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("execution_id", String(40), nullable=False),
    Column("type", String(40), nullable=False),
    Column("node_id", String(128), nullable=True),
    Column("data", JSONType, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "execution_id", "id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    # sha256 of method, path and body: the same key with another request is refused.
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # in_flight, done
    Column("status_code", Integer, nullable=True),
    Column("response_headers", JSONType, nullable=True),
    Column("response_body", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("locked_at", UTCDateTime, nullable=True),
    Index(None, "created_at"),
)

credit_ledger = Table(
    "credit_ledger",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # grant, charge
    Column("amount", Float, nullable=False),  # positive for grants, negative for charges
    Column("execution_id", String(40), nullable=True),
    Column("node_id", String(128), nullable=True),
    Column("model", String(200), nullable=True),
    Column("note", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "workspace_id", "created_at"),
)

triggers = Table(
    "triggers",
    metadata,
    Column("id", String(64), primary_key=True),  # the public webhookId: 192 random bits
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("workflow_id", String(40), ForeignKey("workflows.id"), nullable=False),
    Column("mode", String(8), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=True),
    Index(None, "workflow_id"),
)

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", JSONType, nullable=False),
    Column("secret", String(100), nullable=False),
    Column("description", String(500), nullable=False, server_default=""),
    Column("enabled", Boolean, nullable=False),
    Column("disabled_reason", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "workspace_id"),
)

# The outbox: written in the transaction that changes the state it reports on.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),  # the webhook-id header: stable across retries
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("endpoint_id", String(40), ForeignKey("webhook_endpoints.id"), nullable=True),
    Column("url", Text, nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", JSONType, nullable=False),
    Column("state", String(16), nullable=False),  # pending, sending, delivered, failed
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    Index(
        "ix_webhook_deliveries_due",
        "next_attempt_at",
        sqlite_where=text("state = 'pending'"),
        postgresql_where=text("state = 'pending'"),
    ),
    Index(
        "ix_webhook_deliveries_sending",
        "lease_expires_at",
        sqlite_where=text("state = 'sending'"),
        postgresql_where=text("state = 'sending'"),
    ),
    Index(None, "endpoint_id", "created_at"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("delivery_id", String(40), ForeignKey("webhook_deliveries.id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("duration_ms", Float, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "delivery_id"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("workflow_id", String(40), ForeignKey("workflows.id"), nullable=False),
    Column("workflow_version", Integer, nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("mode", String(8), nullable=False),
    Column("status", String(16), nullable=False),  # RUNNING, COMPLETED, CANCELLED
    # What the batch was asked: concurrency, dedupe, seeds, runs, variants, negatives.
    Column("options", JSONType, nullable=False),
    Column("concurrency", Integer, nullable=False),
    # Counters kept by the transactions that move items, so progress is one row to read.
    Column("total", Integer, nullable=False),
    Column("pending", Integer, nullable=False),
    Column("running", Integer, nullable=False, server_default=text("0")),
    Column("completed", Integer, nullable=False, server_default=text("0")),
    Column("failed", Integer, nullable=False, server_default=text("0")),
    Column("cancelled", Integer, nullable=False, server_default=text("0")),
    # Items that share the result of an identical item instead of running.
    Column("deduplicated", Integer, nullable=False, server_default=text("0")),
    Column("credits", Float, nullable=False, server_default=text("0")),
    Column("webhook_url", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Index(None, "workspace_id", "id"),
    Index(None, "status"),
)

batch_items = Table(
    "batch_items",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("batch_id", String(40), ForeignKey("batches.id"), nullable=False),
    # Position in the items given (0-based), the prompt variant and the run of that item.
    Column("item_index", Integer, nullable=False),
    Column("variant", String(64), nullable=False, server_default=""),
    Column("run", Integer, nullable=False, server_default=text("0")),
    Column("inputs", JSONType, nullable=False),
    Column("seed", BigInteger, nullable=True),
    # sha256 of what decides the result (inputs, seed, variant): equal keys run once.
    Column("dedupe_key", String(64), nullable=False),
    Column("duplicate_of", BigInteger, nullable=True),
    # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED
    Column("status", String(16), nullable=False),
    Column("execution_id", String(40), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", JSONType, nullable=True),
    Column("credits", Float, nullable=False, server_default=text("0")),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    UniqueConstraint("batch_id", "item_index", "variant", "run"),
    Index(None, "batch_id", "status", "id"),
    Index(None, "batch_id", "duplicate_of"),
)

negative_prompts = Table(
    "negative_prompts",
    metadata,
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("text", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
