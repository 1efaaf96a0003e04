"""Initial schema: workflows, versions, executions, node runs, assets, cache, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import imagegraph.store.tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("execution_id", sa.String(length=40), nullable=True),
        sa.Column("node_id", sa.String(length=128), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "meta",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("filename", sa.String(length=255), nullable=True),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assets")),
    )
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_assets_execution_id"), ["execution_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_assets_sha256"), ["sha256"], unique=False)

    op.create_table(
        "execution_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("execution_id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=True),
        sa.Column(
            "data",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_execution_events")),
    )
    with op.batch_alter_table("execution_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_execution_events_execution_id_id"), ["execution_id", "id"], unique=False
        )

    op.create_table(
        "node_cache",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("node_type", sa.String(length=200), nullable=False),
        sa.Column(
            "outputs",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_node_cache")),
    )
    op.create_table(
        "workflows",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("updated_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("deleted_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
    )
    op.create_table(
        "executions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workflow_id", sa.String(length=40), nullable=True),
        sa.Column("workflow_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "graph",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "inputs",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "error",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("node_count", sa.Integer(), nullable=False),
        sa.Column("remaining", sa.Integer(), nullable=False),
        sa.Column("credits", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.Column("started_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("finished_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_executions_workflow_id_workflows")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_executions_status_id"), ["status", "id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_executions_workflow_id_id"), ["workflow_id", "id"], unique=False
        )

    op.create_table(
        "workflow_versions",
        sa.Column("workflow_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "graph",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", imagegraph.store.tables.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_workflow_versions_workflow_id_workflows"),
        ),
        sa.PrimaryKeyConstraint("workflow_id", "version", name=op.f("pk_workflow_versions")),
    )
    op.create_table(
        "node_runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("execution_id", sa.String(length=40), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("node_type", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("next_attempt_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("started_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("finished_at", imagegraph.store.tables.UTCDateTime(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("credits", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("cached", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column(
            "outputs",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "error",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("progress", sa.Float(), nullable=True),
        sa.Column(
            "provider_job",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"], ["executions.id"], name=op.f("fk_node_runs_execution_id_executions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_runs")),
        sa.UniqueConstraint(
            "execution_id", "node_id", name=op.f("uq_node_runs_execution_id_node_id")
        ),
    )
    with op.batch_alter_table("node_runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_node_runs_leased",
            ["lease_expires_at"],
            unique=False,
            sqlite_where=sa.text("state = 'RUNNING'"),
            postgresql_where=sa.text("state = 'RUNNING'"),
        )
        batch_op.create_index(
            "ix_node_runs_runnable",
            ["next_attempt_at", "id"],
            unique=False,
            sqlite_where=sa.text("state = 'QUEUED'"),
            postgresql_where=sa.text("state = 'QUEUED'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("node_runs", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_node_runs_runnable",
            sqlite_where=sa.text("state = 'QUEUED'"),
            postgresql_where=sa.text("state = 'QUEUED'"),
        )
        batch_op.drop_index(
            "ix_node_runs_leased",
            sqlite_where=sa.text("state = 'RUNNING'"),
            postgresql_where=sa.text("state = 'RUNNING'"),
        )

    op.drop_table("node_runs")
    op.drop_table("workflow_versions")
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_executions_workflow_id_id"))
        batch_op.drop_index(batch_op.f("ix_executions_status_id"))

    op.drop_table("executions")
    op.drop_table("workflows")
    op.drop_table("node_cache")
    with op.batch_alter_table("execution_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_execution_events_execution_id_id"))

    op.drop_table("execution_events")
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assets_sha256"))
        batch_op.drop_index(batch_op.f("ix_assets_execution_id"))

    op.drop_table("assets")
