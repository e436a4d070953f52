"""experiment lineage and submit warnings

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 21:50:00.000000

Where a run came from (dataset version, recipe, base model, libraries, the run it was cloned from) and
what the dataset report warned of when it was submitted.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0013'
down_revision: Union[str, Sequence[str], None] = '0012'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_experiment_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('lineage', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('warnings', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_experiment_parent_experiment_id'), ['parent_experiment_id'], unique=False)
    # Runs from before: no lineage recorded, no warnings (the models read these as a dict and a list).
    op.execute("UPDATE experiment SET lineage = '{}', warnings = '[]'")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_experiment_parent_experiment_id'))
        batch_op.drop_column('warnings')
        batch_op.drop_column('lineage')
        batch_op.drop_column('parent_experiment_id')
