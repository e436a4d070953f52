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
