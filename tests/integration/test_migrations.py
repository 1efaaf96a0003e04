"""The Alembic migrations and `store/tables.py` describe the same schema, on every backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from imagegraph.settings import Settings
from imagegraph.store import migrate
from imagegraph.store.db import Database
from imagegraph.store.tables import metadata


def test_migrations_build_exactly_the_declared_schema(settings: Settings) -> None:
    db = Database(settings.database_url_or_default(), threads=1)
    try:
        migrate.upgrade(db)
        assert migrate.current_revision(db) == migrate.head_revision()
        with db.read() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
        assert differences == []
    finally:
        db.close()


def test_downgrade_to_nothing_and_up_again(settings: Settings) -> None:
    db = Database(settings.database_url_or_default(), threads=1)
    try:
        migrate.upgrade(db)
        migrate.downgrade(db, "base")
        assert migrate.current_revision(db) is None
        migrate.upgrade(db)
        assert migrate.current_revision(db) == migrate.head_revision()
    finally:
        db.close()
