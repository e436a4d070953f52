"""Tool calls parsed out of an answer: Hermes-style tags and bare JSON, only for functions that were offered."""

from __future__ import annotations

import json

from workers.serving.tool_calls import parse_tool_calls

KNOWN = {"get_weather", "get_time"}


def test_hermes_blocks_with_text_around_them() -> None:
    text = (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = parse_tool_calls(text, KNOWN)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["type"] == "function"


def test_bare_json_calls_and_llama_parameters() -> None:
    content, calls = parse_tool_calls('{"name": "get_time", "parameters": {"tz": "UTC"}}', KNOWN)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}
    content, calls = parse_tool_calls('[{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}]', KNOWN)
    assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "CET"}


def test_anything_else_stays_content() -> None:
    for text in (
        "It is sunny.",
        '{"name": "rm_rf", "arguments": {}}',  # not an offered function
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',  # arguments not an object
        "<tool_call>not json</tool_call>",
        '{"city": "Oslo"}',
    ):
        assert parse_tool_calls(text, KNOWN) == (text, [])
