"""Hostile inputs, sent as an attacker would: values past what the database stores, API keys reaching
for their owner's account, weak passwords, and credentials left in caches.

The bounds tests walk the app's OpenAPI document, so a new request field is covered without anyone
remembering to: every integer, string, list and free-form object a `/api` route accepts must be
bounded (the database stores a plain `int` column as a 32-bit INTEGER), and a value past its bound
must answer 422 naming the field, never 500.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlmodel import delete
from typer.testing import CliRunner

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import LoginThrottle, Role, User
from app.services import accounts
from app.services.errors import InvalidRequest
from tests.accounts import PASSWORD, Member, make_member, make_team

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
HUGE = 2**63  # past BIGINT too: what the security pass sent
# Formats whose values pydantic parses into a bounded type (or a file upload, bounded by the body limit).
SELF_BOUNDED_FORMATS = {"uuid", "date-time", "date", "binary"}
WEAK = ["12345678", " " * 8, " " * 12, "password", "qwertyuiop", "Password123!", "aaaaaaaaaaaaaaaa"]


@pytest.fixture(scope="module")
def root() -> Member:
    """A platform admin who is admin of a team of its own: every route's role check lets it through."""
    member = make_member(make_team(), Role.admin)
    with session_scope() as session:
        user = session.get(User, member.user_id)
        assert user is not None
        user.is_superuser = True
        session.add(user)
        session.commit()
    return member


@pytest.fixture(scope="module")
def lenient() -> Iterator[TestClient]:
    """A client that answers a server error as a 500 instead of raising it, so a walk can list them all."""
    from app.main import app

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def clean_throttle() -> Iterator[None]:
    yield
    with session_scope() as session:
        session.exec(delete(LoginThrottle))  # type: ignore[call-overload]
        session.commit()


# ---------------------------------------------------------------- the walk over request schemas


def _openapi() -> dict[str, Any]:
    from app.main import app

    return app.openapi()


def _deref(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _variants(schema: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null alternatives of a schema (``X | None`` is ``anyOf: [X, null]``)."""
    schema = _deref(schema, spec)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options is None:
        return [schema]
    return [_deref(o, spec) for o in options if o.get("type") != "null"]


def _fields(schema: dict[str, Any], spec: dict[str, Any], loc: tuple[str | int, ...]) -> Iterator[tuple[Any, ...]]:
    """(loc, leaf schema) for every value a client can send, nested models and list items included."""
    for variant in _variants(schema, spec):
        if "enum" in variant or "const" in variant:
            continue
        kind = variant.get("type")
        if kind == "object" and "properties" in variant:
            for name, sub in variant["properties"].items():
                yield from _fields(sub, spec, (*loc, name))
            continue
        yield loc, variant
        if kind == "array" and variant.get("items"):
            yield from _fields(variant["items"], spec, (*loc, 0))


def _request_fields() -> Iterator[tuple[str, str, str, tuple[Any, ...], dict[str, Any]]]:
    """(method, path, content type, loc, schema) for every field of every /api request body."""
    spec = _openapi()
    for path, item in spec["paths"].items():
        if not path.startswith("/api/"):
            continue  # /v1 takes OpenAI's schemas (app/api/openai_schemas.py), checked by its own tests
        for method, operation in item.items():
            for content_type, media in operation.get("requestBody", {}).get("content", {}).items():
                for loc, schema in _fields(media["schema"], spec, ()):
                    yield method.upper(), path, content_type, loc, schema


def _self_bounded(schema: dict[str, Any]) -> bool:
    return schema.get("format") in SELF_BOUNDED_FORMATS or "contentMediaType" in schema  # a file: the body limit


def _unbounded(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if low is None or high is None or low < INT32_MIN or high > INT32_MAX:
            return f"integer without bounds a 32-bit INTEGER column stores (ge={low}, le={high})"
    elif kind == "string" and "maxLength" not in schema and not _self_bounded(schema):
        return "string without max_length"
    elif kind == "array" and "maxItems" not in schema:
        return "list without max_length"
    elif kind == "object" and schema.get("additionalProperties", True) is not False and "maxProperties" not in schema:
        return "free-form object without a bound on its keys"
    return None


def test_every_request_field_is_bounded() -> None:
    fields = list(_request_fields())
    assert len(fields) > 30, "the walk found too few fields: is the OpenAPI document still there?"
    problems = [
        f"{method} {path} ({content_type}) {'.'.join(map(str, loc))}: {problem}"
        for method, path, content_type, loc, schema in fields
        if (problem := _unbounded(schema)) is not None
    ]
    assert not problems, "\n".join(problems)


def _past_bound(schema: dict[str, Any]) -> list[Any]:
    """Values just past the field's bound, and far past it; [] for fields the walk does not push."""
    kind = schema.get("type")
    if kind == "integer":
        return [schema.get("maximum", INT32_MAX) + 1, HUGE, -HUGE]
    if kind == "string" and "maxLength" in schema:
        return ["x" * (schema["maxLength"] + 1)]
    if kind == "object" and schema.get("maxProperties", 10_000) < 10_000:
        return [{f"k{i}": 1 for i in range(schema["maxProperties"] + 1)}]
    return []


def _nest(loc: tuple[Any, ...], value: Any) -> Any:
    for part in reversed(loc):
        value = [value] if isinstance(part, int) else {part: value}
    return value


def _fill(path: str, team_id: uuid.UUID) -> str:
    """The caller's own team for {team_id}; any id for the rest (the body is refused before it is looked up)."""
    parts = path.split("/")
    return "/".join(str(team_id) if p == "{team_id}" else str(uuid.uuid4()) if p.startswith("{") else p for p in parts)


def test_out_of_bounds_values_answer_422_naming_the_field(lenient: TestClient, root: Member) -> None:
    """Each field alone, past its bound, through its route, as a platform admin with a login token."""
    failures, sent = [], 0
    for method, path, content_type, loc, schema in _request_fields():
        for value in _past_bound(schema):
            url = _fill(path, root.team_id)
            body = _nest(loc, value)
            if content_type == "application/json":
                r = lenient.request(method, url, json=body, headers=root.login_headers)
            elif content_type == "multipart/form-data":
                r = lenient.request(
                    method, url, data=body, files={"file": ("x.jsonl", b'{"text": "hi"}\n')}, headers=root.login_headers
                )
            else:
                r = lenient.request(method, url, data=body, headers=root.login_headers)
            sent += 1
            named = r.status_code == 422 and any(
                tuple(e.get("loc", ())[1:]) == loc for e in r.json().get("detail", []) if isinstance(e, dict)
            )
            if not named:
                failures.append(
                    f"{method} {path} {'.'.join(map(str, loc))}={str(value)[:24]}: {r.status_code} {r.text[:200]}"
                )
    assert sent > 20
    assert not failures, "\n".join(failures)


def test_platform_admin_quota_past_the_database_is_a_422(anonymous: TestClient, root: Member) -> None:
    """The finding as reported: a platform admin's quota past 2^63 answered 500."""
    url = f"/api/teams/{root.team_id}/quota"
    for field in ("max_active_jobs", "max_queued_jobs", "max_inflight_requests"):
        for value in (HUGE, 2**31):
            r = anonymous.put(url, json={field: value}, headers=root.login_headers)
            assert r.status_code == 422, (field, value, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", field]
    r = anonymous.put(url, json={"max_active_jobs": 1000}, headers=root.login_headers)
    assert r.status_code == 200 and r.json()["max_active_jobs"] == 1000  # large, sane values still work


# ---------------------------------------------------------------- API keys stay in their team


@pytest.fixture
def two_teams() -> tuple[Member, Member]:
    """One user, a member of two teams, with an API key for each."""
    first = make_member(make_team(), Role.admin)
    second = make_member(make_team(), Role.trainer, email=first.email)
    return first, second


def test_an_api_key_sees_only_its_own_team(anonymous: TestClient, two_teams: tuple[Member, Member]) -> None:
    first, second = two_teams
    for member in (first, second):
        me = anonymous.get("/api/users/me", headers=member.headers)
        assert me.status_code == 200, me.text
        assert [(t["id"], t["role"]) for t in me.json()["teams"]] == [(str(member.team_id), member.role.value)]
        teams = anonymous.get("/api/teams/", headers=member.headers).json()
        assert teams["count"] == 1 and teams["data"][0]["id"] == str(member.team_id)
    login = {"Authorization": first.login_headers["Authorization"]}  # a login sees every team
    assert {t["id"] for t in anonymous.get("/api/users/me", headers=login).json()["teams"]} == {
        str(first.team_id),
        str(second.team_id),
    }
    assert anonymous.get("/api/teams/", headers=login).json()["count"] == 2


def test_an_api_key_cannot_change_the_account(anonymous: TestClient, two_teams: tuple[Member, Member]) -> None:
    first, _ = two_teams
    for body in (
        {"full_name": "pwned"},
        {"current_password": PASSWORD, "new_password": "a-brand-new-strong-passphrase"},
    ):
        r = anonymous.patch("/api/users/me", json=body, headers=first.headers)
        assert r.status_code == 403, r.text
        assert "API keys cannot change the account; log in" in r.json()["detail"]
    with session_scope() as session:
        user = session.get(User, first.user_id)
        assert user is not None and user.full_name == "" and user.password_changed_at is None
    r = anonymous.patch("/api/users/me", json={"full_name": "Ada"}, headers=first.login_headers)
    assert r.status_code == 200 and r.json()["full_name"] == "Ada"


# ---------------------------------------------------------------- the password policy


def test_policy_refuses_weak_passwords_and_says_why() -> None:
    from app.core.passwords import MIN_LENGTH, password_problem

    for weak in WEAK:
        problem = password_problem(weak)
        assert problem is not None, weak
    assert f"at least {MIN_LENGTH} characters" in (password_problem("12345678") or "")
    assert "common password" in (password_problem("qwertyuiop") or "")  # zxcvbn's own feedback
    assert password_problem("member-kettle@example.com", user_inputs=["member-kettle@example.com"]) is not None
    assert password_problem(PASSWORD) is None
    assert password_problem("x" * 200) is not None  # judged on a bounded prefix: no slow estimate


def test_generated_passwords_pass_the_policy() -> None:
    from app.core.passwords import MIN_LENGTH, MIN_SCORE, generate_password, password_problem

    assert MIN_SCORE >= 3 and MIN_LENGTH >= 10
    for _ in range(50):
        password = generate_password()
        assert password_problem(password) is None and not any(c.isspace() for c in password)


@pytest.mark.parametrize("weak", WEAK)
def test_weak_password_at_invitation_accept(anonymous: TestClient, weak: str) -> None:
    admin = make_member(make_team(), Role.admin)
    invite = anonymous.post(
        f"/api/teams/{admin.team_id}/invitations",
        json={"email": f"new-{secrets.token_hex(4)}@example.com"},
        headers=admin.login_headers,
    )
    token = invite.json()["token"]
    r = anonymous.post("/api/invitations/accept", json={"token": token, "password": weak})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "password" and "password: " in r.json()["detail"]
    strong = anonymous.post("/api/invitations/accept", json={"token": token, "password": "plum-orbit-kettle-42"})
    assert strong.status_code == 200, strong.text


@pytest.mark.parametrize("weak", WEAK)
def test_weak_password_at_password_change(anonymous: TestClient, weak: str) -> None:
    member = make_member(make_team(), Role.viewer)
    r = anonymous.patch(
        "/api/users/me", json={"current_password": PASSWORD, "new_password": weak}, headers=member.login_headers
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "new_password"


def test_weak_password_for_a_new_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli.main import app as cli
    from app.core.passwords import MIN_LENGTH

    email = f"admin-{secrets.token_hex(4)}@example.com"
    done = CliRunner().invoke(cli, ["users", "create-admin", "--email", email, "--password", "12345678"])
    assert done.exit_code != 0 and f"at least {MIN_LENGTH} characters" in done.output
    # STUDIO_ADMIN_PASSWORD: the first start's bootstrap runs the same policy
    settings = get_settings().model_copy(update={"admin_email": email, "admin_password": SecretStr("qwertyuiop")})
    monkeypatch.setattr(accounts, "user_count", lambda **_: 0)
    with session_scope() as session, pytest.raises(InvalidRequest, match="common password"):
        accounts.bootstrap_admin(session=session, settings=settings)
    with session_scope() as session:
        assert accounts.get_by_email(session=session, email=email) is None


# ---------------------------------------------------------------- credentials are not cached


def _no_store(r: Any) -> bool:
    return r.headers.get("Cache-Control") == "no-store" and r.headers.get("Pragma") == "no-cache"


def test_responses_with_credentials_are_not_cached(anonymous: TestClient, clean_throttle: None) -> None:
    admin = make_member(make_team(), Role.admin)
    login = anonymous.post("/api/auth/login", data={"username": admin.email, "password": PASSWORD})
    assert login.status_code == 200 and _no_store(login), login.headers

    keys = f"/api/teams/{admin.team_id}/api-keys/"
    key = anonymous.post(keys, json={"name": "ci"}, headers=admin.login_headers)
    assert key.status_code == 201 and _no_store(key), key.headers
    retry = {**admin.login_headers, "Idempotency-Key": str(uuid.uuid4())}
    first = anonymous.post(keys, json={"name": "ci-2"}, headers=retry)
    replay = anonymous.post(keys, json={"name": "ci-2"}, headers=retry)
    assert first.status_code == replay.status_code == 201 and replay.headers.get("Idempotent-Replayed") == "true"
    assert _no_store(first) and _no_store(replay), (first.headers, replay.headers)

    invitations = f"/api/teams/{admin.team_id}/invitations"
    invite = anonymous.post(invitations, json={"email": "cache@example.com"}, headers=admin.login_headers)
    assert invite.status_code == 201 and _no_store(invite), invite.headers
    retry = {**admin.login_headers, "Idempotency-Key": str(uuid.uuid4())}
    replay = [anonymous.post(invitations, json={"email": "cache2@example.com"}, headers=retry) for _ in range(2)][-1]
    assert replay.headers.get("Idempotent-Replayed") == "true" and _no_store(replay), replay.headers

    accepted = anonymous.post(
        "/api/invitations/accept", json={"token": invite.json()["token"], "password": "plum-orbit-kettle-42"}
    )
    assert accepted.status_code == 200 and _no_store(accepted), accepted.headers


def test_an_experiment_stream_ends_for_a_member_removed_from_the_team(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: an experiment's SSE stream kept sending to a member removed from the team until the run ended."""
    import threading

    from app.api.routes import experiments as routes
    from app.main import app
    from app.models import Membership

    monkeypatch.setattr(routes, "MEMBERSHIP_RECHECK_S", 0.2)
    team = make_team()
    admin, viewer = make_member(team, Role.admin), make_member(team, Role.viewer)
    with TestClient(app, headers=admin.headers) as client:
        rows = [{"text": "the cat likes a short story"}] * 4
        dataset = client.post("/api/datasets/", json={"name": "d", "rows": rows}).json()
        body = {"name": "e", "base_model": str(tiny_model), "dataset_id": dataset["id"], "start": False}
        experiment = client.post("/api/experiments/", json=body).json()
    ended = threading.Event()

    def follow() -> None:
        with (
            TestClient(app, headers=viewer.headers) as watcher,
            watcher.stream("GET", f"/api/experiments/{experiment['id']}/events") as stream,
        ):
            assert stream.status_code == 200
            for _ in stream.iter_lines():
                pass
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    assert not ended.wait(1.5), "the stream ended while the viewer was still a member"
    with session_scope() as session:
        session.delete(session.get(Membership, (team, viewer.user_id)))
        session.commit()
    assert ended.wait(15), "the stream kept going after the viewer was removed from the team"
