"""Speech is priced per character: prices.per_1k_chars, and the characters spoken in usage records and rollups

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('prices', sa.Column('per_1k_chars', sa.BigInteger(), nullable=False, server_default='0'))
    op.add_column('usage_records', sa.Column('characters', sa.BigInteger(), nullable=False, server_default='0'))
    op.add_column('usage_rollups', sa.Column('characters', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    for table, column in (('usage_rollups', 'characters'), ('usage_records', 'characters'), ('prices', 'per_1k_chars')):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column(column)
