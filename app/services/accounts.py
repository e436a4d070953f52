"""Users: create, bootstrap the first admin, log in (with the rate limit), update one's profile."""

from __future__ import annotations

import uuid

from sqlmodel import Session, col, func, select

from app.core.config import Settings
from app.core.passwords import password_problem
from app.core.security import hash_password, needs_rehash, verify_password
from app.models import DEFAULT_TEAM_ID, Membership, Role, User, UserUpdateMe, utcnow
from app.services import login_throttle
from app.services.errors import InvalidRequest


class LoginRefused(Exception):
    def __init__(self, message: str, status_code: int = 401, retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    local, at, domain = email.partition("@")
    if not (local and at and domain) or any(c.isspace() for c in email) or len(email) > 320:
        raise InvalidRequest("email", f"{email!r} is not an email address")
    return email


def check_password(*, password: str, field: str = "password", user_inputs: tuple[str, ...] = ()) -> None:
    """The password policy (app/core/passwords.py): a 422 on ``field`` saying why, with zxcvbn's advice."""
    if (problem := password_problem(password, user_inputs)) is not None:
        raise InvalidRequest(field, problem)


def get_by_email(*, session: Session, email: str) -> User | None:
    return session.exec(select(User).where(User.email == email)).first()


def create_user(
    *, session: Session, email: str, password: str, full_name: str = "", is_superuser: bool = False
) -> User:
    """Add a user in the caller's transaction (not committed)."""
    email = normalize_email(email)
    check_password(password=password, user_inputs=(email, full_name))
    if get_by_email(session=session, email=email) is not None:
        raise InvalidRequest("email", f"a user with email {email} already exists", status_code=409)
    user = User(email=email, full_name=full_name, hashed_password=hash_password(password), is_superuser=is_superuser)
    session.add(user)
    session.flush()
    return user


def create_admin(*, session: Session, email: str, password: str, full_name: str = "") -> User:
    """A platform admin (superuser) who is also admin of the default team."""
    user = create_user(session=session, email=email, password=password, full_name=full_name, is_superuser=True)
    session.add(Membership(team_id=DEFAULT_TEAM_ID, user_id=user.id, role=Role.admin))
    session.commit()
    session.refresh(user)
    return user


def user_count(*, session: Session) -> int:
    return session.exec(select(func.count()).select_from(User)).one()


def bootstrap_admin(*, session: Session, settings: Settings) -> User | None:
    """First start: create the admin named by STUDIO_ADMIN_EMAIL / STUDIO_ADMIN_PASSWORD, if no user exists."""
    password = settings.admin_password.get_secret_value()
    if not settings.admin_email or not password or user_count(session=session):
        return None
    try:
        return create_admin(session=session, email=settings.admin_email, password=password)
    except InvalidRequest as exc:  # name the setting at fault: nobody typed this one into a form
        field = {"password": "STUDIO_ADMIN_PASSWORD", "email": "STUDIO_ADMIN_EMAIL"}.get(exc.field, exc.field)
        raise InvalidRequest(field, exc.message, exc.status_code) from None


def authenticate(*, session: Session, settings: Settings, email: str, password: str, client: str | None) -> User:
    """The user for these credentials, or LoginRefused (401, or 429 once the rate limit trips)."""
    email = email.strip().lower()
    keys = login_throttle.keys_for(email=email, client=client)
    wait = login_throttle.retry_after_s(session=session, settings=settings.auth, keys=keys)
    if wait:
        raise LoginRefused(f"too many failed logins; try again in {wait} s", 429, wait)
    user = get_by_email(session=session, email=email)
    if not verify_password(password, user.hashed_password if user else None) or user is None or not user.is_active:
        login_throttle.record_failure(session=session, settings=settings.auth, keys=keys)
        raise LoginRefused("incorrect email or password")
    login_throttle.clear(session=session, email=email)
    if needs_rehash(user.hashed_password):
        user.hashed_password = hash_password(password)
        session.add(user)
        session.commit()
    return user


def update_me(*, session: Session, user: User, body: UserUpdateMe) -> User:
    if body.full_name is not None:
        user.full_name = body.full_name
    if body.new_password is not None:
        if not body.current_password or not verify_password(body.current_password, user.hashed_password):
            raise InvalidRequest("current_password", "does not match", status_code=400)
        check_password(password=body.new_password, field="new_password", user_inputs=(user.email, user.full_name))
        user.hashed_password = hash_password(body.new_password)
        user.password_changed_at = utcnow()  # every login token issued before now stops working
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def memberships(*, session: Session, user_id: uuid.UUID) -> list[Membership]:
    query = select(Membership).where(Membership.user_id == user_id).order_by(col(Membership.created_at))
    return list(session.exec(query).all())
