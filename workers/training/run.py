"""Training child process: one supervised fine-tuning run described by a `RunConfig` JSON file.

    python -m workers.training.run CONFIG.json

A torchtune-style recipe: `setup()` loads data, tokenizer and model and builds TRL's `SFTTrainer`,
`train()` runs it, `save_final()` writes the deliverable to `output_dir/final`, `cleanup()` releases
resources. Progress goes to `events_file` as JSON lines (see `callbacks.py`) and to stdout as text.

This module runs alone on a GPU machine that only has the training stack (and pydantic) installed, so of the
studio it imports only the contracts (`app.core.contracts`, checked by tests/test_layers.py), and
torch/transformers/trl/peft are imported inside functions to keep `import` cheap.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.contracts.events import Completed, Failed
from app.core.contracts.training import RunConfig
from workers.training import components

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from trl import DPOTrainer, SFTTrainer

    from workers.training.callbacks import EventsCallback, EventWriter

log = logging.getLogger("workers.training.run")


class SFTRecipe:
    """Fine-tuning of a causal LM with LoRA, QLoRA or all weights: supervised (TRL's SFTTrainer) or on
    preferences (TRL's DPOTrainer), with the same events, checkpoints, stop and resume."""

    def __init__(self, cfg: RunConfig) -> None:
        from workers.training.callbacks import EventWriter, is_main_process

        self.cfg = cfg
        self.is_main = is_main_process()
        self.writer: EventWriter = EventWriter(cfg.events_file or "", enabled=self.is_main)
        self.trainer: SFTTrainer | DPOTrainer | None = None
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
        device = components.resolve_device(cfg)
        # Checked before the expensive loading below so a bad path fails in a second.
        resume = cfg.resume_from_checkpoint
        if resume is not None and not Path(resume, "trainer_state.json").is_file():
            raise ValueError(f"resume_from_checkpoint: {resume} is not a trainer checkpoint directory")
        bf16 = components.resolve_bf16(cfg.bf16)
        set_seed(cfg.seed)
        log.info("run %s: %s fine-tune of %s on %s", cfg.experiment_name, cfg.method, cfg.base_model, device)

        train_rows, data_format = components.load_rows(cfg.train_file, "train_file")
        eval_rows = components.load_rows(cfg.eval_file, "eval_file")[0] if cfg.eval_file else None
        dpo = cfg.objective == "dpo"
        if dpo != (data_format == "preference"):
            raise ValueError(f"train_file: objective {cfg.objective} cannot train on {data_format} rows")
        conversational = data_format == "messages" or (dpo and isinstance(train_rows[0]["prompt"], list))
        tokenizer = self.tokenizer = components.load_tokenizer(cfg.base_model, conversational=conversational)
        if dpo:  # DPOTrainer tokenizes its (prompt, chosen, rejected) rows itself
            train_dataset, eval_dataset = train_rows, eval_rows
        else:
            train_dataset = components.tokenize_rows(
                train_rows, data_format, tokenizer, train_on_prompt=cfg.train_on_prompt, field_name="train_file"
            )
            eval_dataset = None
            if eval_rows is not None:
                eval_dataset = components.tokenize_rows(
                    eval_rows, data_format, tokenizer, train_on_prompt=cfg.train_on_prompt, field_name="eval_file"
                )
        # The trainer config must exist before the model is loaded: with DeepSpeed ZeRO-3 it installs the hook
        # that partitions weights while they are created.
        build_config = components.build_dpo_config if dpo else components.build_sft_config
        args = build_config(cfg, bf16=bf16, has_eval=eval_dataset is not None)
        model = components.load_model(cfg, bf16=bf16)
        total_before_peft = components.count_params(model)
        # Trainer overwrites config.use_cache with TrainingArguments.use_cache (False) and that would be
        # saved with the final model, slowing generation; remember the model's own setting.
        self._use_cache = getattr(model.config, "use_cache", None)

        from trl import DPOTrainer, SFTTrainer

        from workers.training.callbacks import EventsCallback
        from workers.training.masks import trained_share
        from workers.training.token_stats import summarize

        self.callback = EventsCallback(self.writer, cfg.stop_file)
        self.callback.count_loss_tokens = not dpo
        trainer_class: Any = DPOTrainer if dpo else SFTTrainer  # same constructor for what is passed here
        self.trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=components.build_lora_config(cfg) if cfg.uses_adapter else None,
            callbacks=[self.callback],
        )
        trainable, total = components.trainable_and_total(self.trainer.model, total_before_peft)
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
            "objective": cfg.objective,
        }
        if not dpo:
            self.info |= {
                "train_tokens": summarize([len(ids) for ids in train_dataset["input_ids"]], cfg.max_seq_length),
                # What the loss sees: answers only unless train_on_prompt (a share of all tokens, before packing).
                "train_on_prompt": cfg.train_on_prompt,
                "loss_tokens": trained_share(train_dataset["labels"]),
            }
        if not dpo and (over := self.info["train_tokens"]["rows_over_max_seq_length"]):
            log.warning(
                "%d of %d train rows are longer than max_seq_length=%d and will be cut",
                over,
                len(train_dataset),
                cfg.max_seq_length,
            )
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

    def _final_eval_metrics(self, trainer: SFTTrainer | DPOTrainer) -> dict[str, Any]:
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
        if callback.interrupted:
            # Not a deliverable: the next attempt resumes from the checkpoint written at the stop step.
            log.info(
                "interrupted (%s) at step %d: not saving a final model", callback.stop_reason, callback.stopped_at_step
            )
            return None
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
        summary = {k: metrics.get(k) for k in ("train_loss", "eval_loss", "train_runtime", "global_step")}
        self.writer.write(
            Completed(
                final_dir=str(final_dir),
                metrics=summary,
                stopped=callback.stopped,
                merged_dir=str(merged_dir) if merged_dir is not None else None,
            )
        )
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
        step = self.trainer.state.global_step if self.trainer is not None else None
        self.writer.write(Failed.from_exception(exc, step=step))

    def cleanup(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self._release_trainer_model()
        self.trainer = None

    # ============================================================================================== helpers

    def _require_trainer(self) -> tuple[SFTTrainer | DPOTrainer, EventsCallback]:
        if self.trainer is None or self.callback is None:
            raise RuntimeError("SFTRecipe.setup() must run first")
        return self.trainer, self.callback

    def _install_sigterm_handler(self) -> None:
        # SIGTERM (e.g. `docker stop`, Celery revoke) becomes a graceful stop at the end of the current step,
        # like the stop file. A second SIGTERM falls back to the default handler and kills the process.
        if self.callback is None or not components.in_main_thread():
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
