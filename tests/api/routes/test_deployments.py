"""Deployments and the OpenAI endpoints' validation, in-process (no inference worker runs here)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import Role
from tests.accounts import Member, make_member, make_team


@pytest.fixture(scope="module")
def trainer() -> Member:
    return make_member(make_team(), Role.trainer)


def test_deploy_a_base_model_and_retire_it(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    h = trainer.headers
    r = anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-1"}, headers=h)
    assert r.status_code == 201, r.text
    deployment = r.json()
    assert deployment["model"] == "base-1" and deployment["status"] == "active" and deployment["experiment_id"] is None
    assert (
        anonymous.post(
            "/api/deployments/", json={"base_model": str(tiny_model), "name": "base-1"}, headers=h
        ).status_code
        == 409
    )
    models = anonymous.get("/v1/models", headers=h).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["base-1"]
    assert anonymous.get("/v1/models/base-1", headers=h).json() == models["data"][0]
    other_team = make_member(make_team(), Role.admin).headers
    for headers, name in ((h, "nope"), (other_team, "base-1")):  # another team's model does not exist for it
        r = anonymous.get(f"/v1/models/{name}", headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text

    status = anonymous.get(f"/api/deployments/{deployment['id']}/status", headers=h).json()
    assert status["workers_alive"] == 0 and status["loaded_on"] == []

    assert anonymous.delete(f"/api/deployments/{deployment['id']}", headers=h).json()["status"] == "retired"
    assert anonymous.delete(f"/api/deployments/{deployment['id']}", headers=h).status_code == 409
    assert anonymous.get("/v1/models", headers=h).json()["data"] == []
    assert anonymous.get("/v1/models/base-1", headers=h).status_code == 404  # retired
    r = anonymous.post(
        "/v1/chat/completions", json={"model": "base-1", "messages": [{"role": "user", "content": "x"}]}, headers=h
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "experiment_id"),
        ({"base_model": "/nope/model"}, 422, "base_model"),
        ({"experiment_id": "00000000-0000-0000-0000-00000000abcd"}, 404, "experiment_id"),
        ({"base_model": "x", "name": "bad name!"}, 422, "name"),
    ],
)
def test_bad_deployments_name_the_field(
    anonymous: TestClient, trainer: Member, body: dict[str, str], status: int, field: str
) -> None:
    r = anonymous.post("/api/deployments/", json=body, headers=trainer.headers)
    assert r.status_code == status, r.text
    detail = r.json()
    named = detail.get("field") or ".".join(str(p) for p in detail["detail"][0]["loc"][1:])
    assert named == field


def test_viewers_cannot_deploy(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    viewer = make_member(trainer.team_id, Role.viewer)
    r = anonymous.post("/api/deployments/", json={"base_model": str(tiny_model)}, headers=viewer.headers)
    assert r.status_code == 403


def test_openai_errors_have_openai_shape(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    h = trainer.headers
    anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-2"}, headers=h)
    cases = [
        ({"model": "base-2", "messages": []}, 400, "messages"),
        ({"model": "base-2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base-2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "base-2", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"model": "base-2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        (
            {"model": "base-2", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3},
            400,
            "presence_penalty",
        ),
        (
            {"model": "base-2", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": -2.5},
            400,
            "frequency_penalty",
        ),
    ]
    for body, status, param in cases:
        r = anonymous.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    r = anonymous.post(
        "/v1/chat/completions",
        json={"model": "base-2", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer fts_wrong"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


USER = [{"role": "user", "content": "x"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
# (endpoint, extra body fields, the param the 400 names, its code): nothing OpenAI defines is silently ignored.
NOT_HONOURED = [
    ("chat", {"n": 17}, "n", "invalid_value"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "invalid_value"),  # requires logprobs: true
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ("chat", {"logprobs": True, "stream": True}, "logprobs", "unsupported_parameter"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
    (
        "chat",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
        "response_format",
        "invalid_value",
    ),
    ("chat", {"tool_choice": "required"}, "tool_choice", "invalid_value"),  # needs tools
    ("chat", {"tools": [TOOL], "stream": True}, "stream", "unsupported_parameter"),
    ("chat", {"tools": [TOOL, TOOL]}, "tools", "invalid_value"),  # names must be unique
    (
        "chat",
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        "tool_choice",
        "invalid_value",
    ),
    (
        "chat",
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        "tools.0.function.name",
        "invalid_value",
    ),
    ("chat", {"messages": [{"role": "tool", "content": "42"}]}, "messages.0", "invalid_value"),  # no tool_call_id
    (
        "chat",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}],
                }
            ]
        },
        "messages.0.tool_calls.0.function.arguments",
        "invalid_value",
    ),
    ("chat", {"logit_bias": {"the": -100}}, "logit_bias", "invalid_value"),  # keys are token ids
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ("chat", {"audio": {"voice": "alloy"}}, "audio", "unsupported_parameter"),
    ("chat", {"store": True}, "store", "unsupported_parameter"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
        "messages.0.name",
        "unsupported_parameter",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]},
        "messages.0.content",
        "unsupported_parameter",
    ),
    ("chat", {"made_up": 1}, "made_up", "unknown_parameter"),
    ("completions", {"logprobs": 6}, "logprobs", "invalid_value"),
    ("completions", {"logprobs": 1, "stream": True}, "logprobs", "unsupported_parameter"),
    ("completions", {"best_of": 3}, "best_of", "unsupported_parameter"),
    ("completions", {"suffix": "end"}, "suffix", "unsupported_parameter"),
    ("completions", {"n": 0}, "n", "invalid_value"),
    ("completions", {"made_up": 1}, "made_up", "unknown_parameter"),
]


@pytest.mark.parametrize(("endpoint", "extra", "param", "code"), NOT_HONOURED)
def test_a_parameter_this_server_does_not_honour_is_a_400_naming_it(
    anonymous: TestClient, trainer: Member, endpoint: str, extra: dict[str, Any], param: str, code: str
) -> None:
    body: dict[str, Any] = {"model": "any", **({"messages": USER} if endpoint == "chat" else {"prompt": "x"}), **extra}
    url = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    r = anonymous.post(url, json=body, headers=trainer.headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"].startswith(f"{param}: ")


def test_no_op_values_of_those_parameters_are_accepted(
    anonymous: TestClient, trainer: Member, tiny_model: Path
) -> None:
    h = trainer.headers
    anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-noop"}, headers=h)
    chat = {
        "model": "base-noop",
        "messages": USER,
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "response_format": {"type": "text"},
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "store": False,
        "metadata": {"run": "1"},
        "user": "u",
        "presence_penalty": 0.5,
    }
    completion = {"model": "base-noop", "prompt": "x", "n": 1, "best_of": 1, "logprobs": 0, "suffix": ""}
    for url, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        r = anonymous.post(url, json=body, headers=h)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker", r.text  # valid: it was dispatched


def test_no_inference_worker_is_503_at_once(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    h = trainer.headers
    anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-3"}, headers=h)
    r = anonymous.post("/v1/completions", json={"model": "base-3", "prompt": "hi"}, headers=h)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"


NOT_ALLOWED = (
    "base_model: not an allowed model: use a Hub id, a name under the models directory, "
    "or (development) a local model directory outside the studio's data"
)


def _deploy(client: TestClient, member: Member, base_model: str) -> tuple[int, dict[str, str]]:
    r = client.post("/api/deployments/", json={"base_model": base_model}, headers=member.headers)
    return r.status_code, r.json()


def test_deploying_another_teams_run_from_the_work_dir_is_refused_like_any_unknown_path(
    anonymous: TestClient, trainer: Member, tmp_path: Path
) -> None:
    """The attack: a path under another team's training work dir (a full fine-tune's output). It gets the
    same answer as a path that does not exist or is not a model."""
    from app.core.config import get_settings

    settings = get_settings()
    run_output = Path(settings.training.work_dir) / "team-a-run" / "output"
    run_output.mkdir(parents=True, exist_ok=True)
    (run_output / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    link = tmp_path / "link"
    link.symlink_to(run_output, target_is_directory=True)
    for path in (run_output, link, tmp_path / "missing", tmp_path / "empty", Path(settings.inference.cache_dir)):
        assert _deploy(anonymous, trainer, str(path)) == (422, {"detail": NOT_ALLOWED, "field": "base_model"}), path


@pytest.fixture
def production(tiny_model: Path) -> Iterator[Any]:
    """The app with production settings: an allowlist of Hub ids, and the tiny model's parent as models_dir."""
    from app.core.config import get_settings
    from app.main import app

    settings = get_settings().model_copy(deep=True)
    settings.environment = "production"
    settings.api.allowed_base_models = ["allowed-org/*", "exact/model-1"]
    settings.api.models_dir = str(tiny_model.parent)
    app.dependency_overrides[get_settings] = lambda: settings
    try:
        yield settings
    finally:
        app.dependency_overrides.pop(get_settings, None)


def test_production_allows_only_listed_hub_ids_and_names_under_the_models_dir(
    anonymous: TestClient, trainer: Member, tiny_model: Path, tmp_path: Path, production: Any
) -> None:
    import shutil

    refused = (422, {"detail": NOT_ALLOWED, "field": "base_model"})
    assert _deploy(anonymous, trainer, "allowed-org/some-model")[0] == 201
    assert _deploy(anonymous, trainer, "exact/model-1")[0] == 201
    assert _deploy(anonymous, trainer, "exact/model-2") == refused
    assert _deploy(anonymous, trainer, "other-org/model") == refused
    status, deployed = _deploy(anonymous, trainer, tiny_model.name)  # a name under api.models_dir
    assert status == 201 and deployed["base_model"] == str(tiny_model.resolve())
    outside = shutil.copytree(tiny_model, tmp_path / "outside-model")
    assert _deploy(anonymous, trainer, str(outside)) == refused  # explicit local paths: development only
    assert _deploy(anonymous, trainer, "../" + tiny_model.parent.name) == refused  # no escaping models_dir
    assert _deploy(anonymous, trainer, "/etc") == refused


def _hold(team_id: Any, slots: int) -> Callable[[], None]:
    """Take ``slots`` of the team's in-flight slots, as requests on another API replica would (the Redis
    limiter is shared); returns their release."""
    from app.core.config import get_settings
    from app.core.inflight import RedisLimiter

    settings = get_settings()
    limiter = RedisLimiter(settings.events.redis_url, settings.inference.request_timeout_s)
    runner = asyncio.Runner()  # one loop for both calls: the limiter's connections belong to it
    assert runner.run(limiter.acquire(team_id, "held-elsewhere", slots, slots=slots))

    def release() -> None:
        with runner:
            runner.run(limiter.release(team_id, "held-elsewhere"))

    return release


def test_the_inflight_quota_is_checked_before_any_lookup_and_counts_compares(
    anonymous: TestClient, tiny_model: Path
) -> None:
    from app.core.db import session_scope
    from app.models import Team

    member = make_member(make_team(), Role.trainer)
    with session_scope() as session:
        team = session.get(Team, member.team_id)
        assert team is not None
        team.max_inflight_requests = 2
        session.add(team)
        session.commit()
    h = member.headers
    ids = [
        anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": n}, headers=h).json()["id"]
        for n in ("side-a", "side-b")
    ]
    ab = anonymous.post(
        "/api/ab-testing/",
        json={"name": "ab", "deployment_a": ids[0], "deployment_b": ids[1], "prompts": ["hi"], "max_tokens": 2},
        headers=h,
    ).json()
    chat = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    release = _hold(member.team_id, 2)
    try:
        # Refused at the quota before the deployment is even looked up (that would be a 404).
        r = anonymous.post("/v1/chat/completions", json=chat, headers=h)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
        r = anonymous.post(f"/api/ab-testing/{ab['id']}/compare", headers=h)
        assert r.status_code == 429 and "in-flight" in r.json()["detail"], r.text
    finally:
        release()
    assert anonymous.post("/v1/chat/completions", json=chat, headers=h).status_code == 404
    compared = anonymous.post(f"/api/ab-testing/{ab['id']}/compare", headers=h)
    assert compared.status_code == 200, compared.text  # no worker here: each side's answer is an error
    assert compared.json()["results"]["a"]["errors"] == 1


def test_v1_prompts_are_capped_before_they_go_anywhere(anonymous: TestClient, trainer: Member) -> None:
    from app.core.config import get_settings

    caps = get_settings().inference
    h = trainer.headers
    r = anonymous.post("/v1/completions", json={"model": "x", "prompt": "a" * (caps.max_prompt_chars + 1)}, headers=h)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and "max_prompt_chars" in r.json()["error"]["message"]
    half = "a" * (caps.max_prompt_chars // 2 + 1)
    two_halves = [{"role": "user", "content": half}, {"role": "user", "content": [{"type": "text", "text": half}]}]
    many = [{"role": "user", "content": "x"}] * (caps.max_messages + 1)
    for messages, cap in ((two_halves, "max_prompt_chars"), (many, "max_messages")):
        r = anonymous.post("/v1/chat/completions", json={"model": "x", "messages": messages}, headers=h)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and cap in error["message"] and error["type"] == "invalid_request_error"
