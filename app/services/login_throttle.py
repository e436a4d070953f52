"""Failed-login counting per email and per client address: after ``auth.login_max_failures`` failures
inside ``auth.login_window_s`` that email (or client) gets 429 until the window passes, even with the
right password. Kept in the database so every API process shares it, embedded default included."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from app.core.config import AuthSettings
from app.core.db import is_postgres
from app.models import LoginThrottle, utcnow


def keys_for(*, email: str, client: str | None) -> list[str]:
    return [f"email:{email}", *([f"client:{client}"] if client else [])]


def retry_after_s(*, session: Session, settings: AuthSettings, keys: list[str]) -> int:
    """Seconds until a login may be tried again; 0 when it may be tried now."""
    now = utcnow()
    wait = 0
    for key in keys:
        row = session.get(LoginThrottle, key)
        if row and row.failures >= settings.login_max_failures:
            remaining = (row.window_start + timedelta(seconds=settings.login_window_s) - now).total_seconds()
            wait = max(wait, int(remaining) + 1 if remaining > 0 else 0)
    return wait


def record_failure(*, session: Session, settings: AuthSettings, keys: list[str]) -> None:
    try:
        _count(session, settings, keys)
    except IntegrityError:  # a concurrent first failure inserted the row: count again on top of it
        session.rollback()
        _count(session, settings, keys)


def _count(session: Session, settings: AuthSettings, keys: list[str]) -> None:
    now = utcnow()
    for key in keys:
        row = session.get(LoginThrottle, key, with_for_update=is_postgres(session))
        if row is None:
            row = LoginThrottle(key=key, failures=0, window_start=now)
        elif now - row.window_start > timedelta(seconds=settings.login_window_s):
            row.failures, row.window_start = 0, now
        row.failures += 1
        session.add(row)
    session.commit()


def clear(*, session: Session, email: str) -> None:
    """A successful login clears its email's count (not the client's: one good account must not
    reset the count of an address that is guessing others' passwords)."""
    row = session.get(LoginThrottle, f"email:{email}")
    if row is not None:
        session.delete(row)
        session.commit()
