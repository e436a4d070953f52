"""model placement on inference workers, deployment replicas, the training worker registry

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 10:00:00.000000

Which inference workers hold which base model (requests go only there), and how many workers a
deployment's base model is placed on.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0015'
down_revision: Union[str, Sequence[str], None] = '0014'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'model_placement',
        sa.Column('base_model', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
        sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('placed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('ready_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('load_seconds', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('base_model', 'worker'),
    )
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replicas', sa.Integer(), server_default='1', nullable=False))
    op.create_table(
        'training_worker',
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('hostname', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('queues', sa.JSON(), nullable=True),
        sa.Column('gpu_ids', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('slots', sa.Integer(), nullable=False),
        sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    with op.batch_alter_table('training_worker', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_worker_heartbeat_at'), ['heartbeat_at'], unique=False)
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gpus', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_column('gpus')
    op.drop_table('training_worker')
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.drop_column('replicas')
    op.drop_table('model_placement')
