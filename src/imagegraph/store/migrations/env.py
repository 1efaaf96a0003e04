"""Alembic environment: runs on the connection imagegraph hands it (see store/migrate.py)."""

from __future__ import annotations

from alembic import context

from imagegraph.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when alembic is driven by hand
    raise RuntimeError("run migrations through `imagegraph db upgrade`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
