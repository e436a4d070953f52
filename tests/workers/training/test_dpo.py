"""DPO through the trainer child: trl's DPOTrainer on (prompt, chosen, rejected) rows, with LoRA, the same
events, checkpoints and final adapter as SFT, and the reward margin rising as the policy learns the
preference."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.contracts.training import Hyperparameters, RunConfig
from tests.workers.training.test_run import assert_ok, of_type, read_events, run_child, write_jsonl
from workers.training.tiny_model import _ANSWERS, _QUESTIONS, build_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-dpo") / "model")


def preference_rows() -> list[dict[str, str]]:
    """Prefer the right answer to each question over another question's answer."""
    n = len(_QUESTIONS)
    return [
        {"prompt": f"Question: {q}\nAnswer:", "chosen": f" {a}", "rejected": f" {_ANSWERS[(i + 1) % n]}"}
        for i, (q, a) in enumerate(zip(_QUESTIONS, _ANSWERS, strict=True))
    ]


def test_dpo_run_raises_the_reward_margin(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "prefs.jsonl", preference_rows() * 2)),
        output_dir=str(tmp_path / "run"),
        objective="dpo",
        dpo_beta=0.1,
        lora_r=8,
        learning_rate=5e-3,
        max_steps=16,
        batch_size=4,
        save_steps=8,
        logging_steps=2,
    )
    proc = run_child(cfg, tmp_path)
    assert_ok(proc)
    events = read_events(cfg)
    assert events[0]["type"] == "started" and events[0]["objective"] == "dpo"
    assert events[0]["dataset_format"] == "preference"
    margins = [e["rewards/margins"] for e in of_type(events, "metrics") if "rewards/margins" in e]
    assert len(margins) >= 4, of_type(events, "metrics")
    assert sum(margins[-2:]) / 2 > sum(margins[:2]) / 2 and margins[-1] > 0, margins
    assert of_type(events, "checkpoint") and events[-1]["type"] == "completed"
    assert (cfg.final_dir / "adapter_model.safetensors").is_file()
    assert "## Lineage" not in (cfg.final_dir / "README.md").read_text()  # no lineage given, none invented


def test_dpo_needs_preference_rows_and_no_packing(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="packing"):
        Hyperparameters(objective="dpo", packing=True)
    rows = [{"prompt": "q", "completion": " a"}] * 4
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "pc.jsonl", rows)),
        output_dir=str(tmp_path / "run"),
        objective="dpo",
        max_steps=1,
    )
    proc = run_child(cfg, tmp_path)
    assert proc.returncode != 0 and "objective dpo cannot train on prompt_completion rows" in proc.stderr
