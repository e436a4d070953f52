"""Tool calling through /v1/chat/completions with the official client, on a real inference worker: a model
whose chat template renders tools gets them, its calls come back as `tool_calls` (enforced by constrained
decoding when a call is required), and the tool results go back in; a model whose template has no place for
tools is a 400 naming `tools`, never a silent answer without them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.e2e.stack import Stack
from workers.training.tiny_model import TOOL_CHAT_TEMPLATE, build_tiny_model

pytestmark = pytest.mark.e2e
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(stack: Stack, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    stack.start_inference_worker()
    tools_model = build_tiny_model(tmp_path_factory.mktemp("tools") / "tiny-tools", chat_template=TOOL_CHAT_TEMPLATE)
    with stack.http() as http:
        for name, path in (("tools-model", tools_model), ("no-tools-model", tiny_model)):
            r = http.post("/api/deployments/", json={"base_model": str(path), "name": name})
            assert r.status_code == 201, r.text
    key = stack.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_required_call_comes_back_as_tool_calls_and_its_result_goes_back_in(client: openai.OpenAI) -> None:
    for seed in range(3):
        answer = client.chat.completions.create(
            model="tools-model", messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in {"get_weather", "get_time"}
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    named = client.chat.completions.create(
        model="tools-model",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        seed=9,
    )
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    follow_up = [
        *QUESTION,
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    after = client.chat.completions.create(model="tools-model", messages=follow_up, tools=TOOLS, max_tokens=8)
    assert after.usage and named.usage
    assert after.usage.prompt_tokens > named.usage.prompt_tokens  # the call and its result were rendered


def test_auto_lets_the_model_answer_in_text(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tools-model", messages=QUESTION, tools=TOOLS, max_tokens=12, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls  # a random model rarely calls
    assert isinstance(choice.message.content, str)


def test_a_template_without_tools_is_a_400_naming_tools(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="no-tools-model", messages=QUESTION, tools=TOOLS, max_tokens=4)
    assert caught.value.param == "tools" and "chat template" in caught.value.message
    plain = client.chat.completions.create(model="no-tools-model", messages=QUESTION, max_tokens=4)
    assert plain.choices[0].message.content is not None
