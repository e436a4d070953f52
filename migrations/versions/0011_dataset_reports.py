"""dataset reports

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 21:30:00.000000

Computed dataset reports, kept by what they depend on (rows, tokenizer, length, training shape).

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel column types)


# revision identifiers, used by Alembic.
revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('dataset_report',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('dataset_id', sa.Uuid(), nullable=False),
    sa.Column('cache_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sa.Enum('pending', 'ready', 'failed', name='reportstatus'), nullable=False),
    sa.Column('request', sa.JSON(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('cache_key')
    )
    with op.batch_alter_table('dataset_report', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_report_dataset_id'), ['dataset_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('dataset_report', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_report_dataset_id'))
    op.drop_table('dataset_report')
    sa.Enum(name='reportstatus').drop(op.get_bind(), checkfirst=True)
