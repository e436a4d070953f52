"""The two reads every team-scoped resource repeats: one row of the caller's team, and one page of rows."""

from __future__ import annotations

import uuid
from typing import Any, Protocol, TypeVar

from sqlmodel import Session, func, select
from sqlmodel.sql.expression import SelectOfScalar


class TeamOwned(Protocol):
    team_id: uuid.UUID


OwnedT = TypeVar("OwnedT", bound=TeamOwned)
RowT = TypeVar("RowT")


def get_owned(*, session: Session, model: type[OwnedT], team_id: uuid.UUID, id: Any) -> OwnedT | None:
    """The row with primary key ``id`` when it belongs to the team, else None: another team's row
    answers the same as a missing one, so its existence is not revealed."""
    row = session.get(model, id)
    return row if row is not None and row.team_id == team_id else None


def paginate(*, session: Session, query: SelectOfScalar[RowT], skip: int, limit: int) -> tuple[list[RowT], int]:
    """One page of ``query`` (filtered and ordered by the caller), and how many rows the query has in all."""
    count = session.exec(select(func.count()).select_from(query.order_by(None).subquery())).one()
    rows = session.exec(query.offset(skip).limit(limit)).all()
    return list(rows), count
