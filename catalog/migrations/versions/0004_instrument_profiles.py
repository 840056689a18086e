"""Instrument profiles: Caglioti U, V, W, pseudo-Voigt eta and zero shift refined from a
calibrant pattern, stored with the calibration (keyed by the PONI file's checksum).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instrument_profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("poni_checksum", sa.String(length=64), nullable=False),
        sa.Column("poni_path", sa.Text(), nullable=False),
        sa.Column("calibrant", sa.String(length=128), nullable=False),
        sa.Column("calibrant_checksum", sa.String(length=64), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("source_checksum", sa.String(length=64), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.Column("esd", sa.JSON(), nullable=False),
        sa.Column("rwp", sa.Float(), nullable=False),
        sa.Column("lattice", sa.Float(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_instrument_profiles_key", "instrument_profiles", ["key"], unique=True)
    op.create_index("ix_instrument_profiles_poni_checksum", "instrument_profiles",
                    ["poni_checksum"])


def downgrade() -> None:
    op.drop_index("ix_instrument_profiles_poni_checksum", table_name="instrument_profiles")
    op.drop_index("ix_instrument_profiles_key", table_name="instrument_profiles")
    op.drop_table("instrument_profiles")
