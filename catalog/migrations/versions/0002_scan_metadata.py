"""Scan metadata: acquisition time on scans, one experiment row per (proposal, sample).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("scans", sa.Column("acquired", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_scans_acquired", "scans", ["acquired"], unique=False)
    op.create_index("ix_experiments_proposal_sample", "experiments", ["proposal", "sample"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("ix_experiments_proposal_sample", table_name="experiments")
    op.drop_index("ix_scans_acquired", table_name="scans")
    with op.batch_alter_table("scans") as batch:  # SQLite cannot drop a column in place
        batch.drop_column("acquired")
