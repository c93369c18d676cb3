"""server_holds: a row per request in flight instead of one per server and tenant (which every request of a tenant
on a server updated, so each waited for the one before it to commit)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def _release_all() -> None:
    # Holds tracked by the old table are released (the servers that made them are being restarted for this upgrade).
    op.execute("UPDATE organizations SET reserved = reserved - COALESCE((SELECT SUM(h.amount) FROM server_holds h "
               "WHERE h.org_id = organizations.id), 0)")


def upgrade() -> None:
    _release_all()
    op.drop_table('server_holds')
    op.create_table('server_holds',
    sa.Column('id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('server_id', sa.String(length=120), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_server_holds_server_id'), 'server_holds', ['server_id'], unique=False)


def downgrade() -> None:
    _release_all()
    op.drop_index(op.f('ix_server_holds_server_id'), table_name='server_holds')
    op.drop_table('server_holds')
    op.create_table('server_holds',
    sa.Column('server_id', sa.String(length=120), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('server_id', 'org_id')
    )
