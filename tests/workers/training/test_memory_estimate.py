"""The dataset report's memory estimate (app/datasets/estimate.py) against the measured peak of real
training steps of the tiny model on CPU, within the 25% the report promises.

The peak is the high-water mark of live tensor bytes over one optimizer step (forward, backward, AdamW),
from the PyTorch profiler's memory timeline, the CPU counterpart of `torch.cuda.max_memory_allocated`.
(`MemoryProfileTimeline` is not public API; it is the one the profiler's own `export_memory_timeline` uses.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline
from transformers import AutoModelForCausalLM

from app.datasets.estimate import TrainingShape, estimate

TOLERANCE = 0.25


def measured_peak(model_dir: Path, method: str, batch_size: int, seq_len: int) -> int:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    if method == "lora":
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW allocates its moments on the first step: measure a step in the steady state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(categories) for categories in sizes))


@pytest.mark.parametrize(("method", "batch_size", "seq_len"), [("lora", 4, 128), ("lora", 8, 256), ("full", 4, 128)])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(
    tiny_model: Path, method: str, batch_size: int, seq_len: int
) -> None:
    peak = measured_peak(tiny_model, method, batch_size, seq_len)
    shape = TrainingShape(method=method, batch_size=batch_size, lora_r=8)
    estimated = estimate(tiny_model, shape, max_seq_length=seq_len, tokens_per_epoch=None)
    assert estimated is not None
    assert abs(estimated["peak_memory_bytes"] - peak) <= TOLERANCE * peak, (estimated, peak)
