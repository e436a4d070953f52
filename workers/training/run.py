"""Training child process: one supervised fine-tuning run described by a `RunConfig` JSON file.

    python -m workers.training.run CONFIG.json

A torchtune-style recipe: `setup()` loads data, tokenizer and model and builds TRL's `SFTTrainer`,
`train()` runs it, `save_final()` writes the deliverable to `output_dir/final`, `cleanup()` releases
resources. Progress goes to `events_file` as JSON lines (see `callbacks.py`) and to stdout as text.

This module runs alone on a GPU machine that only has the training stack installed, so it imports nothing
from `app`, and torch/transformers/trl/peft are imported inside functions to keep `import` cheap.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.training.config import RunConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTConfig, SFTTrainer

    from workers.training.callbacks import EventsCallback, EventWriter

log = logging.getLogger("workers.training.run")

# Used only when a conversational dataset meets a tokenizer without a chat template (most base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DATASET_FORMATS = {
    "messages": ("messages",),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
}


class SFTRecipe:
    """Supervised fine-tuning of a causal LM with LoRA, QLoRA or all weights, on top of TRL's SFTTrainer."""

    def __init__(self, cfg: RunConfig) -> None:
        from workers.training.callbacks import EventWriter, is_main_process

        self.cfg = cfg
        self.is_main = is_main_process()
        self.writer: EventWriter = EventWriter(cfg.events_file or "", enabled=self.is_main)
        self.trainer: SFTTrainer | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.callback: EventsCallback | None = None
        # Facts about the run reported in the "started" event and the model card.
        self.info: dict[str, Any] = {}
        self.train_metrics: dict[str, Any] = {}
        self.eval_metrics: dict[str, Any] = {}
        self._previous_sigterm: Any = None
        self._use_cache: bool | None = None

    # ================================================================================================== setup

    def setup(self) -> None:
        from transformers import set_seed

        cfg = self.cfg
        device = _resolve_device(cfg)
        # Checked before the expensive loading below so a bad path fails in a second.
        resume = cfg.resume_from_checkpoint
        if resume is not None and not Path(resume, "trainer_state.json").is_file():
            raise ValueError(f"resume_from_checkpoint: {resume} is not a trainer checkpoint directory")
        bf16 = _resolve_bf16(cfg.bf16)
        set_seed(cfg.seed)
        log.info("run %s: %s fine-tune of %s on %s", cfg.experiment_name, cfg.method, cfg.base_model, device)

        train_dataset, data_format = load_rows(cfg.train_file, "train_file")
        eval_dataset = load_rows(cfg.eval_file, "eval_file")[0] if cfg.eval_file else None
        tokenizer = self.tokenizer = load_tokenizer(cfg.base_model, conversational=data_format == "messages")
        # SFTConfig must exist before the model is loaded: with DeepSpeed ZeRO-3 it installs the hook that
        # partitions weights while they are created.
        args = build_sft_config(cfg, bf16=bf16, has_eval=eval_dataset is not None)
        model = load_model(cfg, bf16=bf16)
        total_before_peft = _count_params(model)
        # Trainer overwrites config.use_cache with TrainingArguments.use_cache (False) and that would be
        # saved with the final model, slowing generation; remember the model's own setting.
        self._use_cache = getattr(model.config, "use_cache", None)

        from trl import SFTTrainer

        from workers.training.callbacks import EventsCallback
        from workers.training.token_stats import summarize, token_lengths

        self.callback = EventsCallback(self.writer, cfg.stop_file)
        self.trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=build_lora_config(cfg) if cfg.uses_adapter else None,
            callbacks=[self.callback],
        )
        trainable, total = _trainable_and_total(self.trainer.model, total_before_peft)
        self.info = {
            "experiment_name": cfg.experiment_name,
            "method": cfg.method,
            "base_model": cfg.base_model,
            "device": device,
            "precision": "bf16" if bf16 else "fp32",
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "dataset_format": data_format,
            "train_rows": len(train_dataset),
            "eval_rows": len(eval_dataset) if eval_dataset is not None else 0,
            "trainable_params": trainable,
            "total_params": total,
            "resume_from_checkpoint": cfg.resume_from_checkpoint,
            "train_tokens": summarize(token_lengths(train_dataset, data_format, tokenizer), cfg.max_seq_length),
        }
        if over := self.info["train_tokens"]["rows_over_max_seq_length"]:
            log.warning("%d of %d train rows are longer than max_seq_length=%d and will be cut",
                        over, len(train_dataset), cfg.max_seq_length)  # fmt: skip
        self.callback.started_fields.update(self.info)
        self._install_sigterm_handler()
        log.info(
            "%d train rows, %d eval rows (%s); %s trainable of %s parameters",
            self.info["train_rows"],
            self.info["eval_rows"],
            data_format,
            f"{trainable:,}",
            f"{total:,}",
        )

    # ================================================================================================== train

    def train(self) -> None:
        trainer, callback = self._require_trainer()
        result = trainer.train(resume_from_checkpoint=self.cfg.resume_from_checkpoint)
        self.train_metrics = dict(result.metrics)
        self.train_metrics["global_step"] = result.global_step
        self.train_metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
        if callback.stopped:
            log.info("stopped early at step %d (%s)", result.global_step, callback.stop_reason)
        # Score the eval set once at the end unless training was cut short or the last step already did.
        if trainer.eval_dataset is not None and not callback.stopped:
            self.eval_metrics = self._final_eval_metrics(trainer)
        log.info(
            "training finished: step %d, train_loss %.4f%s",
            result.global_step,
            result.training_loss,
            f", eval_loss {self.eval_metrics['eval_loss']:.4f}" if "eval_loss" in self.eval_metrics else "",
        )

    def _final_eval_metrics(self, trainer: SFTTrainer) -> dict[str, Any]:
        step = trainer.state.global_step
        for entry in reversed(trainer.state.log_history):
            if "eval_loss" in entry and entry.get("step") == step:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
        return dict(trainer.evaluate())

    # ============================================================================================= save_final

    def save_final(self) -> Path | None:
        """Write adapter or model, tokenizer, README.md, training_config.json and metrics.json to final/."""
        trainer, callback = self._require_trainer()
        cfg = self.cfg
        if callback.stopped and not cfg.save_on_stop:
            log.info("stopped early and save_on_stop is false: not saving a final model")
            return None
        final_dir = cfg.final_dir.resolve()
        # A resumed or retried run must not mix its files with a previous attempt's (e.g. a stale merged/).
        if self.is_main and final_dir.exists():
            shutil.rmtree(final_dir)
        if self._use_cache is not None:
            trainer.accelerator.unwrap_model(trainer.model).config.use_cache = self._use_cache
        # Trainer.save_model gathers ZeRO-3 shards and saves only on the main process; for a PEFT model it
        # writes just the adapter. It also saves the tokenizer (processing_class).
        trainer.save_model(str(final_dir))
        metrics = self._final_metrics()
        merged_dir = None
        if self.is_main:
            # training_args.bin is a pickle; training_config.json is the readable, safe record of the run.
            (final_dir / "training_args.bin").unlink(missing_ok=True)
            cfg.to_json(final_dir / "training_config.json")
            (final_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            from workers.training.model_card import write_model_card

            write_model_card(cfg, final_dir, metrics, extra=self.info)
            if cfg.merge_adapter:
                merged_dir = self._save_merged(final_dir, metrics)
        log.info("saved final model to %s", final_dir)
        completed: dict[str, Any] = {
            "final_dir": str(final_dir),
            "metrics": {
                "train_loss": metrics.get("train_loss"),
                "eval_loss": metrics.get("eval_loss"),
                "train_runtime": metrics.get("train_runtime"),
                "global_step": metrics.get("global_step"),
            },
            "stopped": callback.stopped,
        }
        if merged_dir is not None:
            completed["merged_dir"] = str(merged_dir)
        self.writer.emit("completed", **completed)
        return final_dir

    def _final_metrics(self) -> dict[str, Any]:
        keep = (
            "train_loss",
            "train_runtime",
            "train_samples_per_second",
            "train_steps_per_second",
            "total_flos",
            "global_step",
            "num_input_tokens_seen",
        )
        metrics = {k: self.train_metrics[k] for k in keep if k in self.train_metrics}
        metrics.update(self.eval_metrics)
        metrics["stopped_early"] = bool(self.callback and self.callback.stopped)
        return metrics

    def _save_merged(self, final_dir: Path, metrics: dict[str, Any]) -> Path:
        """Merge the saved adapter into a fresh copy of the base weights and save it to final/merged."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from workers.training.model_card import write_model_card

        merged_dir = final_dir / "merged"
        # The trained model cannot be merged in place: a QLoRA base is 4-bit, and the trainer patched its
        # forward. A fresh load in the checkpoint's own dtype on CPU also keeps GPU memory out of it.
        self._release_trainer_model()
        base = AutoModelForCausalLM.from_pretrained(self.cfg.base_model, dtype="auto", use_safetensors=True)
        merged = PeftModel.from_pretrained(base, str(final_dir)).merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(merged_dir))
        write_model_card(self.cfg, merged_dir, metrics, extra=self.info, merged=True)
        log.info("saved merged model to %s", merged_dir)
        return merged_dir

    # =============================================================================================== cleanup

    def fail(self, exc: BaseException) -> None:
        """Record a failure in the event log; the caller re-raises so the traceback reaches stderr."""
        self.writer.emit(
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            step=self.trainer.state.global_step if self.trainer is not None else None,
        )

    def cleanup(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self._release_trainer_model()
        self.trainer = None

    # ============================================================================================== helpers

    def _require_trainer(self) -> tuple[SFTTrainer, EventsCallback]:
        if self.trainer is None or self.callback is None:
            raise RuntimeError("SFTRecipe.setup() must run first")
        return self.trainer, self.callback

    def _install_sigterm_handler(self) -> None:
        # SIGTERM (e.g. `docker stop`, Celery revoke) becomes a graceful stop at the end of the current step,
        # like the stop file. A second SIGTERM falls back to the default handler and kills the process.
        if self.callback is None or not _in_main_thread():
            return
        callback = self.callback

        def handler(signum: int, frame: Any) -> None:
            log.warning("SIGTERM received: stopping after the current step")
            callback.request_stop("sigterm")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        self._previous_sigterm = signal.signal(signal.SIGTERM, handler)

    def _release_trainer_model(self) -> None:
        if self.trainer is None:
            return
        import torch

        self.trainer.model = self.trainer.model_wrapped = None  # type: ignore[assignment]
        self.trainer.optimizer = self.trainer.lr_scheduler = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ================================================================================================ building blocks


def _resolve_device(cfg: RunConfig) -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cfg.method == "qlora":
        raise RuntimeError("qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use method 'lora' on CPU")
    if cfg.deepspeed:
        raise RuntimeError("deepspeed needs a CUDA GPU")
    return "cpu"


def _resolve_bf16(value: bool | str) -> bool:
    import torch

    if value == "auto":
        # Emulated bf16 (pre-Ampere GPUs) is slower than fp32, so only native support counts.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(value)


def detect_format(columns: list[str]) -> str:
    for name, required in DATASET_FORMATS.items():
        if all(column in columns for column in required):
            return name
    raise ValueError(f"rows must have 'messages', 'text', or 'prompt' and 'completion' fields; found columns {columns}")


def load_rows(path: str | None, field_name: str) -> tuple[Dataset, str]:
    """Load a JSONL file as a `datasets.Dataset` and return it with its TRL format name."""
    from datasets import load_dataset

    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{field_name}: {path} does not exist")
    try:
        dataset = load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps JSON errors in several exception types
        raise ValueError(f"{field_name}: could not read {path} as JSON lines: {exc}") from exc
    if len(dataset) == 0:
        raise ValueError(f"{field_name}: {path} has no rows")
    try:
        data_format = detect_format(dataset.column_names)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from exc
    return dataset, data_format


def load_tokenizer(base_model: str, *, conversational: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS as pad is harmless here.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if conversational and not getattr(tokenizer, "chat_template", None):
        log.warning("%s has no chat template; using a plain ChatML template", base_model)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_model(cfg: RunConfig, *, bf16: bool) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "attn_implementation": cfg.attn_implementation,
        # Pickled .bin checkpoints can run code on load; only accept safetensors. trust_remote_code is
        # never passed, so it stays False.
        "use_safetensors": True,
    }
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif cfg.method == "lora":
        # The base weights are frozen, so holding them in bf16 halves memory at no accuracy cost; PEFT keeps
        # the adapter itself in fp32.
        kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float32
    else:
        # Full fine-tuning keeps fp32 master weights; bf16 is applied as autocast mixed precision.
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def build_lora_config(cfg: RunConfig):  # -> peft.LoraConfig
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # "all-linear" already excludes the output layer, which TRL refuses to adapt.
        target_modules=cfg.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_sft_config(cfg: RunConfig, *, bf16: bool, has_eval: bool) -> SFTConfig:
    import torch
    from trl import SFTConfig

    eval_during_training = has_eval and cfg.eval_steps is not None
    return SFTConfig(
        output_dir=str(cfg.checkpoints_dir),
        # Optimisation
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        # transformers 5 removed warmup_ratio: a warmup_steps value below 1 is read as a ratio instead.
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        # SFTConfig defaults both to True; the run config decides.
        bf16=bf16,
        fp16=False,
        # transformers 5.23 renamed gradient_checkpointing* to activation_checkpointing*; setting the new
        # names also overrides SFTConfig's gradient_checkpointing=True default without a deprecation warning.
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        deepspeed=cfg.deepspeed,
        # Data
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        assistant_only_loss=cfg.assistant_only_loss,
        # Logging: the events callback is the only reporter. Counting non-padding tokens gives the
        # tokens/s figure; with padding-free packing there is no attention mask and the pad id is used.
        report_to="none",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        # Evaluation and checkpoints
        eval_strategy="steps" if eval_during_training else "no",
        eval_steps=cfg.eval_steps if eval_during_training else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        # Pinned memory only helps host-to-GPU copies (and warns on CPU-only machines).
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _count_params(model: Any) -> int:
    return sum(_numel(p) for p in model.parameters())


def _numel(param: Any) -> int:
    # bitsandbytes packs two 4-bit values per byte, so numel() of a Params4bit is half the real count.
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2
    return param.numel()


def _trainable_and_total(model: Any, total_before_peft: int) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total_before_peft


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# =================================================================================================== entry point


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Keep library chatter to warnings; our own logger and the Trainer's PrinterCallback report progress.
    for name in ("transformers", "trl", "peft", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Progress bars (dataset map, weight loading) are redrawn on stderr, which the supervisor keeps for
    # error reports; the step logs on stdout already show progress.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # Raised inside peft/trl on every model wrap; nothing a config can change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m workers.training.run CONFIG.json", file=sys.stderr)
        return 2
    # Set before huggingface_hub is imported: it reads these once. Telemetry would try the network.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _configure_logging()
    cfg = RunConfig.from_json(argv[0])
    recipe = SFTRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        recipe.save_final()
    except BaseException as exc:
        recipe.fail(exc)
        raise
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
