"""files and fine-tuning jobs; trained tokens in the price book and the usage records

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('prices', sa.Column('per_1k_train_tokens', sa.BigInteger(), nullable=False, server_default='0'))
    op.add_column('usage_records', sa.Column('train_tokens', sa.BigInteger(), nullable=False, server_default='0'))
    op.add_column('usage_rollups', sa.Column('train_tokens', sa.BigInteger(), nullable=False, server_default='0'))
    op.create_table('files',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('report', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_files_org_id'), ['org_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_files_created_at'), ['created_at'], unique=False)
    op.create_table('fine_tuning_jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('training_file', sa.String(length=64), nullable=False),
    sa.Column('validation_file', sa.String(length=64), nullable=True),
    sa.Column('method', sa.JSON(), nullable=False),
    sa.Column('hyperparameters', sa.JSON(), nullable=False),
    sa.Column('suffix', sa.String(length=64), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('fine_tuned_model', sa.String(length=300), nullable=True),
    sa.Column('run_dir', sa.Text(), nullable=True),
    sa.Column('estimated_tokens', sa.BigInteger(), nullable=False),
    sa.Column('trained_tokens', sa.BigInteger(), nullable=True),
    sa.Column('held', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fine_tuning_jobs_org_id'), ['org_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_fine_tuning_jobs_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_fine_tuning_jobs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_fine_tuning_jobs_fine_tuned_model'), ['fine_tuned_model'], unique=False)
    op.create_table('fine_tuning_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('level', sa.String(length=10), nullable=False),
    sa.Column('type', sa.String(length=10), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_jobs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('fine_tuning_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fine_tuning_events_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    op.drop_table('fine_tuning_events')
    op.drop_table('fine_tuning_jobs')
    op.drop_table('files')
    with op.batch_alter_table('usage_rollups', schema=None) as batch_op:
        batch_op.drop_column('train_tokens')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('train_tokens')
    with op.batch_alter_table('prices', schema=None) as batch_op:
        batch_op.drop_column('per_1k_train_tokens')
