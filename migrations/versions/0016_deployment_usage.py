"""deployment usage per minute: request and token rates

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 14:00:00.000000

Each API replica adds what its deployments answered to a per-minute row, so the deployments page shows
request and token rates over the whole fleet of API processes.

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0016'
down_revision: Union[str, Sequence[str], None] = '0015'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'deployment_usage',
        sa.Column('deployment_id', sa.Uuid(), nullable=False),
        sa.Column('minute', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('errors', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['deployment_id'], ['deployment.id']),
        sa.PrimaryKeyConstraint('deployment_id', 'minute'),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('deployment_usage')
