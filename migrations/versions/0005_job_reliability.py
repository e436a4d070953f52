"""job reliability: handoff, worker-loss budget, queued time, outbox backoff

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 16:30:00.000000

A worker that is shutting down hands its job back (handoff_requested); attempts lost to dead
workers are counted against training.max_attempts (worker_losses); a job queued too long without
a claim is re-sent (queued_at); a requeue after a lost worker waits its backoff (outbox.not_before).

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('handoff_requested', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('worker_losses', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('queued_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('queue_resends', sa.Integer(), server_default='0', nullable=False))

    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('not_before', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('not_before')

    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_column('queue_resends')
        batch_op.drop_column('queued_at')
        batch_op.drop_column('worker_losses')
        batch_op.drop_column('handoff_requested')
