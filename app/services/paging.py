"""Keyset pages for OpenAI-style lists (`after` = the last id of the previous page, `has_more`).

Rows are ordered by (created_at, id), so a page is one indexed range read however deep it is, and rows
created between two requests neither repeat nor vanish from the pages that follow.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlmodel import Session
from sqlmodel.sql.expression import SelectOfScalar

T = TypeVar("T")


class Keyed(Protocol):
    created_at: datetime
    id: uuid.UUID


def keyset_page(
    session: Session,
    query: SelectOfScalar[T],
    key: tuple[Any, Any],
    after: Keyed | None,
    limit: int,
    *,
    descending: bool = True,
) -> tuple[list[T], bool]:
    """One page of `query` ordered by `key` (the created_at and id columns), starting past the row `after`;
    and whether more rows follow."""
    created, id_ = key
    if after is not None:
        if descending:
            past = (created < after.created_at) | ((created == after.created_at) & (id_ < after.id))
        else:
            past = (created > after.created_at) | ((created == after.created_at) & (id_ > after.id))
        query = query.where(past)
    order = (created.desc(), id_.desc()) if descending else (created.asc(), id_.asc())
    rows = list(session.exec(query.order_by(*order).limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit
