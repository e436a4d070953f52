"""The engine on CUDA in bf16 (run where CUDA exists: pytest -m gpu). bf16 rounding differs between a
padded batch and a single row, so these check behaviour and agreement in bulk, not bit equality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.inference.test_engine import chat_prompt, greedy, make_adapter, run_concurrently
from workers.inference import InferenceEngine

pytestmark = pytest.mark.gpu


def test_batched_bf16_generation_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model, tmp_path / "a", seed=1)
    with InferenceEngine(tiny_model, max_batch_size=64) as engine:
        assert engine.info()["device"].startswith("cuda") and engine.dtype == torch.bfloat16
        engine.load_adapter("a", adapter)
        requests = [
            greedy(chat_prompt(engine, i), max_tokens=32, adapter="a" if i % 2 else None, ignore_eos=True)
            for i in range(64)
        ]
        together = run_concurrently(engine, requests)
        alone = [engine.generate(r) for r in requests[:8]]
        stats = engine.stats()
    assert all(r.completion_tokens == 32 for r in together)
    assert max(int(k) for k in stats["batch_size_histogram"]) > 32
    same = sum(t.token_ids == a.token_ids for t, a in zip(together, alone, strict=False))
    assert same >= 6, f"only {same}/8 batched rows matched their solo run"


def test_compiled_static_decode_under_cuda_graphs(tiny_model: Path, tmp_path: Path) -> None:
    """decode="compiled" on CUDA: torch.compile(mode="reduce-overhead") captures the step as CUDA graphs. Agreement
    with the dynamic path in bulk (bf16), with two adapters mixed into the batch."""
    adapters = {name: make_adapter(tiny_model, tmp_path / name, seed=s) for s, name in enumerate(["a", "b"], 1)}
    requests = [
        greedy(
            chat_prompt_ids(i),
            max_tokens=24,
            adapter=(None, "a", "b")[i % 3],
            adapter_path=adapters.get((None, "a", "b")[i % 3] or ""),
            ignore_eos=True,
        )
        for i in range(48)
    ]
    with InferenceEngine(tiny_model, max_batch_size=64, decode="compiled") as engine:
        assert engine.info()["decode_path"] == "compiled"
        compiled = run_concurrently(engine, requests)
    with InferenceEngine(tiny_model, max_batch_size=64, decode="dynamic") as engine:
        dynamic = run_concurrently(engine, requests)
    assert all(r.completion_tokens == 24 for r in compiled)
    same = sum(c.token_ids == d.token_ids for c, d in zip(compiled, dynamic, strict=True))
    assert same >= 40, f"only {same}/48 compiled rows matched the dynamic path"


def chat_prompt_ids(i: int) -> list[int]:
    return [5 + (i * 7 + j) % 400 for j in range(8 + i % 13)]
