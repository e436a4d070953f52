"""Request dependencies as ``Annotated`` aliases, so routes read like their signatures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlmodel import Session

from app.core.config import Settings, get_settings
from app.core.db import get_engine
from app.core.storage import Storage, get_storage
from app.models import DEFAULT_TEAM_ID


def get_session() -> Iterator[Session]:
    with Session(get_engine()) as session:
        yield session


def get_current_team() -> uuid.UUID:
    """The caller's team. Until accounts land (issue 3) every caller is in the default team."""
    return DEFAULT_TEAM_ID


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
TeamDep = Annotated[uuid.UUID, Depends(get_current_team)]
