"""Building blocks of the training recipe (`run.py`): device and precision, data, tokenizer, model,
LoRA and trl configs, parameter counts. Each returns one object; torch, transformers, trl and peft are
imported inside them, so importing this module stays cheap."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.chat_spans import FALLBACK_CHAT_TEMPLATE
from app.core.contracts.training import RunConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DPOConfig, SFTConfig

log = logging.getLogger("workers.training.run")

DATASET_FORMATS = {
    "messages": ("messages",),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}


def resolve_device(cfg: RunConfig) -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cfg.method == "qlora":
        raise RuntimeError("qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use method 'lora' on CPU")
    if cfg.deepspeed:
        raise RuntimeError("deepspeed needs a CUDA GPU")
    return "cpu"


def resolve_bf16(value: bool | str) -> bool:
    import torch

    if value == "auto":
        # Emulated bf16 (pre-Ampere GPUs) is slower than fp32, so only native support counts.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(value)


def detect_format(columns: list[str]) -> str:
    for name, required in DATASET_FORMATS.items():
        if all(column in columns for column in required):
            return name
    raise ValueError(
        "rows must have 'messages', 'text', 'prompt' and 'completion', or 'prompt', 'chosen' and 'rejected' "
        f"fields; found columns {columns}"
    )


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


def tokenize_rows(
    dataset: Dataset, data_format: str, tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool, field_name: str
) -> Dataset:
    """Rows → `input_ids` + `labels` (what the loss sees: `masks.py`); trl trains on them as they are."""
    from app.core.chat_spans import SpansNotFound
    from workers.training.masks import tokenize_row

    def tokenize(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return tokenize_row(row, data_format, tokenizer, train_on_prompt=train_on_prompt)
        except SpansNotFound as exc:
            raise ValueError(f"{field_name} row {index + 1}: {exc}") from None

    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names)


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
    from trl import SFTConfig

    return SFTConfig(**_trainer_args(cfg, bf16=bf16, has_eval=has_eval), packing=cfg.packing)


def build_dpo_config(cfg: RunConfig, *, bf16: bool, has_eval: bool) -> DPOConfig:
    """DPO on (prompt, chosen, rejected) rows: the same optimisation, logging and checkpoints as SFT, plus
    beta. With an adapter, the reference model is the base with the adapter disabled (no second copy)."""
    from trl import DPOConfig

    return DPOConfig(**_trainer_args(cfg, bf16=bf16, has_eval=has_eval), beta=cfg.dpo_beta)


def _trainer_args(cfg: RunConfig, *, bf16: bool, has_eval: bool) -> dict[str, Any]:
    """What SFTConfig and DPOConfig share."""
    import torch

    eval_during_training = has_eval and cfg.eval_steps is not None
    return dict(
        output_dir=str(cfg.checkpoints_dir),
        # Optimisation
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler,
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
        # Without a GPU, transformers runs each process of an `accelerate launch` group on its own
        # (NOT_PARALLEL) unless told it is a CPU run: then the processes train as one DDP group over gloo.
        use_cpu=not torch.cuda.is_available(),
    )


def count_params(model: Any) -> int:
    return sum(_numel(p) for p in model.parameters())


def _numel(param: Any) -> int:
    # bitsandbytes packs two 4-bit values per byte, so numel() of a Params4bit is half the real count.
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2
    return param.numel()


def trainable_and_total(model: Any, total_before_peft: int) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total_before_peft


def in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
