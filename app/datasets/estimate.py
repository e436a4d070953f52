"""Estimates of a run's peak accelerator memory and time per epoch, from the model's config.json and the
training shape; stated as estimates, with every input they used.

Memory (bytes) is the sum of:
- weights: every parameter at its storage width (bf16 on a GPU, fp32 on CPU; 4-bit NF4 plus its
  block scales for QLoRA);
- trainable state: each trained parameter's fp32 copy, gradient and two AdamW moments (16 bytes), for
  the LoRA matrices only, or for every weight in a full fine-tune;
- activations: what autograd keeps for the backward of one micro-batch: per token and layer, the inputs
  of the norms, projections and MLP (about 10 x hidden + 4 x intermediate values; one hidden-wide value
  with gradient checkpointing), plus the logits with their float32 log-softmax and gradient (3 x vocab
  floats per token), which for small models is the largest term. Attention is SDPA (no seq^2 term).
Framework overhead (CUDA context, allocator caching) is not included.

Time per epoch is tokens / throughput, where throughput comes from config/throughput.yaml for the GPU
class and method, scaled by the ratio of parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

THROUGHPUT_TABLE = Path(__file__).resolve().parents[2] / "config" / "throughput.yaml"
GIB = 1 << 30
ADAMW_STATE_BYTES = 16  # fp32 weight copy + gradient + two moments
NF4_BYTES = 0.5 + 4 / 64  # 4 bits, plus an fp32 absmax per 64-value block (before double quantisation)
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingShape:
    """What of a run the estimate depends on (defaults: the default recipe's)."""

    method: str = "lora"
    batch_size: int = 4
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] | None = None  # None: all linear layers
    gradient_checkpointing: bool = False
    gpu_class: str = "cpu"
    cuda: bool = False


def model_shape(model_dir: Path) -> dict[str, int] | None:
    """The dimensions a Llama-family config.json gives, or None when there is none to read."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return {
            "hidden": hidden,
            "layers": int(config["num_hidden_layers"]),
            "intermediate": int(config.get("intermediate_size", 4 * hidden)),
            "vocab": int(config["vocab_size"]),
            "kv_dim": int(config.get("num_key_value_heads", heads)) * int(config.get("head_dim", hidden // heads)),
            "q_dim": heads * int(config.get("head_dim", hidden // heads)),
            "tied": int(bool(config.get("tie_word_embeddings", False))),
        }
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _linears(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    h, i = s["hidden"], s["intermediate"]
    return {
        "q_proj": (h, s["q_dim"]),
        "k_proj": (h, s["kv_dim"]),
        "v_proj": (h, s["kv_dim"]),
        "o_proj": (s["q_dim"], h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def parameter_count(s: dict[str, int]) -> int:
    per_layer = sum(a * b for a, b in _linears(s).values()) + 2 * s["hidden"]
    embeddings = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    return s["layers"] * per_layer + embeddings + s["hidden"]


def estimate(
    model_dir: Path, shape: TrainingShape, *, max_seq_length: int, tokens_per_epoch: int | None
) -> dict[str, Any] | None:
    s = model_shape(model_dir)
    if s is None:
        return None
    params = parameter_count(s)
    linears = _linears(s)
    targets = shape.lora_target_modules or LORA_LINEARS
    lora_params = s["layers"] * sum(shape.lora_r * (a + b) for name, (a, b) in linears.items() if name in targets)
    weight_bytes = 2 if shape.cuda else 4
    if shape.method == "qlora":
        linear_params = s["layers"] * sum(a * b for a, b in linears.values())
        weights = linear_params * NF4_BYTES + (params - linear_params) * weight_bytes
    else:
        weights = params * weight_bytes
    trainable = params if shape.method == "full" else lora_params
    state = trainable * ADAMW_STATE_BYTES
    tokens = shape.batch_size * max_seq_length
    per_token_layer = s["hidden"] if shape.gradient_checkpointing else 10 * s["hidden"] + 4 * s["intermediate"]
    activations = tokens * (s["layers"] * per_token_layer * weight_bytes + 3 * s["vocab"] * 4)
    total = weights + state + activations
    result: dict[str, Any] = {
        "is_estimate": True,
        "peak_memory_bytes": int(total),
        "peak_memory_gib": round(total / GIB, 3),
        "breakdown_bytes": {"weights": int(weights), "trainable_state": int(state), "activations": int(activations)},
        "parameters": params,
        "trainable_parameters": trainable,
        "inputs": {**asdict(shape), "max_seq_length": max_seq_length, "weight_bytes": weight_bytes},
        "assumptions": (
            "AdamW with fp32 states for trained weights; SDPA attention (no seq^2 term); framework "
            "overhead (CUDA context, allocator caching) not included; DeepSpeed ZeRO would divide the "
            "trainable state across GPUs"
        ),
    }
    rate = _throughput(shape.gpu_class, shape.method)
    if rate is not None and tokens_per_epoch:
        per_second = rate["tokens_per_s"] * rate["params"] / params
        result["seconds_per_epoch"] = round(tokens_per_epoch / per_second, 1)
        result["throughput"] = {**rate, "scaled_tokens_per_s": round(per_second, 1)}
    return result


def _throughput(gpu_class: str, method: str) -> dict[str, Any] | None:
    if not THROUGHPUT_TABLE.is_file():
        return None
    rows = yaml.safe_load(THROUGHPUT_TABLE.read_text(encoding="utf-8")) or []
    for row in rows:
        if row.get("gpu_class") == gpu_class and row.get("method") == method:
            return {k: row[k] for k in ("gpu_class", "method", "params", "tokens_per_s", "source")}
    return None
