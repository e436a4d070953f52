"""End-to-end tests of the training child process on a tiny random Llama, on CPU.

Each run is a real `python -m workers.training.run cfg.json` subprocess, exactly as the supervisor starts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from app.core.contracts.events import Failed
from app.core.contracts.training import Hyperparameters, RunConfig
from workers.training.tiny_model import _ANSWERS, _QUESTIONS, build_tiny_model, tiny_corpus

REPO_ROOT = Path(__file__).resolve().parents[3]
RUN_TIMEOUT_S = 180


# ------------------------------------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_rows(repeat: int = 4) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(_QUESTIONS, _ANSWERS, strict=True)
    ] * repeat


def read_events(cfg: RunConfig) -> list[dict[str, Any]]:
    assert cfg.events_file is not None
    lines = Path(cfg.events_file).read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert all(isinstance(e["type"], str) and isinstance(e["time"], float) for e in events)
    return events


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == event_type]


def train_metrics(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in of_type(events, "metrics") if "loss" in e]


def run_child(cfg: RunConfig, tmp_path: Path, name: str = "config.json") -> subprocess.CompletedProcess[str]:
    config_path = cfg.to_json(tmp_path / name)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.training.run", str(config_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def front_matter(readme: Path) -> dict[str, Any]:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def logits(model: Any, input_ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lora_run(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("lora")
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp / "train.jsonl", chat_rows())),
        eval_file=str(write_jsonl(tmp / "eval.jsonl", chat_rows(repeat=1)[:4])),
        output_dir=str(tmp / "run"),
        experiment_name="tiny-lora",
        dataset_name="tiny-chat",
        method="lora",
        lora_r=8,
        learning_rate=5e-3,
        max_steps=12,
        save_steps=5,
        eval_steps=6,
        merge_adapter=True,
    )
    return cfg, run_child(cfg, tmp)


# ---------------------------------------------------------------------------------------------- (1) LoRA + chat


def test_lora_run_emits_events_and_loss_falls(lora_run: tuple[RunConfig, Any]) -> None:
    cfg, proc = lora_run
    assert_ok(proc)
    events = read_events(cfg)
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "completed"

    started = events[0]
    assert started["device"] == "cpu"
    assert started["train_rows"] == 32 and started["eval_rows"] == 4
    assert 0 < started["trainable_params"] < started["total_params"]
    assert started["max_steps"] == 12
    tokens = started["train_tokens"]
    assert tokens["tokens_total"] > 32 * 5 and 0 < tokens["tokens_mean"] <= tokens["tokens_max"]
    assert tokens["rows_over_max_seq_length"] == 0 and tokens["max_seq_length"] == cfg.max_seq_length

    metrics = train_metrics(events)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert all(m["tokens_per_second"] > 0 and m["num_tokens"] > 0 for m in metrics)
    assert all({"epoch", "learning_rate", "grad_norm"} <= m.keys() for m in metrics)
    assert [m["step"] for m in of_type(events, "metrics") if "eval_loss" in m] == [6, 12]

    checkpoints = of_type(events, "checkpoint")
    assert [c["step"] for c in checkpoints] == [5, 10, 12]
    last = Path(checkpoints[-1]["path"])
    assert last.is_absolute() and (last / "trainer_state.json").is_file()
    assert (last / "adapter_model.safetensors").is_file()
    # save_total_limit=2 rotated the oldest checkpoint away.
    assert sorted(p.name for p in cfg.checkpoints_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]

    completed = events[-1]
    assert completed["final_dir"] == str(cfg.final_dir.resolve())
    assert completed["metrics"]["global_step"] == 12
    assert completed["metrics"]["train_loss"] > 0 and completed["metrics"]["eval_loss"] > 0
    assert completed["stopped"] is False
    assert "'loss'" in proc.stdout and "saved final model" in proc.stdout


def test_lora_final_dir_contents(lora_run: tuple[RunConfig, Any]) -> None:
    cfg, proc = lora_run
    assert_ok(proc)
    final = cfg.final_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "training_config.json",
        "metrics.json",
    ):
        assert (final / name).is_file(), name
    assert not (final / "training_args.bin").exists()
    assert not list(final.glob("*.bin"))

    meta = front_matter(final / "README.md")
    assert meta["base_model"] == cfg.base_model
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"trl", "sft", "lora"} <= set(meta["tags"])
    readme = (final / "README.md").read_text(encoding="utf-8")
    assert "| learning_rate | 0.005 |" in readme and "tiny-chat" in readme and "eval_loss" in readme

    assert RunConfig.from_json(final / "training_config.json") == cfg
    metrics = json.loads((final / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["global_step"] == 12 and "train_loss" in metrics and "eval_loss" in metrics

    merged_meta = front_matter(final / "merged" / "README.md")
    assert merged_meta["library_name"] == "transformers"


def test_lora_adapter_changes_logits_and_merge_matches(lora_run: tuple[RunConfig, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, proc = lora_run
    assert_ok(proc)
    tokenizer = AutoTokenizer.from_pretrained(cfg.final_dir)
    rendered = tokenizer.apply_chat_template(chat_rows(1)[0]["messages"], tokenize=False)
    assert isinstance(rendered, str)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]

    base = AutoModelForCausalLM.from_pretrained(cfg.base_model)
    base_logits = logits(base, ids)
    tuned = PeftModel.from_pretrained(base, cfg.final_dir)
    tuned_logits = logits(tuned, ids)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)

    merged = AutoModelForCausalLM.from_pretrained(cfg.final_dir / "merged")
    torch.testing.assert_close(logits(merged, ids), tuned_logits, atol=1e-4, rtol=1e-4)


def test_resume_from_checkpoint(lora_run: tuple[RunConfig, Any], tmp_path: Path) -> None:
    cfg, proc = lora_run
    assert_ok(proc)
    resumed = RunConfig.model_validate(
        {
            **cfg.model_dump(),
            "output_dir": str(tmp_path / "resumed"),
            "events_file": None,
            "stop_file": None,
            "resume_from_checkpoint": str(cfg.checkpoints_dir / "checkpoint-10"),
            "merge_adapter": False,
        }
    )
    assert_ok(run_child(resumed, tmp_path))
    events = read_events(resumed)
    assert events[0]["type"] == "started" and events[0]["start_step"] == 10
    assert [m["step"] for m in train_metrics(events)] == [11, 12]
    assert events[-1]["type"] == "completed" and events[-1]["metrics"]["global_step"] == 12


# --------------------------------------------------------------------------------------- (2) full FT + packing


def test_full_finetune_with_packing_on_text_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    lines = tiny_corpus()
    rows = [{"text": " ".join(lines[i : i + 3])} for i in range(0, 120, 3)]
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "text.jsonl", rows)),
        output_dir=str(tmp_path / "run"),
        method="full",
        packing=True,
        max_seq_length=128,
        batch_size=2,
        learning_rate=1e-3,
        max_steps=8,
        logging_steps=2,
    )
    proc = run_child(cfg, tmp_path)
    assert_ok(proc)
    events = read_events(cfg)
    started = events[0]
    assert started["dataset_format"] == "text"
    assert started["trainable_params"] == started["total_params"]
    # logging_first_step plus every second step.
    assert [m["step"] for m in train_metrics(events)] == [1, 2, 4, 6, 8]
    assert events[-1]["type"] == "completed"

    final = cfg.final_dir
    assert (final / "model.safetensors").is_file()
    assert not (final / "adapter_model.safetensors").exists()
    config = json.loads((final / "config.json").read_text(encoding="utf-8"))
    assert config["use_cache"] is True
    meta = front_matter(final / "README.md")
    assert meta["library_name"] == "transformers" and "lora" not in meta["tags"]


# -------------------------------------------------------------------------------------- (3) prompt/completion


def test_prompt_completion_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in zip(_QUESTIONS, _ANSWERS, strict=True)
    ]
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "pc.jsonl", rows * 2)),
        output_dir=str(tmp_path / "run"),
        learning_rate=5e-3,
        max_steps=4,
        batch_size=4,
    )
    proc = run_child(cfg, tmp_path)
    assert_ok(proc)
    events = read_events(cfg)
    assert events[0]["dataset_format"] == "prompt_completion"
    assert len(train_metrics(events)) == 4
    assert events[-1]["type"] == "completed"
    assert (cfg.final_dir / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- (4) stopping


def test_stop_file_ends_run_early(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", chat_rows())),
        output_dir=str(tmp_path / "run"),
        max_steps=30,
        save_steps=100,
    )
    assert cfg.stop_file is not None
    Path(cfg.stop_file).parent.mkdir(parents=True)
    Path(cfg.stop_file).touch()
    proc = run_child(cfg, tmp_path)
    assert_ok(proc)
    events = read_events(cfg)
    stopped = of_type(events, "stopped")
    assert len(stopped) == 1 and stopped[0]["step"] < 30
    assert max(m["step"] for m in train_metrics(events)) == stopped[0]["step"]
    assert stopped[0]["reason"] == "stop_file"
    # The stop step is checkpointed so the run can be resumed later.
    assert [c["step"] for c in of_type(events, "checkpoint")] == [stopped[0]["step"]]
    completed = events[-1]
    assert completed["type"] == "completed" and completed["stopped"] is True
    assert completed["metrics"]["global_step"] == stopped[0]["step"]
    assert (cfg.final_dir / "adapter_model.safetensors").is_file()


def test_sigterm_stops_gracefully(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", chat_rows())),
        output_dir=str(tmp_path / "run"),
        max_steps=5000,
        save_steps=10_000,
        logging_steps=10,
    )
    config_path = cfg.to_json(tmp_path / "config.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.training.run", str(config_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        events_file = Path(cfg.events_file or "")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (events_file.is_file() and '"metrics"' in events_file.read_text(encoding="utf-8")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no metrics event before the deadline"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    events = read_events(cfg)
    stopped = of_type(events, "stopped")
    assert len(stopped) == 1 and stopped[0]["reason"] == "sigterm" and stopped[0]["step"] < 5000
    # An interruption is not a result: no final model, no "completed" event (a supervisor that saw one would
    # report success), but a checkpoint at the stop step for the next attempt to resume from.
    assert not of_type(events, "completed") and not cfg.final_dir.exists()
    assert [c["step"] for c in of_type(events, "checkpoint")] == [stopped[0]["step"]]


def test_failure_exits_nonzero_with_traceback_and_event(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi", "answer": "there"}])),
        output_dir=str(tmp_path / "run"),
        max_steps=2,
    )
    proc = run_child(cfg, tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "train_file" in proc.stderr
    failed = of_type(read_events(cfg), "failed")
    assert len(failed) == 1
    event = Failed.model_validate({k: v for k, v in failed[0].items() if k != "type"})
    assert event.error_type == "ValueError" and "train_file" in event.message
    assert event.last_frame is not None and "components.py" in event.last_frame
    assert "Traceback" in event.traceback
    assert event.summary().startswith("ValueError: train_file")


def test_qlora_without_cuda_fails_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from workers.training.run import SFTRecipe

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", chat_rows(1))),
        output_dir=str(tmp_path / "run"),
        method="qlora",
    )
    with pytest.raises(RuntimeError, match="qlora needs a CUDA GPU"):
        SFTRecipe(cfg).setup()


# --------------------------------------------------------------------------------------------- (5) tiny model


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", seed=3)
    second = build_tiny_model(tmp_path / "b", seed=3)
    other = build_tiny_model(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token and tokenizer.eos_token and tokenizer.bos_token and tokenizer.unk_token
    text = "The capital of France is Paris. Ünïcode too!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(chat_rows(1)[0]["messages"], tokenize=False)
    assert isinstance(rendered, str)
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_end|>\n")


# ----------------------------------------------------------------------------------------- (6) config validation


BASE: dict[str, Any] = {"base_model": "m", "train_file": "t.jsonl", "output_dir": "out"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "adapter"),
        ("learning_rate", 0),
        ("learning_rate", -1e-4),
        ("lora_r", 0),
        ("lora_dropout", 1.0),
        ("lora_target_modules", []),
        ("lora_target_modules", "q_proj"),
        ("epochs", 0),
        ("batch_size", 0),
        ("gradient_accumulation_steps", "two"),
        ("max_seq_length", -5),
        ("warmup_ratio", 1.0),
        ("lr_scheduler", "exponential"),
        ("bf16", "yes"),
        ("save_total_limit", 0),
        ("base_model", ""),
    ],
)
def test_run_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        RunConfig(**{**BASE, field: value})
    assert {error["loc"][0] for error in info.value.errors()} == {field}


def test_run_config_cross_field_rules() -> None:
    with pytest.raises(ValidationError, match="merge_adapter only applies"):
        RunConfig(**BASE, method="full", merge_adapter=True)
    with pytest.raises(ValidationError, match="eval_steps is set but eval_file is not"):
        RunConfig(**BASE, eval_steps=10)
    with pytest.raises(ValidationError, match="max_steps must be -1"):
        RunConfig(**BASE, max_steps=0)


def test_run_config_json_round_trip_and_defaults(tmp_path: Path) -> None:
    cfg = RunConfig(**BASE, lora_target_modules=["q_proj", "v_proj"], bf16=False)
    assert cfg.events_file == str(Path("out") / "events.jsonl")
    assert cfg.stop_file == str(Path("out") / "STOP")
    assert RunConfig.from_json(cfg.to_json(tmp_path / "c.json")) == cfg

    (tmp_path / "typo.json").write_text(json.dumps({**BASE, "learning_rat": 1e-4}))
    with pytest.raises(ValidationError, match="learning_rat"):
        RunConfig.from_json(tmp_path / "typo.json")
    (tmp_path / "missing.json").write_text(json.dumps({"base_model": "m"}))
    with pytest.raises(ValidationError, match="train_file"):
        RunConfig.from_json(tmp_path / "missing.json")


def test_run_config_is_the_api_vocabulary_plus_the_attempt() -> None:
    """One vocabulary: every hyperparameter a request may set is a RunConfig field of the same name and
    default, so the supervisor hands the API's validated values to the child unrenamed."""
    run_fields = RunConfig.model_fields
    for name, field in Hyperparameters.model_fields.items():
        assert name in run_fields and run_fields[name].default == field.default, name


def test_run_config_fields_document_themselves() -> None:
    assert all(field.description for field in RunConfig.model_fields.values())


# ------------------------------------------------------------------------------------- (7) what the loss sees


PATTERN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Count on from {n}: {' '.join(str(n + k) for k in range(8))}"},
            {"role": "assistant", "content": a},
        ]
    }
    for n, a in zip(range(0, 80, 10), _ANSWERS, strict=True)
] * 2


def split_losses(model_dir: Path, tokenizer_dir: Path) -> tuple[float, float]:
    """Mean per-token loss on the prompt tokens and on the answer tokens of PATTERN_ROWS, by plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.masks import IGNORE, tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt, answer = [], []
    for row in PATTERN_ROWS[:8]:
        tokens = tokenize_row(row, "messages", tokenizer, train_on_prompt=False)
        ids = torch.tensor([tokens["input_ids"]])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        nll = -logprobs.gather(1, ids[0, 1:, None])[:, 0]
        for position, label in enumerate(tokens["labels"][1:]):
            (prompt if label == IGNORE else answer).append(float(nll[position]))
    return sum(prompt) / len(prompt), sum(answer) / len(answer)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_the_loss_sees_the_answers_unless_asked_to_train_on_prompts(
    tiny_model_dir: Path, tmp_path: Path, train_on_prompt: bool
) -> None:
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", PATTERN_ROWS)),
        output_dir=str(tmp_path / "run"),
        method="full",
        learning_rate=2e-3,
        max_steps=40,
        batch_size=8,
        save_steps=1000,
        train_on_prompt=train_on_prompt,
    )
    assert_ok(run_child(cfg, tmp_path))
    started = of_type(read_events(cfg), "started")[0]
    assert started["train_on_prompt"] is train_on_prompt
    share = started["loss_tokens"]["trained_share"]
    assert share == 1.0 if train_on_prompt else 0 < share < 0.6
    metrics = train_metrics(read_events(cfg))
    counted = [m["num_loss_tokens"] for m in metrics]  # the tokens the loss saw, counted batch by batch
    assert counted[0] > 0 and counted == sorted(counted) and counted[-1] > counted[0]
    seen_share = metrics[-1]["num_loss_tokens"] / metrics[-1]["num_tokens"]  # (padding counts in num_tokens)
    assert seen_share > 0.8 if train_on_prompt else 0 < seen_share < 0.6, seen_share

    base_prompt, base_answer = split_losses(tiny_model_dir, tiny_model_dir)
    tuned_prompt, tuned_answer = split_losses(cfg.final_dir, cfg.final_dir)
    if train_on_prompt:  # the same steps now spread over prompts too: both fall
        assert tuned_prompt < base_prompt * 0.7, (base_prompt, tuned_prompt)
        assert tuned_answer < base_answer, (base_answer, tuned_answer)
    else:
        assert tuned_answer < base_answer / 2, (base_answer, tuned_answer)
        assert abs(tuned_prompt - base_prompt) <= 0.3 * base_prompt, (base_prompt, tuned_prompt)


def test_a_fine_tuned_model_answers_a_training_prompt_and_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The end-of-turn marker is trained, so the served model ends its answer itself (finish_reason "stop")."""
    from workers.inference import GenerationRequest, InferenceEngine

    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=8))),
        output_dir=str(tmp_path / "run"),
        method="full",
        learning_rate=3e-3,
        max_steps=60,
        batch_size=8,
        save_steps=1000,
    )
    assert_ok(run_child(cfg, tmp_path))
    with InferenceEngine(cfg.final_dir, max_batch_size=4) as engine:
        prompt = engine.encode_chat([{"role": "user", "content": _QUESTIONS[0]}])
        result = engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=48, temperature=0.0))
    assert result.finish_reason == "stop", result
    assert result.text.strip() == _ANSWERS[0]


def test_every_method_collates_the_same_answer_only_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Masks are built before the model exists, so LoRA and full fine-tunes (and QLoRA: tests/workers/training/
    test_gpu.py) see the same labels; asserted on the batch the trainer's own dataloader collates."""
    from workers.training.masks import IGNORE
    from workers.training.run import SFTRecipe

    batches = {}
    for method in ("lora", "full"):
        cfg = RunConfig(
            base_model=str(tiny_model_dir),
            train_file=str(write_jsonl(tmp_path / "train.jsonl", chat_rows())),
            output_dir=str(tmp_path / method),
            method=method,
            max_steps=1,
            batch_size=4,
        )
        recipe = SFTRecipe(cfg)
        recipe.setup()
        try:
            assert recipe.trainer is not None
            batches[method] = next(iter(recipe.trainer.get_train_dataloader()))
        finally:
            recipe.cleanup()
    lora, full = batches["lora"], batches["full"]
    assert (lora["input_ids"] == full["input_ids"]).all() and (lora["labels"] == full["labels"]).all()
    trained = lora["labels"] != IGNORE
    assert 0 < int(trained.sum()) < int((lora["input_ids"] != recipe.tokenizer.pad_token_id).sum())
