"""experiment evaluation

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 21:40:00.000000

An experiment's evaluation after training: its spec, status and results.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0012'
down_revision: Union[str, Sequence[str], None] = '0011'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('experiment_evaluation',
    sa.Column('experiment_id', sa.Uuid(), nullable=False),
    sa.Column('team_id', sa.Uuid(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=True),
    sa.Column('status', sa.Enum('waiting', 'queued', 'running', 'succeeded', 'failed', name='evaluationstatus'), nullable=False),
    sa.Column('results', sa.JSON(), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], ),
    sa.PrimaryKeyConstraint('experiment_id')
    )
    with op.batch_alter_table('experiment_evaluation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_experiment_evaluation_team_id'), ['team_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('experiment_evaluation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_experiment_evaluation_team_id'))
    op.drop_table('experiment_evaluation')
    sa.Enum(name='evaluationstatus').drop(op.get_bind(), checkfirst=True)
