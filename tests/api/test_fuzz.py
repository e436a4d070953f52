"""Fuzz every API operation against the app's own OpenAPI (schemathesis), in-process on the real stack.

The ASGI app runs in this process on the session's Postgres and Redis, as a team admin (with a login token,
so the routes that mint credentials are reached too) and as a viewer (with an API key). Before each
operation the team holds a dataset, an experiment (not started), an active deployment, an A/B test and a
third member; in half of the cases a path id, a `base_model` query or a body field (`dataset_id`,
`model`, ...) takes one of those real values, so routes are fuzzed past their 404. Checks: no 5xx, every
status code declared by the operation, every body matching the schema declared for its status code.

Left out: the two SSE streams (`/events`), which never end. Kept: `/v1/*completions`, which answer 4xx, or
503 at once with a deployed model and no inference worker (that declared 503 is accepted); the multipart
upload (schemathesis generates the form; `REAL_BODY` gives it a file that parses); `PATCH /api/users/me`,
since a password change needs the current password, which the fuzzer cannot know (and API keys cannot
change the account). No generated id is ever a fuzzing member's own user or key id, so the fuzzer cannot
remove, demote or revoke itself; there is no logout route.

Bounded for CI: `MAX_EXAMPLES` generated cases per operation and role, plus schemathesis' deterministic
coverage cases for the admin; no deadline; derandomized with a fixed seed and no example database, so a
run sends the same cases in the same order. About 2 minutes on two cores (docs/reliability.md, "Fuzzing").
The last tests pin what the fuzzer found, each on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from app.api.limits import BodySizeLimit
from app.main import app as studio_app
from app.models import Role
from tests.accounts import Member, make_member, make_team

pytestmark = pytest.mark.faults

MAX_EXAMPLES = 15
SEED = 20240601
CLIENT = ("fuzzer", 4242)
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
# No inference worker runs here: with a deployed model these answer 503 at once (declared), not a 5xx bug.
NEEDS_INFERENCE_WORKER = {"/v1/chat/completions", "/v1/completions", "/api/ab-testing/{test_id}/compare"}


class FuzzedApp:
    """The app as the fuzzer sees it: called from an address of its own (the login throttle counts failed
    logins per client address, and the fuzzer's must not throttle other tests' logins from "testclient"),
    and without its lifespan (the outbox relay; no fuzzed route needs it, and the schema is loaded at
    collection, before the database is migrated), as the other API tests' TestClients run it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return  # refused before any message: the server runs the app without a lifespan
        await self.app({**scope, "client": CLIENT}, receive, send)


APP = FuzzedApp(studio_app)
# Values of the fuzzed team's own (filled by `world`) that generated path parameters, query parameters and
# top-level body fields of the same name take in half of the cases, so the fuzzer gets past "not found".
REAL_PATH: dict[str, Any] = {}  # never a fuzzing member's user id or key id (see above)
REAL_QUERY: dict[str, Any] = {}
REAL_BODY: dict[str, Any] = {"file": b'{"prompt": "q", "completion": "a"}\n'}  # an upload that parses


def load_schema(*, coverage: bool) -> Any:
    """The app's own OpenAPI document. The coverage phase adds schemathesis' deterministic boundary and
    type-confusion cases (huge integers, empty and over-long strings, wrong types, unexpected methods)."""
    config = {"seed": SEED, "generation": {"mode": "all"}, "phases": {"coverage": {"enabled": coverage}}}
    loaded = schemathesis.openapi.from_asgi("/openapi.json", APP, config=schemathesis.Config.from_dict(config))
    for hook in (flatmap_path_parameters, flatmap_query, flatmap_body):
        loaded.hook(hook)
    # Server-sent event streams never end: the fuzzer would wait on each case until its timeout.
    return loaded.exclude(path_regex=r"/events$")


def _sometimes_real(values: Any, real: dict[str, Any]) -> st.SearchStrategy[Any]:
    """The generated values, each field named in ``real`` either as generated or set to the real value."""
    if not isinstance(values, dict) or not real.keys() & values.keys():
        return st.just(values)
    return st.fixed_dictionaries(
        {
            name: st.sampled_from([value, real[name]]) if name in real else st.just(value)
            for name, value in values.items()
        }
    )


def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: Any) -> st.SearchStrategy[Any]:
    return _sometimes_real(path_parameters, REAL_PATH)


def flatmap_query(context: schemathesis.HookContext, query: Any) -> st.SearchStrategy[Any]:
    return _sometimes_real(query, REAL_QUERY)


def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    return _sometimes_real(body, REAL_BODY)


# The admin gets the coverage phase too; the viewer, refused most writes with a 403, only the fuzzing.
admin_schema = load_schema(coverage=True)
viewer_schema = load_schema(coverage=False)


@pytest.fixture(scope="module")
def admin() -> Member:
    """A team of this module's own: the fuzzer lowers quotas, revokes keys and deletes rows in it."""
    return make_member(make_team(), Role.admin)


@pytest.fixture(scope="module")
def admin_token(admin: Member) -> str:
    """The admin logs in (a login token reaches the routes that mint credentials, which API keys may not)."""
    return admin.login_headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def viewer(admin: Member) -> Member:
    return make_member(admin.team_id, Role.viewer)


@pytest.fixture
def world(admin: Member, tiny_model: Path) -> None:
    """Before each operation, the team holds a dataset, an experiment (not started), an active deployment
    and an A/B test, and a trainer besides the fuzzing members, at the default quotas: what an earlier
    operation deleted, retired, removed or lowered is made again."""
    with asgi.get_client(APP) as http:
        http.headers.update(admin.headers)

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = http.post(path, json=body)
            assert r.status_code == 201, f"{path}: {r.status_code} {r.text}"
            return dict(r.json())

        def found(path: str) -> dict[str, Any] | None:
            r = http.get(path)
            return dict(r.json()) if r.status_code == 200 else None

        team = REAL_PATH["team_id"] = str(admin.team_id)
        r = http.put(f"/api/teams/{team}/quota", json={})
        assert r.status_code == 200, r.text
        if "dataset_id" not in REAL_PATH or not found(f"/api/datasets/{REAL_PATH['dataset_id']}"):
            rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
            REAL_PATH["dataset_id"] = post("/api/datasets/", {"name": "fuzz-data", "rows": rows})["id"]
        if "experiment_id" not in REAL_PATH or not found(f"/api/experiments/{REAL_PATH['experiment_id']}"):
            body = {
                "name": "fuzz",
                "base_model": str(tiny_model),
                "dataset_id": REAL_PATH["dataset_id"],
                "start": False,
            }
            REAL_PATH["experiment_id"] = post("/api/experiments/", body)["id"]
        deployment = found(f"/api/deployments/{REAL_PATH['deployment_id']}") if "deployment_id" in REAL_PATH else None
        if deployment is None or deployment["status"] != "active":
            deployment = post("/api/deployments/", {"base_model": str(tiny_model)})
            REAL_PATH["deployment_id"] = REAL_PATH["model_id"] = deployment["id"]
        if "test_id" not in REAL_PATH:
            other = post("/api/deployments/", {"base_model": str(tiny_model)})["id"]
            body = {"name": "fuzz", "deployment_a": deployment["id"], "deployment_b": other, "prompts": ["hi"]}
            REAL_PATH["test_id"] = post("/api/ab-testing/", body)["id"]
        members = http.get(f"/api/teams/{team}/members").json()["data"]
        if not any(m["user_id"] == REAL_PATH.get("user_id") for m in members):
            REAL_PATH["user_id"] = str(make_member(admin.team_id, Role.trainer).user_id)
    REAL_QUERY.update(base_model=str(tiny_model))
    REAL_BODY.update(
        base_model=str(tiny_model),
        dataset_id=REAL_PATH["dataset_id"],
        experiment_id=REAL_PATH["experiment_id"],
        deployment_a=deployment["id"],
        deployment_b=deployment["id"],
        model=deployment["model"],  # /v1: a deployed model, which answers 503 without an inference worker
    )


FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def fuzz(case: schemathesis.Case, headers: dict[str, str]) -> None:
    response = case.call(headers=headers)
    checks = CHECKS
    if case.path in NEEDS_INFERENCE_WORKER and response.status_code == 503:
        checks = [c for c in CHECKS if c is not not_a_server_error]  # the declared answer without a worker
    case.validate_response(response, checks=checks, headers=headers)


@admin_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_as_admin(case: schemathesis.Case, admin_token: str, world: None) -> None:
    fuzz(case, {"Authorization": f"Bearer {admin_token}"})


@viewer_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_as_viewer(case: schemathesis.Case, viewer: Member, world: None) -> None:
    fuzz(case, viewer.headers)


# ---------------------------------------------------------------- what the fuzzer found, pinned


def test_every_operation_declares_the_errors_it_answers() -> None:
    """/api and /admin declare their error codes with the app's own shapes (no FastAPI default 422, which
    only describes one of the 422 bodies); /v1 declares OpenAI's shape and no 422 (it answers 400)."""
    document = studio_app.openapi()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if path.startswith(("/api/", "/admin/")):
                assert {"400", "401", "403", "404", "409", "413", "422", "429", "503"} <= codes, (method, path)
            elif path.startswith("/v1/"):
                assert {"400", "401", "404", "413", "429", "4XX", "503"} <= codes and "422" not in codes, (method, path)


@pytest.mark.parametrize(
    ("method", "path", "send", "field"),
    [
        ("POST", "/api/auth/login", {"data": {"username": "a\x00", "password": "x"}}, "username"),  # was a 500
        ("GET", "/api/teams/{team}/audit/?action=a%00", {}, "action"),
        ("POST", "/api/datasets/", {"json": {"name": "a\x00", "rows": [{"text": "t"}]}}, "name"),  # was a 500
        ("POST", "/api/datasets/", {"json": {"name": "a\ud800", "rows": [{"text": "t"}]}}, "name"),  # was a 500
        ("POST", "/api/datasets/", {"json": {"name": "a", "rows": [{"text": "t"}, {"text": "\x00"}]}}, "rows.1.text"),
    ],
)
def test_text_postgres_cannot_store_is_a_422_naming_the_field(
    admin: Member, method: str, path: str, send: dict[str, Any], field: str
) -> None:
    if "json" in send:  # escaped as \\u0000 / \\ud800, as a client's JSON encoder sends them
        send = {"content": json.dumps(send["json"]), "headers": {"Content-Type": "application/json"}}
    r = TestClient(APP, headers=admin.headers).request(method, path.format(team=admin.team_id), **send)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_v1_refuses_nul_in_openai_shape(viewer: Member) -> None:
    r = TestClient(APP, headers=viewer.headers).post("/v1/completions", json={"model": "m\x00", "prompt": "hi"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model"


@pytest.mark.parametrize(("path", "shape"), [("/v1/completions", "error"), ("/api/datasets/", "detail")])
def test_a_body_over_the_limit_has_the_shape_its_path_declares(path: str, shape: str) -> None:
    r = TestClient(BodySizeLimit(studio_app, max_bytes=8)).post(path, content=b"x" * 100)
    assert r.status_code == 413 and shape in r.json(), r.text
