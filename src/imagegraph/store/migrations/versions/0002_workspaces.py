"""Workspaces, API keys, idempotency keys, credits, public triggers, outbound webhooks.

Everything saved so far moves into a default workspace ("ws_default"), so an upgraded
database keeps its workflows, executions and assets; the server gives it an admin key on
its next start.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import imagegraph.store.tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_WORKSPACE = "ws_default"


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=False),
        sa.Column("credits_balance", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("credits_held", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("webhook_secret", sa.String(length=100), nullable=False),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workspaces")),
    )
    # Everything that exists already belongs to the default workspace.
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    op.bulk_insert(
        sa.table(
            "workspaces",
            sa.column("id", sa.String),
            sa.column("name", sa.String),
            sa.column("plan", sa.String),
            sa.column("credits_balance", sa.Float),
            sa.column("credits_held", sa.Float),
            sa.column("webhook_secret", sa.String),
            sa.column("created_at", imagegraph.store.tables.UTCDateTime),
        ),
        [
            {
                "id": DEFAULT_WORKSPACE,
                "name": "Default",
                "plan": "self-hosted",
                "credits_balance": 0.0,
                "credits_held": 0.0,
                "webhook_secret": secret,
                "created_at": datetime.now(UTC),
            }
        ],
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("prefix", sa.String(length=24), nullable=False),
        sa.Column("last4", sa.String(length=4), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "scopes",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("last_used_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_api_keys_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_api_keys_workspace_id"), ["workspace_id"], unique=False
        )

    op.create_table(
        "credit_ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.Column("execution_id", sa.String(length=40), nullable=True),
        sa.Column("node_id", sa.String(length=128), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_credit_ledger_workspace_id_workspaces"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_ledger")),
    )
    with op.batch_alter_table("credit_ledger", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_credit_ledger_workspace_id_created_at"),
            ["workspace_id", "created_at"],
            unique=False,
        )

    op.create_table(
        "idempotency_keys",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column(
            "response_headers",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("response_body", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("locked_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_idempotency_keys_workspace_id_workspaces"),
        ),
        sa.PrimaryKeyConstraint("workspace_id", "key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idempotency_keys_created_at"), ["created_at"], unique=False
        )

    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "events",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), server_default="", nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_webhook_endpoints_workspace_id_workspaces"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhook_endpoints_workspace_id"), ["workspace_id"], unique=False
        )

    op.create_table(
        "triggers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("workflow_id", sa.String(length=40), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("last_used_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_triggers_workflow_id_workflows")
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_triggers_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_triggers")),
    )
    with op.batch_alter_table("triggers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_triggers_workflow_id"), ["workflow_id"], unique=False)

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=40), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("lease_expires_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("delivered_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_webhook_deliveries_workspace_id_workspaces"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_deliveries_due",
            ["next_attempt_at"],
            unique=False,
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )
        batch_op.create_index(
            "ix_webhook_deliveries_sending",
            ["lease_expires_at"],
            unique=False,
            sqlite_where=sa.text("state = 'sending'"),
            postgresql_where=sa.text("state = 'sending'"),
        )
        batch_op.create_index(
            batch_op.f("ix_webhook_deliveries_endpoint_id_created_at"),
            ["endpoint_id", "created_at"],
            unique=False,
        )

    op.create_table(
        "webhook_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhook_attempts_delivery_id"), ["delivery_id"], unique=False
        )

    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "workspace_id",
                sa.String(length=40),
                nullable=False,
                server_default=DEFAULT_WORKSPACE,
            )
        )
        batch_op.create_index(
            batch_op.f("ix_assets_workspace_id_created_at"),
            ["workspace_id", "created_at"],
            unique=False,
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_assets_workspace_id_workspaces"), "workspaces", ["workspace_id"], ["id"]
        )

    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "workspace_id",
                sa.String(length=40),
                nullable=False,
                server_default=DEFAULT_WORKSPACE,
            )
        )
        batch_op.add_column(
            sa.Column("mode", sa.String(length=8), server_default="live", nullable=False)
        )
        batch_op.add_column(sa.Column("webhook_url", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("credits_held", sa.Float(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.create_index(
            batch_op.f("ix_executions_workspace_id_id"), ["workspace_id", "id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_executions_workspace_id_workspaces"),
            "workspaces",
            ["workspace_id"],
            ["id"],
        )

    with op.batch_alter_table("node_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("price", sa.Float(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("model", sa.String(length=200), nullable=True))

    with op.batch_alter_table("workflows", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "workspace_id",
                sa.String(length=40),
                nullable=False,
                server_default=DEFAULT_WORKSPACE,
            )
        )
        batch_op.create_index(
            batch_op.f("ix_workflows_workspace_id_id"), ["workspace_id", "id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_workflows_workspace_id_workspaces"),
            "workspaces",
            ["workspace_id"],
            ["id"],
        )

    # Existing rows got the default workspace; new rows must say theirs.
    for table in ("assets", "executions", "workflows"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("workspace_id", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("workflows", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_workflows_workspace_id_workspaces"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_workflows_workspace_id_id"))
        batch_op.drop_column("workspace_id")

    with op.batch_alter_table("node_runs", schema=None) as batch_op:
        batch_op.drop_column("model")
        batch_op.drop_column("price")

    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_executions_workspace_id_workspaces"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_executions_workspace_id_id"))
        batch_op.drop_column("credits_held")
        batch_op.drop_column("webhook_url")
        batch_op.drop_column("mode")
        batch_op.drop_column("workspace_id")

    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_assets_workspace_id_workspaces"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_assets_workspace_id_created_at"))
        batch_op.drop_column("workspace_id")

    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_attempts_delivery_id"))

    op.drop_table("webhook_attempts")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_endpoint_id_created_at"))
        batch_op.drop_index(
            "ix_webhook_deliveries_sending",
            sqlite_where=sa.text("state = 'sending'"),
            postgresql_where=sa.text("state = 'sending'"),
        )
        batch_op.drop_index(
            "ix_webhook_deliveries_due",
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )

    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("triggers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_triggers_workflow_id"))

    op.drop_table("triggers")
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_endpoints_workspace_id"))

    op.drop_table("webhook_endpoints")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_created_at"))

    op.drop_table("idempotency_keys")
    with op.batch_alter_table("credit_ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_credit_ledger_workspace_id_created_at"))

    op.drop_table("credit_ledger")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_workspace_id"))

    op.drop_table("api_keys")
    op.drop_table("workspaces")
