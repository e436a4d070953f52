"""Loading a base model and its tokenizer, and reading what the engine needs to know about them.

Everything here runs once, when an `InferenceEngine` starts; the loop never comes back to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A base model on its device, in eval mode, with its tokenizer and the facts the engine reads off them."""

    model: PreTrainedModel
    tokenizer: Any
    max_context: int
    vocab_size: int
    eos: frozenset[int]
    pad_id: int
    logits_to_keep: bool  # the forward takes `logits_to_keep`
    model_type: str
    parameters: int
    parameter_bytes: int
    backend_decode: Callable[..., str] | None  # see `backend_decode`


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(model_path: Path, *, device: torch.device, dtype: torch.dtype, max_context: int | None) -> LoadedModel:
    """Load the tokenizer and safetensors weights of `model_path` (no remote code) onto `device`."""
    tokenizer: Any = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        model_path, use_safetensors=True, dtype=dtype, trust_remote_code=False
    )
    base = base.to(device).eval()  # type: ignore[arg-type]  # transformers types `to` oddly
    base.requires_grad_(False)  # serving only; also what peft sets when it wraps the model (no recompile then)
    eos = eos_ids(base, tokenizer)
    pad = tokenizer.pad_token_id
    return LoadedModel(
        model=base,
        tokenizer=tokenizer,
        max_context=max_context or context_length(base, tokenizer),
        vocab_size=int(base.config.get_text_config(decoder=True).vocab_size),
        eos=eos,
        pad_id=int(pad if pad is not None else min(eos, default=0)),
        # Computing logits only for the last position saves a (prompt x vocab) tensor per prefill.
        logits_to_keep="logits_to_keep" in set(inspect.signature(base.forward).parameters),
        model_type=str(getattr(base.config, "model_type", "") or ""),
        parameters=sum(p.numel() for p in base.parameters()),
        parameter_bytes=sum(p.numel() * p.element_size() for p in base.parameters()),
        backend_decode=backend_decode(tokenizer),
    )


def context_length(model: PreTrainedModel, tokenizer: Any) -> int:
    text_config = model.config.get_text_config(decoder=True)
    length = getattr(text_config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    fallback = getattr(tokenizer, "model_max_length", None)
    if isinstance(fallback, int) and 0 < fallback < 10_000_000:
        return fallback
    raise ValueError("cannot tell the model's context length; pass max_context")


def eos_ids(model: PreTrainedModel, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def backend_decode(tokenizer: Any) -> Callable[..., str] | None:
    """The Rust `tokenizers.Tokenizer.decode` behind a fast tokenizer, when calling it directly is equivalent.

    `TokenizersBackend.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` only converts
    its input and calls the Rust decoder; skipping that wrapper (`to_py_obj`, kwargs handling) takes about two
    thirds off each call, which adds up to ~1 ms per decode step at batch 64. Tokenizer classes that override
    `decode`/`_decode` keep going through them.
    """
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the generic path is always correct
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is TokenizersBackend.decode
        and cls._decode is TokenizersBackend._decode
        and isinstance(backend, Tokenizer)
    ):
        return backend.decode  # type: ignore[no-any-return]
    return None
