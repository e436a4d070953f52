"""GPU paths of the trainer (LoRA in bf16, QLoRA in 4-bit). Run where CUDA exists: pytest -m gpu."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers.training.test_run import REPO_ROOT, chat_rows, write_jsonl

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_methods_train_on_cuda(method: str, tiny_model: Path, tmp_path: Path) -> None:
    config = {
        "base_model": str(tiny_model),
        "train_file": str(write_jsonl(tmp_path / "train.jsonl", chat_rows(8))),
        "output_dir": str(tmp_path / "out"),
        "method": method,
        "max_steps": 20,
        "learning_rate": 5e-3,
        "batch_size": 8,
        "max_seq_length": 128,
        "packing": True,
        "save_steps": 10,
    }
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "workers.training.run", str(cfg_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == "started")
    assert started["device"].startswith("cuda") and started["precision"] == "bf16"
    losses = [e["loss"] for e in events if e["type"] == "metrics" and "loss" in e]
    assert sum(losses[-3:]) / 3 < losses[0]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    # The 4-bit path builds the same answer-only masks as every other method.
    from transformers import AutoTokenizer

    from workers.training.masks import tokenize_row, trained_share

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    labels = [tokenize_row(r, "messages", tokenizer, train_on_prompt=False)["labels"] for r in chat_rows(8)]
    assert started["loss_tokens"] == trained_share(labels) and started["loss_tokens"]["trained_share"] < 1


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_zero_across_two_gpus(config: str, tiny_model: Path, tmp_path: Path) -> None:
    """`deepspeed: zero2|zero3` with gpus: 2, as the supervisor launches it (accelerate launch, 2 processes)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make gpu installs it)")
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from app.core.contracts.training import DEEPSPEED_DIR
    from workers.training.supervisor import trainer_command

    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(
        json.dumps(
            {
                "base_model": str(tiny_model),
                "train_file": str(write_jsonl(tmp_path / "train.jsonl", chat_rows(16))),
                "output_dir": str(tmp_path / "out"),
                "method": "full",
                "max_steps": 6,
                "batch_size": 4,
                "max_seq_length": 128,
                "deepspeed": str(DEEPSPEED_DIR / f"{config}.json"),
            }
        )
    )
    done = subprocess.run(trainer_command(cfg_path, 2), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["type"] == "started")["processes"] == 2


def test_dpo_with_qlora_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    """method: qlora + objective: dpo, the combination only CUDA offers, on the same trainer child."""
    rows = [{"prompt": f"q{i}", "chosen": " a good answer", "rejected": " no"} for i in range(16)]
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(
        json.dumps(
            {
                "base_model": str(tiny_model),
                "train_file": str(write_jsonl(tmp_path / "train.jsonl", rows)),
                "output_dir": str(tmp_path / "out"),
                "method": "qlora",
                "objective": "dpo",
                "max_steps": 8,
                "learning_rate": 5e-3,
                "batch_size": 4,
                "max_seq_length": 64,
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "workers.training.run", str(cfg_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    margins = [e["rewards/margins"] for e in events if e["type"] == "metrics" and "rewards/margins" in e]
    assert margins and margins[-1] > margins[0]
