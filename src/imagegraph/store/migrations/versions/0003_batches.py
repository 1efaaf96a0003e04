"""Batches and their items, review states and quality measurements on assets, quality-gate
regenerations on node runs, and the workspace's library of named negative prompts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import imagegraph.store.tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _when() -> imagegraph.store.tables.UTCDateTime:
    return imagegraph.store.tables.UTCDateTime()


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("workflow_id", sa.String(length=40), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("options", _json(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("running", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("completed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("cancelled", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("deduplicated", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("credits", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("started_at", _when(), nullable=True),
        sa.Column("finished_at", _when(), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_batches_workflow_id_workflows")
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_batches_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batches_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_batches_workspace_id_id"), ["workspace_id", "id"], unique=False
        )

    op.create_table(
        "batch_items",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("item_index", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=64), server_default="", nullable=False),
        sa.Column("run", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("inputs", _json(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("dedupe_key", sa.String(length=64), nullable=False),
        sa.Column("duplicate_of", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("execution_id", sa.String(length=40), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", _json(), nullable=True),
        sa.Column("credits", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("started_at", _when(), nullable=True),
        sa.Column("finished_at", _when(), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_batch_items_batch_id_batches")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_items")),
        sa.UniqueConstraint(
            "batch_id",
            "item_index",
            "variant",
            "run",
            name=op.f("uq_batch_items_batch_id_item_index_variant_run"),
        ),
    )
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_batch_items_batch_id_status_id"),
            ["batch_id", "status", "id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_batch_items_batch_id_duplicate_of"),
            ["batch_id", "duplicate_of"],
            unique=False,
        )

    op.create_table(
        "negative_prompts",
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("updated_at", _when(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_negative_prompts_workspace_id_workspaces"),
        ),
        sa.PrimaryKeyConstraint("workspace_id", "name", name=op.f("pk_negative_prompts")),
    )

    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("batch_item_id", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_executions_batch_id"), ["batch_id"], unique=False)

    with op.batch_alter_table("node_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("regenerations", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("adjust", _json(), nullable=True))

    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quality", _json(), nullable=True))
        batch_op.add_column(sa.Column("review_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("review_note", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("reviewed_at", _when(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.drop_column("reviewed_at")
        batch_op.drop_column("review_note")
        batch_op.drop_column("review_state")
        batch_op.drop_column("quality")

    with op.batch_alter_table("node_runs", schema=None) as batch_op:
        batch_op.drop_column("adjust")
        batch_op.drop_column("regenerations")

    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_executions_batch_id"))
        batch_op.drop_column("batch_item_id")
        batch_op.drop_column("batch_id")

    op.drop_table("negative_prompts")
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batch_items_batch_id_duplicate_of"))
        batch_op.drop_index(batch_op.f("ix_batch_items_batch_id_status_id"))
    op.drop_table("batch_items")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batches_workspace_id_id"))
        batch_op.drop_index(batch_op.f("ix_batches_status"))
    op.drop_table("batches")
