"""Alembic migrations of the catalog schema (applied by :class:`catalog.db.Catalog`)."""
