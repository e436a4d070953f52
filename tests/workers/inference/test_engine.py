"""The batched generation engine on the tiny random Llama, on CPU: batching must never change a request's output.

Every wait has a timeout, so a bug that leaves a handle unresolved fails a test instead of hanging it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from workers.inference import (
    AdapterCapacityFull,
    AdapterError,
    AdapterInUse,
    AdapterMismatch,
    EngineClosed,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
    PromptTooLong,
    ScoreResult,
    StepInfo,
)
from workers.inference.adapters import AdapterCache
from workers.inference.kv import PaddedKV
from workers.inference.text import IncrementalDecoder, StopMatcher
from workers.training.tiny_model import _ANSWERS, _QUESTIONS, build_tiny_model

WAIT_S = 60.0


# ------------------------------------------------------------------------------------------------------- helpers


def chat_prompt(engine: InferenceEngine, i: int) -> list[int]:
    question = _QUESTIONS[i % len(_QUESTIONS)]
    return engine.encode_chat([{"role": "user", "content": f"{question} ({i})"}])


def greedy(prompt: list[int], max_tokens: int = 10, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.0, **kwargs)


def run_concurrently(engine: InferenceEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Submit every request from its own thread, all released at once, and wait for all results."""
    barrier = threading.Barrier(len(requests))

    def one(request: GenerationRequest) -> GenerationResult:
        barrier.wait(timeout=WAIT_S)
        return engine.generate(request, timeout=WAIT_S)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def load_base(path: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    return model.eval()


def make_adapter(base_path: Path, out: Path, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter without training: random lora_B (peft initialises it to zero, i.e. a no-op adapter).
    Seeded whole (peft draws lora_A from the global generator), so an adapter is the same in every run."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_path), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(str(out))
    return out


class FlakyForward:
    """Wraps a model's forward; `on_call(n, output)` may raise or edit the output of the n-th call (from 1).

    Tests using it run the engine with `decode="dynamic"`: the static path's decode steps do not call the
    Hugging Face forward (its own failure handling is tested in test_static_decode.py)."""

    def __init__(self, model: torch.nn.Module, on_call: Callable[[int, Any], None]) -> None:
        self.original = model.forward
        self.on_call = on_call
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        output = self.original(*args, **kwargs)  # the cache is updated before a raise: like a mid-forward crash
        self.on_call(self.calls, output)
        return output


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model, root / name, seed) for seed, name in enumerate(["A", "B", "C"], start=1)}


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[InferenceEngine]:
    """A shared engine for tests that do not depend on its counters or adapter slots."""
    with InferenceEngine(tiny_model, max_batch_size=16, max_adapters=4) as shared:
        yield shared


# ------------------------------------------------------------------------------------------- (a) batching parity


def test_concurrent_greedy_requests_match_running_alone_and_hf_generate(tiny_model: Path) -> None:
    with InferenceEngine(tiny_model, max_batch_size=16) as engine:
        prompts = [chat_prompt(engine, i) for i in range(32)]
        alone = [engine.generate(greedy(p, 12), timeout=WAIT_S) for p in prompts]
        assert set(engine.stats()["batch_size_histogram"]) == {1}

        together = run_concurrently(engine, [greedy(p, 12) for p in prompts])

        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.text for r in together] == [r.text for r in alone]
        stats = engine.stats()
        histogram = stats["batch_size_histogram"]
        assert any(size > 1 for size in histogram), histogram
        assert max(histogram) <= 16
        assert stats["generated_tokens"] == sum(r.completion_tokens for r in alone + together)
        assert stats["tokens_per_second"] > 0
        assert (stats["running"], stats["waiting"], stats["finished_requests"]) == (0, 0, 64)

    hf_model: Any = load_base(tiny_model)  # transformers' `generate` typing confuses mypy
    for i in (0, 13, 31):
        with torch.inference_mode():
            output = hf_model.generate(torch.tensor([prompts[i]]), max_new_tokens=12, do_sample=False)
        hf_ids = output[0, len(prompts[i]) :].tolist()
        assert list(alone[i].token_ids) == hf_ids
        assert alone[i].text == engine.tokenizer.decode(hf_ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------ (b) joining a batch mid-decode


def test_new_request_joins_the_running_batch(tiny_model: Path) -> None:
    steps: list[StepInfo] = []
    paused, resume = threading.Event(), threading.Event()

    def on_step(info: StepInfo) -> None:
        steps.append(info)
        if info.request_ids == ("long",) and len(steps) == 3:
            paused.set()  # the long request is mid-decode: hold the loop until the short one is queued
            resume.wait(WAIT_S)

    with InferenceEngine(tiny_model, max_batch_size=8, on_step=on_step) as engine:
        prompt = chat_prompt(engine, 1)
        assert engine.generate(greedy(prompt, 30), timeout=WAIT_S).finish_reason == "length"  # no early EOS
        steps.clear()

        long = engine.submit(greedy(prompt, 30, request_id="long"))
        assert paused.wait(WAIT_S)
        short = engine.submit(greedy(chat_prompt(engine, 2), 3, request_id="short"))
        stats = engine.stats()
        assert (stats["running"], stats["waiting"]) == (1, 1)
        resume.set()

        short_result, long_result = short.result(WAIT_S), long.result(WAIT_S)

    admitted_at = next(i for i, s in enumerate(steps) if "short" in s.admitted)
    assert admitted_at == 3  # the very next iteration after it was queued, not after the long one finished
    shared = [s for s in steps if set(s.request_ids) == {"long", "short"}]
    assert len(shared) == short_result.completion_tokens - 1  # its first token came from the prefill
    assert steps[-1].request_ids == ("long",)  # and it left while the long one kept going
    assert (long_result.completion_tokens, short_result.completion_tokens) == (30, 3)
    assert engine.stats()["batch_size_histogram"].get(2) == len(shared)


# --------------------------------------------------------------------------------- (c) mixed-adapter batches


def test_mixed_adapter_batch_gives_each_row_its_own_output(tiny_model: Path, adapters: dict[str, Path]) -> None:
    rows_by_step: list[set[str | None]] = []
    adapter_of: dict[str, str | None] = {}

    def on_step(info: StepInfo) -> None:
        rows_by_step.append({adapter_of[r] for r in info.request_ids})

    with InferenceEngine(tiny_model, max_batch_size=32, max_adapters=2, on_step=on_step) as engine:

        def request(i: int, adapter: str | None) -> GenerationRequest:
            request_id = f"{i}-{adapter}"
            adapter_of[request_id] = adapter
            path = adapters[adapter] if adapter else None
            return greedy(chat_prompt(engine, i), 10, adapter=adapter, adapter_path=path, request_id=request_id)

        cases = [(i, adapter) for i in range(8) for adapter in (None, "A", "B")]
        alone = {case: engine.generate(request(*case), timeout=WAIT_S) for case in cases}
        together = dict(zip(cases, run_concurrently(engine, [request(*case) for case in cases]), strict=True))
        assert sorted(engine.stats()["loaded_adapters"]) == ["A", "B"]

    assert {case: r.token_ids for case, r in together.items()} == {case: r.token_ids for case, r in alone.items()}
    assert any(rows == {None, "A", "B"} for rows in rows_by_step)  # one forward really mixed all three
    for i in range(8):
        base, a, b = (alone[(i, adapter)].token_ids for adapter in (None, "A", "B"))
        assert base != a and base != b and a != b


# ------------------------------------------------------------------- (d) stop strings, length, EOS, seeds, usage


def test_stop_string_truncates_the_text_and_the_stream(engine: InferenceEngine) -> None:
    for i in range(16):
        prompt = chat_prompt(engine, i)
        full = engine.generate(greedy(prompt, 16), timeout=WAIT_S)
        stop = full.text[4:7]
        if len(full.text) >= 10 and "\ufffd" not in stop and full.text.find(stop) >= 1:
            break
    else:
        pytest.fail("no greedy output long enough to cut with a stop string")
    expected = full.text[: full.text.find(stop)]

    handle = engine.submit(greedy(prompt, 16, stop=[stop, "never-generated"]))
    deltas = list(handle.stream(timeout=WAIT_S))
    result = handle.result(WAIT_S)

    assert (result.text, result.finish_reason) == (expected, "stop")
    assert "".join(deltas) == expected
    # Usage counts the token that completed the stop string, and nothing after it.
    decode = engine.tokenizer.decode
    needed = next(n for n in range(1, 17) if stop in decode(full.token_ids[:n], skip_special_tokens=True))
    assert result.completion_tokens == needed
    assert result.token_ids == full.token_ids[:needed]
    assert result.prompt_tokens == len(prompt)


def test_max_tokens_finishes_with_length_and_counts_usage(engine: InferenceEngine) -> None:
    prompt = chat_prompt(engine, 3)
    handle = engine.submit(greedy(prompt, 5))
    deltas = list(handle.stream(timeout=WAIT_S))
    result = handle.result(WAIT_S)
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens, len(result.token_ids)) == (len(prompt), 5, 5)
    assert "".join(deltas) == result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_eos_finishes_with_stop(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with InferenceEngine(tiny_model, decode="dynamic") as engine:
        eos = engine.tokenizer.eos_token_id

        def force_eos_on_third_token(call: int, output: Any) -> None:
            if call == 3:  # call 1 is the prefill (token 1), calls 2.. are decode steps
                output.logits[:, -1, eos] = 1e4

        monkeypatch.setattr(engine.model, "forward", FlakyForward(engine.model, force_eos_on_third_token))
        result = engine.generate(greedy(chat_prompt(engine, 0), 10), timeout=WAIT_S)

    assert (result.finish_reason, result.completion_tokens, result.token_ids[-1]) == ("stop", 3, eos)
    assert result.text == engine.tokenizer.decode(result.token_ids[:2], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: InferenceEngine) -> None:
    prompt = chat_prompt(engine, 5)

    def sampled(seed: int, top_p: float = 1.0) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompt, max_tokens=12, temperature=1.0, top_p=top_p, seed=seed)

    alone = engine.generate(sampled(123), timeout=WAIT_S)
    others = [sampled(seed) for seed in range(7)] + [greedy(chat_prompt(engine, i), 12) for i in range(8)]
    batched = run_concurrently(engine, [sampled(123), *others])

    assert batched[0].token_ids == alone.token_ids
    assert batched[0].text == alone.text
    assert engine.generate(sampled(124), timeout=WAIT_S).token_ids != alone.token_ids
    # A nucleus this small holds only the most likely token: sampling collapses to greedy.
    nucleus = engine.generate(sampled(7, top_p=1e-6), timeout=WAIT_S)
    assert nucleus.token_ids == engine.generate(greedy(prompt, 12), timeout=WAIT_S).token_ids


# --------------------------------------------------------------------------------------- (e) argument checks


def test_prompt_too_long_and_bad_arguments_fail_at_submit(engine: InferenceEngine) -> None:
    context = engine.max_context
    assert context == 2048
    with pytest.raises(PromptTooLong, match="context is 2048"):
        engine.submit(GenerationRequest(prompt_ids=[5] * (context - 4), max_tokens=8))
    with pytest.raises(PromptTooLong):
        engine.submit(GenerationRequest(prompt_ids=[5] * context))  # max_tokens=None still needs one token
    assert issubclass(PromptTooLong, ValueError)
    fits = engine.generate(GenerationRequest(prompt_ids=[5] * (context - 2), max_tokens=2), timeout=WAIT_S)
    assert fits.completion_tokens <= 2

    bad_arguments: list[dict[str, Any]] = [
        {"prompt_ids": []},
        {"prompt_ids": [10_000]},
        {"prompt_ids": [5], "temperature": -1.0},
        {"prompt_ids": [5], "top_p": 0.0},
        {"prompt_ids": [5], "max_tokens": 0},
        {"prompt_ids": [5], "stop": [""]},
        {"prompt_ids": [5], "adapter": "__base__"},
        {"prompt_ids": [5], "adapter": "never-loaded"},
    ]
    for bad in bad_arguments:
        with pytest.raises(ValueError):
            engine.submit(GenerationRequest(**bad))


# ---------------------------------------------------------------------------------------- (f) failures, close


def test_forward_errors_fail_the_affected_requests_and_the_engine_recovers(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with InferenceEngine(tiny_model, decode="dynamic", max_batch_size=8) as engine:
        fail_on: set[int] = {2}  # call 1: prefill, call 2: first decode step

        def boom(call: int, output: Any) -> None:
            if call in fail_on:
                raise RuntimeError("boom")

        flaky = FlakyForward(engine.model, boom)
        monkeypatch.setattr(engine.model, "forward", flaky)
        handle = engine.submit(greedy(chat_prompt(engine, 0), 10))
        with pytest.raises(GenerationError) as caught:
            handle.result(WAIT_S)
        assert isinstance(caught.value.__cause__, RuntimeError)
        with pytest.raises(GenerationError):
            list(handle.stream(timeout=WAIT_S))  # a streaming caller gets the error too

        # Under load: one failing forward (prefill or decode) fails its rows; every handle still resolves.
        fail_on.clear()
        fail_on.add(flaky.calls + 4)
        handles = [engine.submit(greedy(chat_prompt(engine, i), 10)) for i in range(12)]
        outcomes: list[GenerationResult | GenerationError] = []
        for h in handles:
            try:
                outcomes.append(h.result(WAIT_S))
            except GenerationError as exc:
                outcomes.append(exc)
        failed = [o for o in outcomes if isinstance(o, GenerationError)]
        assert failed and all("boom" in str(o) for o in failed)
        assert any(isinstance(o, GenerationResult) for o in outcomes)

        assert engine.generate(greedy(chat_prompt(engine, 0), 4), timeout=WAIT_S).completion_tokens == 4
        assert engine.stats()["failed_requests"] == len(failed) + 1


def test_a_failure_between_forwards_fails_the_batch_not_the_engine(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused, resume = threading.Event(), threading.Event()

    def on_step(info: StepInfo) -> None:
        if info.request_ids == ("first",):
            paused.set()
            resume.wait(WAIT_S)

    def broken_merge(self: PaddedKV, other: PaddedKV) -> None:
        raise RuntimeError("out of memory while merging")

    with InferenceEngine(tiny_model, decode="dynamic", on_step=on_step) as engine:
        monkeypatch.setattr(PaddedKV, "merge", broken_merge)
        first = engine.submit(greedy(chat_prompt(engine, 0), 20, request_id="first"))
        assert paused.wait(WAIT_S)
        second = engine.submit(greedy(chat_prompt(engine, 1), 20, request_id="second"))  # joins: merge fails
        resume.set()
        for handle in (first, second):
            with pytest.raises(GenerationError, match="out of memory while merging"):
                handle.result(WAIT_S)

        monkeypatch.undo()
        results = run_concurrently(engine, [greedy(chat_prompt(engine, i), 5) for i in range(4)])
        assert [r.completion_tokens for r in results] == [5] * 4


def test_close_fails_pending_requests(tiny_model: Path) -> None:
    engine = InferenceEngine(tiny_model, max_batch_size=2, on_step=lambda info: time.sleep(0.01))
    handles = [engine.submit(greedy(chat_prompt(engine, i), 1000)) for i in range(4)]  # 2 run, 2 wait
    next(iter(handles[0].stream(timeout=WAIT_S)), None)
    engine.close()
    for handle in handles:
        with pytest.raises(EngineClosed):
            handle.result(WAIT_S)
    with pytest.raises(EngineClosed):
        engine.submit(greedy(chat_prompt(engine, 0)))


def test_cancel_stops_a_request_at_the_next_step(tiny_model: Path) -> None:
    with InferenceEngine(tiny_model, on_step=lambda info: time.sleep(0.01)) as engine:
        handle = engine.submit(greedy(chat_prompt(engine, 0), 1000))
        next(iter(handle.stream(timeout=WAIT_S)), None)
        handle.cancel()
        result = handle.result(WAIT_S)
        assert result.finish_reason == "cancelled" and result.completion_tokens < 1000
        assert engine.stats()["running"] == 0


# ------------------------------------------------------------------------------------------ (g) adapter LRU


def test_adapter_lru_evicts_the_least_recently_used(tiny_model: Path, adapters: dict[str, Path]) -> None:
    with InferenceEngine(tiny_model, max_adapters=2) as engine:
        prompt = chat_prompt(engine, 0)
        base = engine.generate(greedy(prompt), timeout=WAIT_S)
        engine.load_adapter("A", adapters["A"])
        engine.load_adapter("B", adapters["B"])
        assert engine.stats()["loaded_adapters"] == ["A", "B"]
        with_a = engine.generate(greedy(prompt, adapter="A"), timeout=WAIT_S)  # A is now the most recent
        assert engine.load_adapter("C", adapters["C"]) == ["B"]
        assert engine.stats()["loaded_adapters"] == ["A", "C"]
        # A request naming B with its path loads it back, evicting A (least recent now).
        engine.generate(greedy(prompt, adapter="B", adapter_path=adapters["B"]), timeout=WAIT_S)
        assert engine.stats()["loaded_adapters"] == ["C", "B"]

        engine.unload_adapter("C")
        engine.unload_adapter("B")
        assert engine.stats()["loaded_adapters"] == []
        assert not isinstance(engine.model, PeftModel)  # the last unload restores the plain base model
        assert engine.generate(greedy(prompt), timeout=WAIT_S).token_ids == base.token_ids
        again = engine.generate(greedy(prompt, adapter="A", adapter_path=adapters["A"]), timeout=WAIT_S)
        assert again.token_ids == with_a.token_ids


def test_adapters_in_use_are_never_evicted(tiny_model: Path, adapters: dict[str, Path]) -> None:
    cache = AdapterCache(load_base(tiny_model), capacity=2, device=torch.device("cpu"))
    cache.ensure("A", adapters["A"])
    cache.ensure("B", adapters["B"])
    assert cache.ensure("C", adapters["C"], in_use={"A"}) == ["B"]  # A is older but busy
    with pytest.raises(AdapterCapacityFull):
        cache.ensure("B", adapters["B"], in_use={"A", "C"})
    with pytest.raises(AdapterInUse):
        cache.unload("A", in_use={"A"})
    with pytest.raises(AdapterError, match="already loaded from"):
        cache.ensure("A", adapters["B"])


def test_requests_wait_for_an_adapter_slot_instead_of_failing(tiny_model: Path, adapters: dict[str, Path]) -> None:
    with InferenceEngine(tiny_model, max_batch_size=8, max_adapters=1) as engine:

        def request(i: int, name: str) -> GenerationRequest:
            return greedy(chat_prompt(engine, i), 8, adapter=name, adapter_path=adapters[name])

        cases = [(i, name) for i in range(3) for name in ("A", "B", "C")]
        alone = [engine.generate(request(*case), timeout=WAIT_S).token_ids for case in cases]
        together = run_concurrently(engine, [request(*case) for case in cases])
        assert [r.token_ids for r in together] == alone
        assert len(engine.stats()["loaded_adapters"]) == 1


def test_adapter_rows_reach_every_lora_layer_like_peft_adapter_names(
    tiny_model: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    mlp = make_adapter(tiny_model, tmp_path / "mlp", seed=9, targets=("gate_proj", "down_proj"))
    cache = AdapterCache(load_base(tiny_model), capacity=3, device=torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8]] * 4)
    cache.ensure("A", adapters["A"])
    cache.ensure("M", mlp)  # new LoRA layers (the MLP) after the first adapter: they get the hook too
    names = ["A", "__base__", "M", "A"]
    with torch.inference_mode():
        ours = cache.forward(names, input_ids=ids).logits
        peft_own = cache.model(input_ids=ids, adapter_names=names).logits  # peft's per-forward hooks
        active = cache.model(input_ids=ids).logits  # no rows set: our hooks stay out of the way
    torch.testing.assert_close(ours, peft_own)
    assert not torch.allclose(ours[0], ours[1]) and not torch.allclose(ours[0], ours[2])
    torch.testing.assert_close(active[1], peft_own[0])  # peft's active adapter ("A") applies to every row
    layers = 2 * 2 + 2 * 2  # (q, v) and (gate, down) in each of the 2 decoder layers
    assert len(cache._hooks) == layers
    with pytest.raises(AdapterError, match="not loaded"):
        cache.forward(["B"], input_ids=ids[:1])
    cache.unload("A")
    cache.unload("M")
    assert cache._hooks == [] and not any(m._forward_pre_hooks for m in cache.model.modules())


def test_detokenize_takes_the_rust_decoder_and_agrees_with_tokenizer_decode(engine: InferenceEngine) -> None:
    assert engine._backend_decode is not None
    text = "Héllo wörld! 你好, 😀 <|im_end|> ünïcödé"
    ids = engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    for window in [ids, ids[3:7], ids[-2:], [2, 3, 4, 100], [engine.tokenizer.eos_token_id], []]:
        expected = engine.tokenizer.decode(window, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert engine._detokenize(window) == expected


def test_adapter_of_another_base_model_is_rejected(
    tiny_model: Path, adapters: dict[str, Path], engine: InferenceEngine, tmp_path: Path
) -> None:
    other_base = build_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    foreign = make_adapter(other_base, tmp_path / "foreign", seed=0)
    with pytest.raises(AdapterMismatch, match="does not fit this base model"):
        engine.load_adapter("foreign", foreign)
    handle = engine.submit(greedy(chat_prompt(engine, 0), adapter="foreign", adapter_path=foreign))
    with pytest.raises(GenerationError) as caught:
        handle.result(WAIT_S)
    assert isinstance(caught.value.__cause__, AdapterMismatch)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((adapters["A"] / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterError, match="only safetensors"):
        engine.load_adapter("pickled", pickled)
    assert "foreign" not in engine.stats()["loaded_adapters"]
    assert engine.generate(greedy(chat_prompt(engine, 0), 3), timeout=WAIT_S).completion_tokens == 3


# ------------------------------------------------------------------------------------------- text streaming


def test_incremental_decoding_matches_a_full_decode(engine: InferenceEngine) -> None:
    text = "Héllo wörld! 你好, 😀 emoji and ünïcödé."
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(lambda part: engine.tokenizer.decode(part, skip_special_tokens=True))
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == engine.tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # half characters are held back, never streamed


def test_stop_matcher_holds_back_possible_stop_prefixes() -> None:
    matcher = StopMatcher(["world", "STOP"])
    assert matcher.feed("hello wor") == "hello "  # "wor" could start "world"
    assert matcher.feed("k") == "work"
    assert matcher.feed("s ST") == "s "
    assert matcher.feed("OP and more") == ""
    assert (matcher.stopped, matcher.text) == (True, "hello works ")

    unfinished = StopMatcher(["world"])
    assert unfinished.feed("a wo") == "a "
    assert unfinished.finish() == "wo"
    assert unfinished.text == "a wo"


# ------------------------------------------------------------------------------------ scoring (A/B evaluations)


def reference_nll(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """Sum of -log p(completion | prompt) from one plain, unpadded HF forward (float64 log-softmax)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    predicted = logits[len(prompt) - 1 : -1].log_softmax(dim=-1)  # position t predicts token t + 1
    return float(-predicted.gather(-1, torch.tensor(completion)[:, None]).sum())


def score_items(engine: InferenceEngine, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Chat prompts with completions of very different lengths (1 to ~60 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        answer = " ".join(_ANSWERS[j % len(_ANSWERS)] for j in range(i, i + 1 + i % 5))
        completion = engine.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        cut = int(torch.randint(1, len(completion) + 1, (1,), generator=generator))
        items.append((chat_prompt(engine, i), completion[:cut]))
    return items


def assert_close(actual: float, expected: float) -> None:
    assert actual == pytest.approx(expected, rel=1e-4), (actual, expected)


def test_score_equals_a_plain_hf_forward_in_mixed_length_batches(tiny_model: Path) -> None:
    hf_model = load_base(tiny_model)
    with InferenceEngine(tiny_model, max_batch_size=8) as engine:
        items = score_items(engine, 20)
        lengths = {len(p) + len(c) for p, c in items}
        assert len(lengths) > 8  # the chunks mix lengths: rows really are padded
        scores = engine.score(items)
        stats = engine.stats()
    assert [s.tokens for s in scores] == [len(c) for _, c in items]
    assert all(s.prompt_tokens_dropped == 0 for s in scores)
    for score, (prompt, completion) in zip(scores, items, strict=True):
        assert_close(score.nll_sum, reference_nll(hf_model, prompt, completion))
    assert (stats["scored_items"], stats["scored_tokens"]) == (20, sum(len(c) for _, c in items))
    assert stats["generated_tokens"] == 0


def test_score_with_an_adapter_equals_the_peft_model(tiny_model: Path, adapters: dict[str, Path]) -> None:
    peft_model = PeftModel.from_pretrained(load_base(tiny_model), str(adapters["A"])).eval()
    base_model = load_base(tiny_model)
    with InferenceEngine(tiny_model, max_batch_size=4, max_adapters=1) as engine:
        items = score_items(engine, 6, seed=1)
        with pytest.raises(AdapterError, match="not loaded"):
            engine.score(items, adapter="A")  # no path, not loaded
        with_a = engine.score(items, adapter="A", adapter_path=adapters["A"])
        assert engine.stats()["loaded_adapters"] == ["A"]
        base = engine.score(items)  # base rows through the PeftModel ("__base__")
        with_b = engine.score(items, adapter="B", adapter_path=adapters["B"])  # evicts A
        assert engine.stats()["loaded_adapters"] == ["B"]
        again = engine.score(items, adapter="A", adapter_path=adapters["A"])
    for i, (prompt, completion) in enumerate(items):
        assert_close(with_a[i].nll_sum, reference_nll(peft_model, prompt, completion))
        assert_close(again[i].nll_sum, with_a[i].nll_sum)
        assert_close(base[i].nll_sum, reference_nll(base_model, prompt, completion))
        assert abs(with_a[i].nll_sum - base[i].nll_sum) > 1e-3
        assert abs(with_b[i].nll_sum - with_a[i].nll_sum) > 1e-3


def test_score_runs_between_steps_without_disturbing_generation(tiny_model: Path, adapters: dict[str, Path]) -> None:
    calls: list[str] = []  # "score" / "decode" / "prefill", in the order the loop ran them
    paused, resume = threading.Event(), threading.Event()

    def on_step(info: StepInfo) -> None:
        if not paused.is_set() and len(info.request_ids) >= 4:
            paused.set()  # generations are mid-decode: hold the loop until the score call is queued
            resume.wait(WAIT_S)

    with InferenceEngine(tiny_model, decode="dynamic", max_batch_size=8, max_adapters=2, on_step=on_step) as engine:
        items = score_items(engine, 24, seed=2)

        def request(i: int) -> GenerationRequest:
            adapter = (None, "A", "B")[i % 3]
            return greedy(chat_prompt(engine, i), 24, adapter=adapter, adapter_path=adapters.get(adapter or ""))

        alone = [engine.generate(request(i), timeout=WAIT_S).token_ids for i in range(6)]
        idle_scores = engine.score(items, adapter="A", adapter_path=adapters["A"])

        def record(call: int, output: Any) -> None:
            calls.append("score" if output.past_key_values is None else "gen")

        flaky = FlakyForward(engine.model, record)
        engine.model.forward = flaky  # type: ignore[method-assign]
        try:
            handles = [engine.submit(request(i)) for i in range(6)]
            assert paused.wait(WAIT_S)
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(engine.score, items, "A", adapters["A"], WAIT_S)
                deadline = time.monotonic() + WAIT_S
                while not engine._scorer.queue and time.monotonic() < deadline:
                    time.sleep(0.001)
                resume.set()
                busy_scores = future.result(WAIT_S)
            together = [h.result(WAIT_S).token_ids for h in handles]
        finally:
            del engine.model.forward

    assert together == alone
    assert [s.nll_sum for s in busy_scores] == pytest.approx([s.nll_sum for s in idle_scores], rel=1e-5)
    # The score ran in several chunks, with generation steps in between (one chunk per loop iteration).
    first, last = calls.index("score"), len(calls) - 1 - calls[::-1].index("score")
    assert calls.count("score") == 3 and "gen" in calls[first:last]


def test_score_truncates_long_prompts_from_the_left_and_checks_items(engine: InferenceEngine) -> None:
    context = engine.max_context
    prompt, completion = [7, 8, 9] * (context // 3), [10, 11, 12, 13]
    cut = len(prompt) + len(completion) - context
    [long, short] = engine.score([(prompt, completion), (prompt[cut:], completion)])
    assert (long.tokens, long.prompt_tokens_dropped, short.prompt_tokens_dropped) == (4, cut, 0)
    assert long.nll_sum == pytest.approx(short.nll_sum, rel=1e-5)

    assert engine.score([([5, 6], [])]) == [engine.score([([5], [])])[0]] == [ScoreResult(0.0, 0)]
    assert engine.score([]) == []
    with pytest.raises(PromptTooLong):
        engine.score([([5], [6] * context)])  # the completion alone does not fit
    with pytest.raises(ValueError, match="empty"):
        engine.score([([], [5])])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.score([([5], [10_000])])
    with pytest.raises(ValueError):
        engine.score([([5], [6])], adapter="__base__")


def test_score_timeout_drops_the_work_and_the_engine_carries_on(tiny_model: Path) -> None:
    paused, resume = threading.Event(), threading.Event()

    def on_step(info: StepInfo) -> None:
        if not paused.is_set():
            paused.set()
            resume.wait(WAIT_S)

    with InferenceEngine(tiny_model, on_step=on_step) as engine:
        handle = engine.submit(greedy(chat_prompt(engine, 0), 5))
        assert paused.wait(WAIT_S)
        with pytest.raises(TimeoutError):
            engine.score(score_items(engine, 4), timeout=0.05)
        resume.set()
        assert handle.result(WAIT_S).completion_tokens == 5
        assert len(engine.score(score_items(engine, 4), timeout=WAIT_S)) == 4
        assert engine.stats()["scored_items"] == 4  # the timed-out call never ran


def test_close_fails_queued_score_calls(tiny_model: Path) -> None:
    paused, resume = threading.Event(), threading.Event()

    def on_step(info: StepInfo) -> None:
        paused.set()
        resume.wait(WAIT_S)

    engine = InferenceEngine(tiny_model, on_step=on_step)
    engine.submit(greedy(chat_prompt(engine, 0), 5))
    assert paused.wait(WAIT_S)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(engine.score, score_items(engine, 2), None, None, WAIT_S)
        while not engine._scorer.queue:
            time.sleep(0.001)
        closer = threading.Thread(target=engine.close)
        closer.start()
        while not engine._closed:  # closed before the loop resumes: the queued score never starts
            time.sleep(0.001)
        resume.set()
        with pytest.raises(EngineClosed):
            future.result(WAIT_S)
        closer.join(WAIT_S)


# -------------------------------------------------------------------------------------------- info, ignore_eos


def test_info_describes_the_served_model(engine: InferenceEngine, tiny_model: Path) -> None:
    info = engine.info()
    base = load_base(tiny_model)
    assert info["model_path"] == str(tiny_model)
    assert (info["dtype"], info["device"], info["max_context"], info["model_type"]) == ("float32", "cpu", 2048, "llama")
    assert info["parameters"] == sum(p.numel() for p in base.parameters())
    assert info["parameter_bytes"] == 4 * info["parameters"]
    assert (info["max_batch_size"], info["adapter_capacity"], info["vocab_size"]) == (16, 4, 512)


def test_ignore_eos_generates_max_tokens(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with InferenceEngine(tiny_model, decode="dynamic") as engine:
        eos = engine.tokenizer.eos_token_id

        def force_eos_on_third_token(call: int, output: Any) -> None:
            if call == 3:
                output.logits[:, -1, eos] = 1e4

        monkeypatch.setattr(engine.model, "forward", FlakyForward(engine.model, force_eos_on_third_token))
        result = engine.generate(greedy(chat_prompt(engine, 0), 10, ignore_eos=True), timeout=WAIT_S)

    assert (result.finish_reason, result.completion_tokens, result.token_ids[2]) == ("length", 10, eos)
