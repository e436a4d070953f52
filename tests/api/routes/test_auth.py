"""Login, JWT checks, password hashing, the login rate limit, API keys."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import jwt
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import text
from sqlmodel import delete, select

from app.core.config import Settings, get_settings
from app.core.db import get_engine, session_scope
from app.core.security import JWT_ALGORITHM, InvalidToken, create_access_token, decode_access_token, signing_keys
from app.models import LoginThrottle, Role, User, utcnow
from tests.accounts import PASSWORD, Member, make_member, make_team


@pytest.fixture
def member() -> Member:
    return make_member(make_team(), Role.trainer)


@pytest.fixture
def clean_throttle() -> Iterator[None]:
    yield
    with session_scope() as session:
        session.exec(delete(LoginThrottle))  # type: ignore[call-overload]
        session.commit()


def login(client: TestClient, email: str, password: str) -> tuple[int, dict[str, object]]:
    r = client.post("/api/auth/login", data={"username": email, "password": password})
    return r.status_code, r.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_login_issues_a_token_that_authenticates(anonymous: TestClient, member: Member) -> None:
    status, body = login(anonymous, member.email.upper(), PASSWORD)  # emails are case-insensitive
    assert status == 200 and body["token_type"] == "bearer"
    me = anonymous.get("/api/users/me", headers=bearer(str(body["access_token"])))
    assert me.status_code == 200 and me.json()["email"] == member.email
    assert [t["role"] for t in me.json()["teams"]] == ["trainer"]
    header = jwt.get_unverified_header(str(body["access_token"]))
    assert header["alg"] == "HS256" and header["kid"]


def test_wrong_password_and_unknown_email_are_the_same_401(
    anonymous: TestClient, member: Member, clean_throttle: None
) -> None:
    wrong = anonymous.post("/api/auth/login", data={"username": member.email, "password": "nope-nope"})
    unknown = anonymous.post("/api/auth/login", data={"username": "ghost@example.com", "password": "nope-nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


def test_passwords_are_stored_as_argon2id(member: Member) -> None:
    with session_scope() as session:
        user = session.get(User, member.user_id)
        assert user is not None
        assert user.hashed_password.startswith("$argon2id$") and PASSWORD not in user.hashed_password


def test_twenty_bad_logins_in_a_row_answer_429(anonymous: TestClient, member: Member, clean_throttle: None) -> None:
    limit = get_settings().auth.login_max_failures
    assert limit == 20
    for _ in range(limit):
        assert login(anonymous, member.email, "wrong password")[0] == 401
    r = anonymous.post("/api/auth/login", data={"username": member.email, "password": PASSWORD})
    assert r.status_code == 429, "the right password must not get through while locked"
    assert int(r.headers["Retry-After"]) > 0 and "too many failed logins" in r.json()["detail"]


def _forge(
    claims_override: dict[str, object], key: bytes | str | None = None, alg: str = JWT_ALGORITHM, kid: str | None = None
) -> str:
    settings = get_settings()
    keys = signing_keys(settings)
    now = utcnow()
    claims = {
        "sub": "",
        "iss": settings.auth.issuer,
        "aud": settings.auth.audience,
        "iat": now,
        "exp": now + timedelta(minutes=5),
        **claims_override,
    }
    return jwt.encode(
        claims,
        key if key is not None else keys.keys[keys.active_kid],
        algorithm=alg,
        headers={"kid": kid or keys.active_kid},
    )


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("alg none", lambda sub: jwt.encode({"sub": sub}, None, algorithm="none", headers={"kid": "local"})),
        ("wrong algorithm", lambda sub: _forge({"sub": sub}, alg="HS512")),
        ("expired", lambda sub: _forge({"sub": sub, "exp": utcnow() - timedelta(seconds=5)})),
        ("wrong audience", lambda sub: _forge({"sub": sub, "aud": "someone-else"})),
        ("wrong issuer", lambda sub: _forge({"sub": sub, "iss": "evil"})),
        ("unknown key id", lambda sub: _forge({"sub": sub}, kid="retired-2025")),
        ("wrong key", lambda sub: _forge({"sub": sub}, key="x" * 48)),
        ("garbage", lambda sub: "not.a.jwt"),
    ],
)
def test_bad_tokens_are_401(anonymous: TestClient, member: Member, case: str, make) -> None:  # type: ignore[no-untyped-def]
    good = _forge({"sub": str(member.user_id)})
    assert anonymous.get("/api/users/me", headers=bearer(good)).status_code == 200  # the forger itself works
    r = anonymous.get("/api/users/me", headers=bearer(make(str(member.user_id))))
    assert r.status_code == 401, case
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_key_rotation_by_key_id() -> None:
    old, new = "o" * 40, "n" * 40
    user = uuid.uuid4()
    before = Settings(auth={"jwt_keys": {"k1": old}})
    token, _ = create_access_token(before, user)
    rotated = Settings(auth={"jwt_keys": {"k1": old, "k2": new}, "jwt_active_kid": "k2"})
    assert decode_access_token(rotated, token).user_id == user  # old tokens keep working while k1 is listed
    assert jwt.get_unverified_header(create_access_token(rotated, user)[0])["kid"] == "k2"
    retired = Settings(auth={"jwt_keys": {"k2": SecretStr(new)}})
    with pytest.raises(InvalidToken, match="unknown or retired key id"):
        decode_access_token(retired, token)


def test_short_signing_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings(auth={"jwt_keys": {"k": "short"}})


def test_no_credentials_is_401(anonymous: TestClient) -> None:
    r = anonymous.get("/api/experiments/")
    assert r.status_code == 401 and "not authenticated" in r.json()["detail"]


def test_api_key_is_shown_once_stored_hashed_and_revocable(anonymous: TestClient, member: Member) -> None:
    path = f"/api/teams/{member.team_id}/api-keys/"
    minted = anonymous.post(path, json={"name": "ci", "role": "viewer"}, headers=member.headers)
    assert minted.status_code == 403 and "not an API key" in minted.json()["detail"]  # keys cannot mint keys
    created = anonymous.post(path, json={"name": "ci", "role": "viewer"}, headers=member.login_headers)
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert key.startswith("fts_") and len(key) >= 4 + 43  # 32 random bytes, base64url
    assert anonymous.get("/api/experiments/", headers=bearer(key)).status_code == 200
    listed = anonymous.get(path, headers=member.headers).json()["data"]
    assert all("key" not in k for k in listed) and key[:12] in [k["prefix"] for k in listed]
    assert key not in _database_dump(), "an API key must never be stored in clear text"

    key_id = created.json()["id"]
    assert anonymous.delete(f"{path}{key_id}", headers=member.headers).status_code == 200
    r = anonymous.get("/api/experiments/", headers=bearer(key))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_api_key_role_cannot_exceed_its_creator(anonymous: TestClient, member: Member) -> None:
    r = anonymous.post(
        f"/api/teams/{member.team_id}/api-keys/", json={"name": "x", "role": "admin"}, headers=member.login_headers
    )
    assert r.status_code == 403 and r.json()["field"] == "role"


def test_api_key_follows_its_owner_out_of_the_team(anonymous: TestClient) -> None:
    team = make_team()
    admin = make_member(team, Role.admin)
    trainer = make_member(team, Role.trainer)
    assert anonymous.get("/api/experiments/", headers=trainer.headers).status_code == 200
    r = anonymous.delete(f"/api/teams/{team}/members/{trainer.user_id}", headers=admin.headers)
    assert r.status_code == 204
    assert anonymous.get("/api/experiments/", headers=trainer.headers).status_code == 401


def _database_dump() -> str:
    """Every row of every table, as text."""
    with get_engine().connect() as conn:
        tables = [r[0] for r in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))]
        return "\n".join(str(row) for t in tables for row in conn.execute(text(f'SELECT * FROM "{t}"')))  # noqa: S608


def test_users_me_update_password(anonymous: TestClient, member: Member, clean_throttle: None) -> None:
    new = "n3w-kettle-orbit-lamp"  # passes the password policy
    r = anonymous.patch(
        "/api/users/me", json={"current_password": "wrong-one", "new_password": new}, headers=member.login_headers
    )
    assert r.status_code == 400 and r.json()["field"] == "current_password"
    old_token = login(anonymous, member.email, PASSWORD)[1]["access_token"]
    time.sleep(1.1)  # tokens carry whole seconds
    r = anonymous.patch(
        "/api/users/me", json={"current_password": PASSWORD, "new_password": new}, headers=member.login_headers
    )
    assert r.status_code == 200
    status, fresh = login(anonymous, member.email, new)
    assert status == 200
    assert login(anonymous, member.email, PASSWORD)[0] == 401
    stale = anonymous.get("/api/users/me", headers=bearer(str(old_token)))
    assert stale.status_code == 401 and "password changed" in stale.json()["detail"]
    assert anonymous.get("/api/users/me", headers=bearer(str(fresh["access_token"]))).status_code == 200
    with session_scope() as session:
        assert (
            session.exec(select(User).where(User.email == member.email)).one().hashed_password.startswith("$argon2id$")
        )
