"""pause, and what the OpenAI fine-tuning API records on a run

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 09:30:00.000000

A run can be paused (checkpoint, free the GPU, resume later); a fine-tuning job (/v1/fine_tuning/jobs)
is an experiment with a separate validation dataset, the caller's metadata and its `ft:` model name.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0014'
down_revision: Union[str, Sequence[str], None] = '0013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    if op.get_bind().dialect.name == 'postgresql':  # SQLite stores enums as plain strings
        op.execute("ALTER TYPE experimentstatus ADD VALUE IF NOT EXISTS 'paused'")
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pause_requested', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('validation_dataset_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('labels', sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column('fine_tuned_model', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.create_index(batch_op.f('ix_experiment_fine_tuned_model'), ['fine_tuned_model'], unique=False)
        batch_op.create_foreign_key(
            'fk_experiment_validation_dataset_id_dataset', 'dataset', ['validation_dataset_id'], ['id']
        )
    op.execute("UPDATE experiment SET labels = '{}'")


def downgrade() -> None:
    """Downgrade schema (a paused run becomes cancelled: Postgres cannot drop an enum value)."""
    op.execute("UPDATE experiment SET status = 'cancelled' WHERE status = 'paused'")
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_constraint('fk_experiment_validation_dataset_id_dataset', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_experiment_fine_tuned_model'))
        batch_op.drop_column('fine_tuned_model')
        batch_op.drop_column('labels')
        batch_op.drop_column('validation_dataset_id')
        batch_op.drop_column('pause_requested')
