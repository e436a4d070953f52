"""Serving with real processes: Postgres + Redis + a training worker + an inference worker (thread pool)
+ the API, called with the official `openai` client."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.stack import Stack, wait_for

pytestmark = pytest.mark.e2e
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def served(stack: Stack, tiny_model: Path, alpaca_file_module: Path) -> Iterator[dict[str, Any]]:
    """A trained tiny adapter and the base model, both deployed; an inference worker running."""
    stack.start_inference_worker()
    with stack.http(timeout=300) as http:
        with alpaca_file_module.open("rb") as f:
            dataset = http.post(
                "/api/datasets/upload", files={"file": ("alpaca.jsonl", f)}, data={"eval_fraction": "0.25"}
            ).json()
        exp = http.post(
            "/api/experiments/",
            json={
                "name": "served",
                "base_model": str(tiny_model),
                "dataset_id": dataset["id"],
                "recipe": "tiny_lora_cpu",
                "hyperparameters": {"max_steps": 150},
            },
        ).json()
        wait_for(
            lambda: http.get(f"/api/experiments/{exp['id']}").json()["status"] == "succeeded",
            timeout_s=240,
            what="the adapter to train",
        )
        tuned = http.post("/api/deployments/", json={"experiment_id": exp["id"], "name": "tiny-tuned"})
        assert tuned.status_code == 201, tuned.text
        base = http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "tiny-base"})
        assert base.status_code == 201, base.text
    key = stack.headers["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)
    yield {"client": client, "tuned": tuned.json(), "base": base.json(), "dataset": dataset, "experiment": exp}


@pytest.fixture(scope="module")
def alpaca_file_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.e2e.conftest import ALPACA_ROWS, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("serving") / "alpaca.jsonl", ALPACA_ROWS)


def chat(client: openai.OpenAI, model: str, question: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=kw.pop("temperature", 0),
        max_tokens=kw.pop("max_tokens", 16),
        **kw,
    )


def test_models_list(served: dict[str, Any]) -> None:
    ids = {m.id for m in served["client"].models.list()}
    assert {"tiny-tuned", "tiny-base"} <= ids
    assert served["client"].models.retrieve("tiny-tuned").id == "tiny-tuned"


def test_chat_with_the_adapter_differs_from_the_base(served: dict[str, Any]) -> None:
    client = served["client"]
    tuned = chat(client, "tiny-tuned", QUESTIONS[0])
    base = chat(client, "tiny-base", QUESTIONS[0])
    assert tuned.object == "chat.completion" and tuned.choices[0].message.role == "assistant"
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert "Paris" in tuned.choices[0].message.content  # it learned its training data
    assert tuned.usage.prompt_tokens > 0 and 0 < tuned.usage.completion_tokens <= 16
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens
    assert tuned.choices[0].finish_reason in ("stop", "length")


def test_presence_and_frequency_penalties_reach_the_engine(served: dict[str, Any]) -> None:
    client = served["client"]
    kw: dict[str, Any] = {"max_tokens": 48, "extra_body": {"ignore_eos": True}}
    plain = chat(client, "tiny-tuned", QUESTIONS[0], **dict(kw))
    penalized = chat(client, "tiny-tuned", QUESTIONS[0], presence_penalty=2.0, frequency_penalty=2.0, **dict(kw))
    # 48 greedy tokens of a tiny model repeat themselves; penalties of 2 on every repeat change the answer.
    assert penalized.choices[0].message.content != plain.choices[0].message.content
    assert penalized.usage.completion_tokens == plain.usage.completion_tokens == 48


def test_logprobs_with_the_official_client(served: dict[str, Any]) -> None:
    client = served["client"]
    answer = chat(client, "tiny-tuned", QUESTIONS[0], max_tokens=12, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest, with the same log-probability.
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(entry.token for entry in content).startswith(answer.choices[0].message.content[:8])
    assert chat(client, "tiny-tuned", QUESTIONS[0]).choices[0].logprobs is None

    completion = client.completions.create(
        model="tiny-base", prompt="The capital", max_tokens=5, logprobs=2, temperature=0
    )
    legacy = completion.choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 5
    assert all(len(alternatives) <= 2 for alternatives in legacy.top_logprobs)
    assert legacy.text_offset == sorted(legacy.text_offset)


def test_streaming_chat_matches_the_whole_answer(served: dict[str, Any]) -> None:
    client = served["client"]
    whole = chat(client, "tiny-tuned", QUESTIONS[1], max_tokens=24)
    stream = chat(
        client, "tiny-tuned", QUESTIONS[1], max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "not streamed token by token"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_plain_and_streaming(served: dict[str, Any]) -> None:
    client = served["client"]
    done = client.completions.create(model="tiny-base", prompt="The cat likes", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-base", prompt="The cat likes", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == done.choices[0].text
    seeded = [
        client.completions.create(model="tiny-base", prompt="A dog", max_tokens=8, temperature=1.0, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_n_choices_sample_side_by_side(served: dict[str, Any]) -> None:
    client = served["client"]
    solo = chat(client, "tiny-tuned", QUESTIONS[0], max_tokens=12)
    greedy = chat(client, "tiny-tuned", QUESTIONS[0], max_tokens=12, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {solo.choices[0].message.content}  # greedy: all alike
    assert greedy.usage.prompt_tokens == solo.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * solo.usage.completion_tokens

    sampled = chat(client, "tiny-base", "Tell me", max_tokens=16, temperature=1.0, seed=11, n=4)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1, texts  # seed + i per choice: different samples
    again = chat(client, "tiny-base", "Tell me", max_tokens=16, temperature=1.0, seed=11, n=4)
    assert [c.message.content for c in again.choices] == texts  # and reproducible
    for i, text in enumerate(texts):  # choice i is the solo answer with seed + i
        assert (
            chat(client, "tiny-base", "Tell me", max_tokens=16, temperature=1.0, seed=11 + i).choices[0].message.content
            == text
        )

    stream = chat(
        client,
        "tiny-base",
        "Tell me",
        max_tokens=16,
        temperature=1.0,
        seed=11,
        n=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert [parts[i] for i in range(4)] == texts
    assert chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens
    completions = client.completions.create(model="tiny-base", prompt="A dog", max_tokens=6, temperature=0, n=2)
    assert [c.index for c in completions.choices] == [0, 1] and completions.choices[0].text == completions.choices[
        1
    ].text


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes": {"type": "array", "items": {"enum": ["tea", "cats", "rain"]}, "maxItems": 3},
    },
    "required": ["name", "age", "likes"],
    "additionalProperties": False,
}


def test_json_schema_answers_validate_beside_free_rows(served: dict[str, Any]) -> None:
    import json

    import jsonschema

    client = served["client"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    free = [("tiny-tuned" if i % 2 else "tiny-base", QUESTIONS[i % 3]) for i in range(6)]
    solo = [chat(client, model, q, max_tokens=12).choices[0].message.content for model, q in free]

    def constrained(i: int) -> Any:
        model = "tiny-tuned" if i % 2 else "tiny-base"
        return chat(client, model, QUESTIONS[i % 3], max_tokens=150, temperature=1.0, seed=i, response_format=fmt)

    with ThreadPoolExecutor(26) as pool:  # one continuous batch: 20 constrained rows, 6 free ones
        shaped = [pool.submit(constrained, i) for i in range(20)]
        plain = [pool.submit(chat, client, model, q, max_tokens=12) for model, q in free]
        answers = [f.result().choices[0] for f in shaped]
        assert [f.result().choices[0].message.content for f in plain] == solo
    for answer in answers:
        assert answer.finish_reason == "stop", answer.message.content
        jsonschema.validate(json.loads(answer.message.content), PERSON)
    assert len({a.message.content for a in answers}) > 10
    mode = chat(client, "tiny-base", "hi", max_tokens=300, temperature=0.5, response_format={"type": "json_object"})
    if mode.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(mode.choices[0].message.content), dict)
    assert mode.choices[0].message.content.startswith("{")


def test_32_concurrent_requests_are_batched_and_match_their_solo_answers(stack: Stack, served: dict[str, Any]) -> None:
    client = served["client"]
    prompts = [f"{q} ({i})" for i in range(11) for q in QUESTIONS][:32]
    models = ["tiny-tuned" if i % 2 else "tiny-base" for i in range(32)]  # mixed adapters in one batch

    def ask(i: int) -> str:
        return str(chat(client, models[i], prompts[i], max_tokens=12).choices[0].message.content)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    alone = [ask(i) for i in range(32)]
    assert together == alone
    with stack.http() as http:
        stats = http.get("/admin/stats", headers=stack.jwt_headers).json()
    histogram = {
        int(k): v for w in stats["workers"] for m in w["models"].values() for k, v in m["batch_size_histogram"].items()
    }
    assert max(histogram) > 1, histogram
    assert sum(v for k, v in histogram.items() if k >= 8) > 0, f"the 32 requests never met in a batch: {histogram}"
    model = next(iter(stats["workers"][0]["models"].values()))
    assert str(served["tuned"]["id"]) in model["loaded_adapters"] and model["generated_tokens"] > 0


def test_bad_input_gets_openai_errors(served: dict[str, Any]) -> None:
    client = served["client"]
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, "no-such-model", "hi")
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as zero:
        chat(client, "tiny-base", "hi", max_tokens=0)
    assert zero.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="tiny-base", messages=[])
    assert empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as long:
        chat(client, "tiny-base", "the cat likes a short story " * 600)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="tiny-base", prompt="hi", max_tokens=8, n=17)
    assert too_many.value.body["param"] == "n"
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="fts_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_deployment_status_and_retire(stack: Stack, served: dict[str, Any], tiny_model: Path) -> None:
    client = served["client"]
    with stack.http() as http:
        extra = http.post("/api/deployments/", json={"experiment_id": served["experiment"]["id"]}).json()
        assert extra["model"].startswith("served-")
        chat(client, extra["model"], "hello")
        status = wait_for(
            lambda: (s := http.get(f"/api/deployments/{extra['id']}/status").json())["loaded_on"] and s,
            timeout_s=20,
            what="the next heartbeat to show the adapter loaded",
        )
        assert status["status"] == "active" and status["workers_alive"] == 1 and len(status["loaded_on"]) == 1
        assert http.delete(f"/api/deployments/{extra['id']}").json()["status"] == "retired"
        with pytest.raises(openai.NotFoundError):
            chat(client, extra["model"], "hello")
        wait_for(
            lambda: not http.get(f"/api/deployments/{extra['id']}/status").json()["loaded_on"],
            timeout_s=20,
            what="workers to unload the retired adapter",
        )
        assert http.post("/api/deployments/", json={"experiment_id": served["dataset"]["id"]}).status_code == 404
        assert http.post("/api/deployments/", json={"name": "x"}).status_code == 422
        assert (
            http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "tiny-base"}).status_code == 409
        )
        unload = http.post(f"/admin/unload/{served['tuned']['id']}", headers=stack.jwt_headers)
        assert unload.status_code == 202
        assert http.post(f"/admin/unload/{served['tuned']['id']}").status_code == 403  # API keys are not platform admin
        wait_for(
            lambda: not http.get(f"/api/deployments/{served['tuned']['id']}/status").json()["loaded_on"],
            timeout_s=20,
            what="the admin unload",
        )
    assert "Paris" in chat(client, "tiny-tuned", QUESTIONS[0]).choices[0].message.content  # loads again on demand


def test_ab_test_compares_two_deployments_with_a_judge(stack: Stack, served: dict[str, Any]) -> None:
    with stack.http(timeout=300) as http:
        r = http.post(
            "/api/ab-testing/",
            json={
                "name": "tuned vs base",
                "deployment_a": served["tuned"]["id"],
                "deployment_b": served["base"]["id"],
                "judge_deployment": served["base"]["id"],
                "dataset_id": served["dataset"]["id"],
                "max_tokens": 12,
            },
        )
        assert r.status_code == 201, r.text
        bad = http.post(
            "/api/ab-testing/",
            json={
                "name": "x",
                "deployment_a": served["tuned"]["id"],
                "deployment_b": served["tuned"]["id"],
                "prompts": ["hi"],
            },
        )
        assert bad.status_code == 422 and bad.json()["field"] == "deployment_b"
        compared = http.post(f"/api/ab-testing/{r.json()['id']}/compare")
        assert compared.status_code == 200, compared.text
        results = compared.json()["results"]
        listed = http.get("/api/ab-testing/").json()
    assert r.json()["id"] in [t["id"] for t in listed["data"]]
    assert results["rows"] and all(row["a"]["text"] != row["b"]["text"] for row in results["rows"])
    assert all(row["a"]["latency_s"] > 0 and row["b"]["latency_s"] > 0 for row in results["rows"])
    # Trained on this distribution, the adapter's held-out loss is far below the random base model's.
    assert results["a"]["eval_loss"] < results["b"]["eval_loss"] and results["a"]["perplexity"] > 1
    # The judge is asked with the answers in both orders; a verdict that flips with the order is a tie.
    assert all(row["judge"] in ("a", "b", "tie", None) for row in results["rows"])
    judge = results["judge"]
    decided = len(results["rows"]) - judge["undecided"]
    assert judge["order_swapped"] and judge["ties"] == [row["judge"] for row in results["rows"]].count("tie")
    if decided:
        assert judge["win_rate_a"] + judge["win_rate_b"] + judge["ties"] / decided == pytest.approx(1.0)


LONG_CHOICES = 16


def long_stream(client: openai.OpenAI) -> Any:
    """A streamed answer that runs for seconds: 16 choices of 1900 tokens each, past any EOS (a batch of 16,
    so a fast engine still takes seconds: well past the time a cancel takes to arrive)."""
    return client.chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1900,
        n=LONG_CHOICES,
        stream=True,
        extra_body={"ignore_eos": True},
    )


def _engine_stats(stack: Stack) -> dict[str, Any]:
    with stack.http() as http:
        workers = http.get("/admin/stats", headers=stack.jwt_headers).json()["workers"]
    return next(iter(workers[0]["models"].values()))  # one base model: the tiny one


def test_a_client_that_goes_away_stops_its_generation(stack: Stack, served: dict[str, Any]) -> None:
    before = _engine_stats(stack)["generated_tokens"]
    stream = long_stream(served["client"])
    next(iter(stream))
    stream.close()
    wait_for(lambda: "cancelled by its client" in stack.log("inference"), timeout_s=30, what="the cancel")
    idle = wait_for(lambda: (s := _engine_stats(stack))["running"] == 0 and s, timeout_s=30, what="an idle engine")
    generated = idle["generated_tokens"] - before
    assert generated < 1900 * LONG_CHOICES, "the worker generated the whole answer for nobody"


def test_team_inflight_quota_answers_429(stack: Stack, served: dict[str, Any]) -> None:
    client = served["client"]
    with stack.http() as http:
        team = http.get("/api/users/me").json()["teams"][0]["id"]
        assert http.put(f"/api/teams/{team}/quota", json={"max_inflight_requests": 1}).status_code == 200
        try:
            stream = long_stream(client)
            next(iter(stream))
            with pytest.raises(openai.RateLimitError) as limited:
                chat(client, "tiny-base", "hi")
            assert "requests in flight" in limited.value.message
            stream.close()  # its slot comes back once the API sees the client leave

            def answered() -> bool:
                try:
                    return chat(client, "tiny-base", "hi").choices[0].message.content is not None
                except openai.RateLimitError:
                    return False

            wait_for(answered, timeout_s=30, interval=0.5, what="the slot to be released")
        finally:
            http.put(f"/api/teams/{team}/quota", json={})


def test_worker_crash_mid_request_is_an_error_not_a_hang(stack: Stack, served: dict[str, Any]) -> None:
    """Last in the module: it kills the inference worker (and starts a new one)."""
    client = served["client"]
    errors: list[BaseException] = []
    first_chunk = threading.Event()

    def consume() -> None:
        try:
            for _ in long_stream(client):
                first_chunk.set()
        except BaseException as exc:  # noqa: BLE001 - the point is to see it
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    assert first_chunk.wait(60)
    started = time.monotonic()
    stack.stop("inference", signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the client hung after the worker died"
    assert errors and isinstance(errors[0], openai.APIError), errors
    assert "lost" in str(errors[0])
    assert time.monotonic() - started < 30
    with pytest.raises(openai.APIStatusError) as non_stream:  # no worker at all: a request still ends
        client.with_options(timeout=120).chat.completions.create(
            model="tiny-base",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_headers={"X-Test": "no-worker"},
        )
    assert non_stream.value.status_code in (502, 503)
    stack.start_inference_worker()
    assert chat(client, "tiny-base", "hi").choices[0].message.content is not None


def test_cross_team_cannot_use_a_deployment(stack: Stack, served: dict[str, Any]) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.jwt_headers, timeout=60) as http:
        team = http.post("/api/teams/", json={"name": f"other-{time.time_ns()}"}).json()["id"]
        key = http.post(f"/api/teams/{team}/api-keys/", json={"name": "o", "role": "trainer"}).json()["key"]
    other = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in other.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        chat(other, "tiny-tuned", "hi")
