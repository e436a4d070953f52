"""dataset lineage and preference votes

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-02 21:00:00.000000

A dataset version links to the one it was made from (curation, or an A/B test's votes) and says how;
blind votes on A/B answers feed the leaderboard and preference datasets.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('origin', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_dataset_parent_id'), ['parent_id'], unique=False)
    op.create_table('ab_vote',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('team_id', sa.Uuid(), nullable=False),
    sa.Column('ab_test_id', sa.Uuid(), nullable=False),
    sa.Column('deployment_a', sa.Uuid(), nullable=False),
    sa.Column('deployment_b', sa.Uuid(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('answer_a', sa.Text(), nullable=False),
    sa.Column('answer_b', sa.Text(), nullable=False),
    sa.Column('shown_first', sa.Enum('a', 'b', name='voteside'), nullable=False),
    sa.Column('choice', sa.Enum('a', 'b', 'tie', 'both_bad', name='votechoice'), nullable=False),
    sa.Column('voter_id', sa.Uuid(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['ab_test_id'], ['ab_test.id'], ),
    sa.ForeignKeyConstraint(['deployment_a'], ['deployment.id'], ),
    sa.ForeignKeyConstraint(['deployment_b'], ['deployment.id'], ),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], ),
    sa.ForeignKeyConstraint(['voter_id'], ['app_user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('ab_vote', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ab_vote_ab_test_id'), ['ab_test_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ab_vote_team_id'), ['team_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('ab_vote', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ab_vote_team_id'))
        batch_op.drop_index(batch_op.f('ix_ab_vote_ab_test_id'))
    op.drop_table('ab_vote')
    sa.Enum(name='votechoice').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='voteside').drop(op.get_bind(), checkfirst=True)
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_parent_id'))
        batch_op.drop_column('origin')
        batch_op.drop_column('parent_id')
