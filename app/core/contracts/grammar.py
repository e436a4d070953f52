"""Grammars for constrained decoding, as llguidance takes them: built where a request is validated (the API,
so a schema llguidance cannot enforce is a 400 there) and enforced by the inference worker
(`workers.inference.constraints`). llguidance is imported only when a grammar is built."""

from __future__ import annotations

from typing import Any


class GrammarError(ValueError):
    """The grammar (or JSON schema) cannot be enforced; the request is refused before it runs."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of a JSON schema ({"type": "object"} is OpenAI's JSON mode), in compact JSON (no free
    whitespace, which a model could otherwise repeat until max_tokens); GrammarError names the problem."""
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError("; ".join(messages) or "the schema cannot be enforced")
    return str(grammar)
