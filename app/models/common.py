"""What every model module shares: the default team's id and the timestamp default."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

# The team created by the first migration; the first admin joins it.
DEFAULT_TEAM_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")


def utcnow() -> datetime:
    return datetime.now(UTC)
