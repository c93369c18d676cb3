"""fleet: live servers with heartbeats, the holds of each server's requests in flight, shared rate-limit windows

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('servers',
    sa.Column('id', sa.String(length=120), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_servers_heartbeat_at'), 'servers', ['heartbeat_at'], unique=False)
    op.create_table('server_holds',
    sa.Column('server_id', sa.String(length=120), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('server_id', 'org_id')
    )
    op.create_table('rate_slots',
    sa.Column('key', sa.String(length=160), nullable=False),
    sa.Column('slot', sa.BigInteger(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'slot')
    )


def downgrade() -> None:
    op.drop_table('rate_slots')
    op.drop_table('server_holds')
    op.drop_index(op.f('ix_servers_heartbeat_at'), table_name='servers')
    op.drop_table('servers')
