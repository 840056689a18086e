"""Alembic revisions of the catalog schema, oldest first (``0001_initial``)."""
