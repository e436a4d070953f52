"""Constrained decoding (llguidance): sampled answers follow their JSON schema on both decode paths, in one
continuous batch with unconstrained rows and mixed adapters whose answers stay their solo answers."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from app.core.contracts.grammar import GrammarError, json_schema_grammar
from tests.workers.inference.test_engine import WAIT_S, chat_prompt, greedy, make_adapter, run_concurrently
from workers.inference import GenerationRequest, InferenceEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("constrained") / "A", seed=5)


@pytest.mark.parametrize("decode", ["static", "dynamic"])
def test_sampled_answers_follow_the_schema_beside_free_rows(tiny_model: Path, adapter: Path, decode: str) -> None:
    grammar = json_schema_grammar(SCHEMA)
    with InferenceEngine(tiny_model, max_batch_size=32, max_adapters=2, decode=decode) as engine:  # type: ignore[arg-type]
        engine.load_adapter("A", adapter)
        free = [greedy(chat_prompt(engine, i), max_tokens=12, adapter="A" if i % 2 else None) for i in range(8)]
        solo = [engine.generate(r, timeout=WAIT_S).text for r in free]
        constrained = [
            GenerationRequest(
                prompt_ids=chat_prompt(engine, i),
                max_tokens=120,
                temperature=1.0,
                seed=i,
                grammar=grammar,
                adapter="A" if i % 3 == 0 else None,
            )
            for i in range(20)
        ]
        results = run_concurrently(engine, [*constrained, *free])
    answers = results[: len(constrained)]
    for result in answers:
        assert result.finish_reason == "stop", result  # the grammar completed, not cut by max_tokens
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert len({r.text for r in answers}) > 10, "sampling at temperature 1 should give varied answers"
    assert [r.text for r in results[len(constrained) :]] == solo  # free rows are untouched by their neighbours


def test_json_mode_and_bad_schemas(tiny_model: Path) -> None:
    with InferenceEngine(tiny_model, max_batch_size=4, decode="static") as engine:
        json_mode = json_schema_grammar({"type": "object"})
        requests = [
            GenerationRequest(
                prompt_ids=chat_prompt(engine, i), max_tokens=300, temperature=0.7, seed=i, grammar=json_mode
            )
            for i in range(6)
        ]
        results = run_concurrently(engine, requests)
        finished = [r for r in results if r.finish_reason == "stop"]
        assert finished, [r.text for r in results]
        for result in finished:
            assert isinstance(json.loads(result.text), dict)
        for result in results:  # one cut by max_tokens is still a prefix of a JSON object
            assert result.text.startswith("{")
        with pytest.raises(ValueError):
            engine.submit(GenerationRequest(prompt_ids=[1, 2], grammar='{"grammars": [{"nope": 1}]}'))
    with pytest.raises(GrammarError, match="objectx"):
        json_schema_grammar({"type": "objectx"})
