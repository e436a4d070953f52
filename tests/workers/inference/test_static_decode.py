"""The static decode path (KV slots, stacked LoRA, one fixed-shape step) against the dynamic path and HF.

Tolerances: float32 on CPU. Greedy tokens must be equal; log-probabilities agree within LOGPROB_ATOL (the
static step sums attention in another order than SDPA, ~1e-6 relative on these logits).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.workers.inference.test_engine import WAIT_S, chat_prompt, greedy, make_adapter
from workers.inference import AdapterMismatch, GenerationError, GenerationRequest, InferenceEngine
from workers.inference.adapters import AdapterCache
from workers.inference.runner import ModelRunner
from workers.inference.sampling import RowSampling
from workers.inference.static.decoder import StaticDecoder
from workers.inference.static.llama import unsupported_reason
from workers.inference.static.lora import LoraStacks
from workers.inference.static.slots import SlotBatch, SlotStore

LOGPROB_ATOL = 1e-4
GREEDY = RowSampling.create(0.0, 1.0, None)
TOP3 = RowSampling.create(0.0, 1.0, None, top=3)


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static-adapters")
    targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")]
    return {
        name: make_adapter(tiny_model, root / name, seed, tuple(target))
        for seed, (name, target) in enumerate(zip(["A", "B", "C"], targets, strict=True), start=1)
    }


def _requests(engine: InferenceEngine, adapters: dict[str, Path], count: int) -> list[GenerationRequest]:
    """Mixed adapters (and the base), prompts of different lengths, different max_tokens: rows leave mid-batch."""
    names = [None, "A", "B", "C"]
    out = []
    for i in range(count):
        name = names[i % 4]
        out.append(
            greedy(
                chat_prompt(engine, i) + [5 + j for j in range(i % 5)],
                4 + (i * 7) % 17,
                adapter=name,
                adapter_path=adapters[name] if name else None,
            )
        )
    return out


def test_every_row_equals_its_solo_answer_on_the_dynamic_path(tiny_model: Path, adapters: dict[str, Path]) -> None:
    with InferenceEngine(tiny_model, max_batch_size=8, max_adapters=3, decode="dynamic") as dynamic:
        requests = _requests(dynamic, adapters, 24)
        solo = [dynamic.generate(r, timeout=WAIT_S) for r in requests]

    with InferenceEngine(tiny_model, max_batch_size=8, max_adapters=3, decode="static") as static:
        assert static.info()["decode_path"] == "static"
        # Waves: a third submitted at once, the rest while those run (rows join a running batch and leave it
        # as they finish, so slots are refilled by moving rows).
        handles = [static.submit(r) for r in requests[:8]]
        handles[0].result(WAIT_S)
        handles += [static.submit(r) for r in requests[8:]]
        results = [h.result(WAIT_S) for h in handles]
        histogram = static.stats()["batch_size_histogram"]

    assert [r.token_ids for r in results] == [r.token_ids for r in solo]
    assert [r.text for r in results] == [r.text for r in solo]
    for mine, theirs in zip(results, solo, strict=True):
        torch.testing.assert_close(
            torch.tensor(mine.token_logprobs), torch.tensor(theirs.token_logprobs), atol=LOGPROB_ATOL, rtol=0
        )
    assert max(histogram) > 1 and len(histogram) > 2, histogram  # batched, and the batch size changed


@pytest.mark.parametrize("decode", ["dynamic", "static", "compiled"])
def test_logprobs_match_a_teacher_forced_forward(tiny_model: Path, adapters: dict[str, Path], decode: str) -> None:
    """The chosen tokens' log-probabilities and the top-4 alternatives of each step, against a peft forward."""
    with InferenceEngine(tiny_model, max_batch_size=4, decode=decode) as engine:  # type: ignore[arg-type]
        request = greedy(chat_prompt(engine, 3), 12, adapter="B", adapter_path=adapters["B"], top_logprobs=4)
        others = [engine.submit(greedy(chat_prompt(engine, i), 8)) for i in range(2)]  # rows without tops
        result = engine.generate(request, timeout=WAIT_S)
        assert all(h.result(WAIT_S).top_logprobs == () for h in others)
    from peft import PeftModel

    from tests.workers.inference.test_engine import load_base

    model = PeftModel.from_pretrained(load_base(tiny_model), str(adapters["B"])).eval()
    ids = torch.tensor([list(request.prompt_ids) + list(result.token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(request.prompt_ids) - 1
    reference = logits[start : start + len(result.token_ids)].log_softmax(-1)
    expected = reference.gather(-1, torch.tensor(result.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(result.token_logprobs), expected, atol=LOGPROB_ATOL, rtol=0)
    values, top_ids = reference.topk(4, dim=-1)
    assert [[token for token, _ in top] for top in result.top_logprobs] == top_ids.tolist()
    got = torch.tensor([[logprob for _, logprob in top] for top in result.top_logprobs])
    torch.testing.assert_close(got, values, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_sampled_rows_reproduce_the_dynamic_path_with_the_same_seed(tiny_model: Path, decode: str) -> None:
    """Compiled, several steps run per call: each step still takes its own draw from each row's generator."""

    def sampled(engine: InferenceEngine, seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=chat_prompt(engine, seed), max_tokens=10, temperature=0.9, top_p=0.9, seed=seed
        )

    with InferenceEngine(tiny_model, decode="dynamic") as dynamic:
        expected = [dynamic.generate(sampled(dynamic, s), timeout=WAIT_S).token_ids for s in range(4)]
    with InferenceEngine(tiny_model, decode=decode) as static:  # type: ignore[arg-type]
        handles = [static.submit(sampled(static, s)) for s in range(4)]
        handles += [static.submit(greedy(chat_prompt(static, 9), 10))]  # a greedy row in the same batch
        got = [h.result(WAIT_S).token_ids for h in handles[:4]]
    assert got == expected


def _record_decode_calls(engine: InferenceEngine) -> list[int]:
    """The steps asked of each multi-step decode call of `engine`'s static decoder, appended as they happen."""
    calls: list[int] = []
    decoder = engine._scheduler._runner
    original = decoder.decode_steps  # type: ignore[attr-defined]

    def recording(*args: Any) -> Any:
        calls.append(args[-1])
        return original(*args)

    decoder.decode_steps = recording  # type: ignore[attr-defined]
    return calls


def test_compiled_path_decodes_several_steps_per_call_and_ends_rows_where_they_end(tiny_model: Path) -> None:
    """The compiled path runs a few steps per call; a row that meets a stop string, EOS or its max_tokens
    inside a call ends exactly there (same text, tokens and finish reason as the dynamic path), and its stream
    adds up to its text."""
    with InferenceEngine(tiny_model, decode="dynamic") as dynamic:
        free = dynamic.generate(greedy(chat_prompt(dynamic, 5), 24), timeout=WAIT_S)
        stop = free.text[len(free.text) // 2 :][:3]  # ends a row in the middle of the run
        assert stop.strip(), free.text
        requests = [
            greedy(chat_prompt(dynamic, 5), 24, stop=[stop]),
            greedy(chat_prompt(dynamic, 6), 7),  # a max_tokens that is not a multiple of the chunk
            greedy(chat_prompt(dynamic, 7), 30),
        ]
        expected = [dynamic.generate(r, timeout=WAIT_S) for r in requests]
    assert expected[0].finish_reason == "stop"
    with InferenceEngine(tiny_model, decode="compiled") as compiled:
        before = compiled.stats()["decode_steps"]
        calls = _record_decode_calls(compiled)
        handles = [compiled.submit(r) for r in requests]
        streamed = ["".join(handles[0])]
        got = [h.result(WAIT_S) for h in handles]
        steps = compiled.stats()["decode_steps"] - before
    assert max(calls) > 1 and steps > len(calls)  # several steps per call
    for ours, theirs in zip(got, expected, strict=True):
        assert (ours.text, ours.token_ids, ours.finish_reason) == (theirs.text, theirs.token_ids, theirs.finish_reason)
    assert streamed == [got[0].text]


def test_a_request_waiting_for_an_adapter_slot_does_not_stop_multi_step_decode(
    tiny_model: Path, adapters: dict[str, Path]
) -> None:
    """A newly arrived request makes the next call decode one step (its first token comes sooner), but one put
    back to wait for an adapter slot (here: the only slot is in use) may wait a whole generation: the running
    rows keep decoding several steps per call meanwhile."""
    with InferenceEngine(tiny_model, max_adapters=1, decode="compiled") as engine:
        calls = _record_decode_calls(engine)
        prompt = chat_prompt(engine, 2)
        running = engine.submit(greedy(prompt, 60, adapter="A", adapter_path=adapters["A"], ignore_eos=True))
        deadline = time.monotonic() + WAIT_S
        while not calls and time.monotonic() < deadline:  # A is decoding
            time.sleep(0.005)
        waiting = engine.submit(greedy(prompt, 4, adapter="B", adapter_path=adapters["B"]))
        assert running.result(WAIT_S).completion_tokens == 60
        waited = len(calls)
        assert waiting.result(WAIT_S).completion_tokens == 4
    assert waited >= 2 and sum(calls[:waited]) > waited  # several steps per call while B waited
    assert max(calls[1:waited]) > 1


# ----------------------------------------------------------------------------------------- model families


def _family(kind: str, tie: bool) -> PreTrainedModel:
    common: dict[str, Any] = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }
    torch.manual_seed(7)
    model: PreTrainedModel
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                **common,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 4.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        )
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=6))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=1))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize(("kind", "tie"), [("llama", False), ("mistral", True), ("qwen2", False), ("qwen3", True)])
def test_llama_family_shapes_decode_like_transformers(kind: str, tie: bool) -> None:
    """GQA, llama3 RoPE scaling, sliding windows (all layers / some layers), q/k norms, biases, tied heads."""
    model = _family(kind, tie)
    assert unsupported_reason(model) is None
    cache = AdapterCache(model, 1, device=torch.device("cpu"))
    runner = ModelRunner(cache, device=torch.device("cpu"), pad_id=0, logits_to_keep=True)
    decoder = StaticDecoder(runner, model, max_batch_size=4, max_len=64, compiled=False)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24]]
    steps = 20  # past the 6-token window
    with torch.inference_mode():
        rows = [GREEDY, TOP3, GREEDY]
        first, batch = decoder.prefill(prompts, ["__base__"] * 3, rows)
        generated = [[t] for t in first.tokens]
        logprobs = [[lp] for lp in first.logprobs]
        tops = [[top] for top in first.tops]
        positions = [len(p) for p in prompts]
        for _ in range(steps):
            step = decoder.decode(batch, [g[-1] for g in generated], positions, ["__base__"] * 3, rows)
            for row in range(3):
                generated[row].append(step.tokens[row])
                logprobs[row].append(step.logprobs[row])
                tops[row].append(step.tops[row])
            positions = [p + 1 for p in positions]
        for prompt, tokens, row_logprobs, row_tops, row in zip(prompts, generated, logprobs, tops, rows, strict=True):
            ids = torch.tensor([prompt + tokens])
            reference = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            assert tokens == reference.argmax(-1).tolist()
            expected = reference.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(row_logprobs), expected, atol=LOGPROB_ATOL, rtol=0)
            if row.top:
                values, top_ids = reference.topk(row.top, dim=-1)
                assert [[token for token, _ in top] for top in row_tops] == top_ids.tolist()
                got = torch.tensor([[lp for _, lp in top] for top in row_tops])
                torch.testing.assert_close(got, values, atol=LOGPROB_ATOL, rtol=0)
            else:
                assert row_tops == [[]] * len(tokens)


def test_other_architectures_fall_back_to_the_dynamic_path_with_a_reason(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert "gpt2" in (unsupported_reason(gpt2) or "")
    gpt2.save_pretrained(tmp_path / "gpt2")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "gpt2")
    with caplog.at_level(logging.WARNING), InferenceEngine(tmp_path / "gpt2", decode="static") as engine:
        assert engine.info()["decode_path"] == "dynamic"
        assert engine.generate(greedy([5, 6, 7], 3), timeout=WAIT_S).completion_tokens == 3
    assert "using the dynamic path" in caplog.text and "gpt2" in caplog.text


# --------------------------------------------------------------------------------------- pieces and failures


def test_stacked_lora_delta_equals_peft_per_row() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.q_proj = torch.nn.Linear(16, 12, bias=False)
            self.mlp = torch.nn.Module()

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers[0].self_attn.q_proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Stack(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    layers = list(model.base_model.model.layers)
    stacks = LoraStacks(3, device=torch.device("cpu"), dtype=torch.float32)
    stacks.sync(layers, ["default", "b"])
    names = ["default", "__base__", "b", "default", "b"]
    ids = torch.tensor(stacks.slot_ids(names, "__base__"))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x[:, None, :], adapter_names=names)[:, 0]
        base = layers[0].self_attn.q_proj.base_layer(x)
        got = base + stacks.delta(0, "q_proj", x, stacks.row_mask(ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    stacks.sync(layers, ["b"])  # "default" unloaded: its slot is cleared, "b" keeps its own
    with torch.no_grad():
        only_b = base + stacks.delta(0, "q_proj", x, stacks.row_mask(torch.tensor(stacks.slot_ids(["b"] * 5, "_"))))
        expected_b = model(x[:, None, :], adapter_names=["b"] * 5)[:, 0]
    torch.testing.assert_close(only_b, expected_b, atol=1e-5, rtol=0)


def test_finished_rows_are_refilled_by_moving_the_last_rows() -> None:
    store = SlotStore(
        layers=1, rows=6, kv_heads=1, max_len=4, head_dim=2, dtype=torch.float32, device=torch.device("cpu")
    )
    batch = SlotBatch(store, 0, 5)
    for row in range(5):
        store.write_prefill(row, torch.full((1, 1, 3, 2), float(row)), torch.full((1, 1, 3, 2), -float(row)))
    storage = store.keys[0].data_ptr()
    order = batch.select([0, 2, 4])  # rows 1 and 3 finished
    assert order == [0, 4, 2]  # row 4 moved into the hole at 1; row 2 stayed
    assert batch.size == 3 and store.keys[0].data_ptr() == storage
    assert [float(store.keys[0][row, 0, 0, 0]) for row in range(3)] == [0.0, 4.0, 2.0]
    assert float(store.values[0][1, 0, 2, 1]) == -4.0
    with pytest.raises(ValueError):
        batch.merge(SlotBatch(store, 4, 1))  # not the rows right after the batch


def test_a_failing_step_fails_its_batch_and_the_engine_goes_on(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with InferenceEngine(tiny_model, max_batch_size=4, decode="static") as engine:
        decoder = engine._scheduler._runner
        assert isinstance(decoder, StaticDecoder)
        original = decoder._step
        calls = {"n": 0}

        def flaky(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return original(*args, **kwargs)

        monkeypatch.setattr(decoder, "_step", flaky)
        doomed = [engine.submit(greedy(chat_prompt(engine, i), 6)) for i in range(3)]
        for handle in doomed:
            with pytest.raises(GenerationError):
                handle.result(WAIT_S)
        after = engine.generate(greedy(chat_prompt(engine, 0), 6), timeout=WAIT_S)
    with InferenceEngine(tiny_model, decode="dynamic") as reference:
        assert after.token_ids == reference.generate(greedy(chat_prompt(reference, 0), 6), timeout=WAIT_S).token_ids


def test_an_adapter_on_the_output_head_is_refused_on_the_static_path(tiny_model: Path, tmp_path: Path) -> None:
    head = make_adapter(tiny_model, tmp_path / "head", 5, ("q_proj", "lm_head"))
    with InferenceEngine(tiny_model, decode="static") as engine:
        with pytest.raises(AdapterMismatch, match="lm_head"):
            engine.load_adapter("head", head)
        assert engine.stats()["loaded_adapters"] == []
        assert engine.generate(greedy([5, 6], 2), timeout=WAIT_S).completion_tokens == 2
    with InferenceEngine(tiny_model, decode="dynamic") as engine:
        engine.load_adapter("head", head)  # the dynamic path serves it


def test_compiled_step_has_no_graph_break_and_matches_eager(tiny_model: Path, adapters: dict[str, Path]) -> None:
    """torch.compile(fullgraph=True) with inductor on CPU: a graph break would raise here. The warm-up compiles
    the graphs every later step uses: batches and lengths it never saw (the step runs at exact sizes on CPU)
    compile nothing more once the LoRA stacks have their shape (on CPU they grow with the adapters loaded)."""
    with InferenceEngine(tiny_model, max_batch_size=4, max_adapters=3, decode="compiled") as compiled:
        assert compiled.info()["decode_path"] == "compiled"
        requests = _requests(compiled, adapters, 6)
        for name, path in adapters.items():
            compiled.generate(greedy(chat_prompt(compiled, 0), 2, adapter=name, adapter_path=path), timeout=WAIT_S)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        got = [h.result(WAIT_S) for h in [compiled.submit(r) for r in requests]]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    with InferenceEngine(tiny_model, max_batch_size=4, max_adapters=3, decode="dynamic") as dynamic:
        expected = [dynamic.generate(r, timeout=WAIT_S) for r in requests]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_compiled_engine_serves_every_option_as_the_lora_stacks_grow(
    tiny_model: Path, adapters: dict[str, Path]
) -> None:
    """Each mix of step options (greedy or sampled, top alternatives, penalties) is a graph, and each shape the
    LoRA stacks grow to (A adapts q/v, B adds k/o, C the MLP) is another set: with the warm-up's, more graphs
    than Dynamo's default limit of 8, past which fullgraph=True would fail the requests."""
    with InferenceEngine(tiny_model, max_batch_size=4, max_adapters=3, decode="compiled") as engine:
        prompt = chat_prompt(engine, 1)
        for name in [None, "A", "B", "C"]:
            options: list[dict[str, Any]] = [
                {"temperature": 0.0},
                {"temperature": 0.8, "seed": 3, "top_logprobs": 2, "presence_penalty": 1.0},
            ]
            for option in options:
                request = GenerationRequest(
                    prompt_ids=prompt,
                    max_tokens=3,
                    adapter=name,
                    adapter_path=adapters[name] if name else None,
                    **option,
                )
                assert engine.generate(request, timeout=WAIT_S).completion_tokens == 3


# ------------------------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("decode", ["dynamic", "static", "compiled"])
def test_presence_and_frequency_penalties_apply_as_openai_defines_them(tiny_model: Path, decode: str) -> None:
    """Each chosen token is the argmax of `logit - frequency * count - presence * (count > 0)` over the tokens
    generated before it (checked against a teacher-forced forward); logprobs stay the model's own. Plain rows
    batched with it are unchanged, and a penalized row admitted after plain rows starts from zero counts."""
    from tests.workers.inference.test_engine import load_base

    presence, frequency = 1.5, 0.75
    with InferenceEngine(tiny_model, max_batch_size=4, decode=decode) as engine:  # type: ignore[arg-type]
        prompt = chat_prompt(engine, 2)
        plain_request = greedy(prompt, 40, ignore_eos=True)
        plain_alone = engine.generate(plain_request, timeout=WAIT_S)
        running = [engine.submit(greedy(chat_prompt(engine, i), 30, ignore_eos=True)) for i in range(2)]
        penalized = engine.generate(
            GenerationRequest(
                prompt_ids=prompt,
                max_tokens=40,
                temperature=0.0,
                ignore_eos=True,
                presence_penalty=presence,
                frequency_penalty=frequency,
            ),
            timeout=WAIT_S,
        )
        plain_again = engine.submit(plain_request)
        assert plain_again.result(WAIT_S).token_ids == plain_alone.token_ids
        [h.result(WAIT_S) for h in running]
        with pytest.raises(ValueError, match="presence_penalty"):
            engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=2, presence_penalty=2.5))

    assert penalized.token_ids != plain_alone.token_ids
    model = load_base(tiny_model)
    ids = torch.tensor([prompt + list(penalized.token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    counts = torch.zeros(logits.shape[-1])
    for step, token in enumerate(penalized.token_ids):
        adjusted = logits[step] - frequency * counts - presence * (counts > 0).float()
        assert int(adjusted.argmax()) == token, f"step {step}"
        expected = float(logits[step].log_softmax(-1)[token])
        assert abs(penalized.token_logprobs[step] - expected) < LOGPROB_ATOL
        counts[token] += 1


@pytest.mark.parametrize("decode", ["dynamic", "static", "compiled"])
def test_logit_bias_bans_and_forces_tokens_per_row(tiny_model: Path, decode: str) -> None:
    """-100 on a token means it never appears; +100 makes it the only choice; rows without a bias (even in a
    slot a biased request used before) answer as they do alone; an id outside the vocabulary is refused."""
    with InferenceEngine(tiny_model, max_batch_size=4, decode=decode) as engine:  # type: ignore[arg-type]
        prompt = chat_prompt(engine, 4)
        plain = engine.generate(greedy(prompt, 16, ignore_eos=True), timeout=WAIT_S)
        banned = set(plain.token_ids)
        forced_token = 77 if 77 not in banned else 78

        def biased(bias: dict[int, float]) -> GenerationRequest:
            return greedy(prompt, 16, ignore_eos=True, logit_bias=bias)

        first = engine.generate(biased({forced_token: 100.0}), timeout=WAIT_S)
        handles = [
            engine.submit(biased({token: -100.0 for token in banned})),
            engine.submit(greedy(prompt, 16, ignore_eos=True)),  # may take the slot the forced request used
            engine.submit(biased({forced_token: 100.0})),
        ]
        without, again, forced = (h.result(WAIT_S) for h in handles)
        with pytest.raises(ValueError, match="logit_bias"):
            engine.submit(biased({10**6: 1.0}))

    assert set(first.token_ids) == set(forced.token_ids) == {forced_token}
    assert not banned & set(without.token_ids)
    assert again.token_ids == plain.token_ids
