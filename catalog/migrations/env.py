"""Alembic environment of the catalog.

:func:`catalog.db.upgrade` passes an open connection (inside its transaction) in
``config.attributes["connection"]``; without one (the ``alembic`` command line with an ini
file) the URL comes from ``sqlalchemy.url`` or ``XRDCT_CATALOG_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from catalog.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("XRDCT_CATALOG_URL")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("XRDCT_CATALOG_URL")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
