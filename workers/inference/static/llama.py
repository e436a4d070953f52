"""A functional decode forward for Llama-family models over static KV slots and stacked LoRA.

One call decodes one token for rows `0..B-1` of the slot cache: embed -> every decoder layer (RMSNorm, q/k/v
projections with the gathered per-row LoRA delta, optional q/k norms, RoPE from a precomputed table, the new
keys/values written in place at each row's position, grouped-query attention over the first `L` columns of
each row, output projection, gated MLP) -> final norm -> logits. Every shape depends only on `(B, L)`, no
tensor is allocated outside the graph's own intermediates, and nothing reads back to the host, so the call
traces whole under `torch.compile(fullgraph=True)` and can be captured as a CUDA graph.

It reuses the Hugging Face model's own weights and norm/activation modules (no copy), so it serves exactly the
model the prefill path (`runner.py`) runs. `unsupported_reason` says which configurations it covers: Llama,
Mistral, Qwen2 and Qwen3 shapes (grouped-query attention, biases, q/k norms, full or sliding-window layers,
any RoPE variant whose table depends on the position only, tied or untied output heads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.inference.static.lora import PROJECTIONS, LoraStacks, projection_module

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# RoPE variants whose cos/sin depend on the position alone; "dynamic" (and longrope) rescale with the length.
_STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})


def unsupported_reason(model: nn.Module) -> str | None:
    """None when `model` can run on the static decode path, else why not (logged by the engine's fallback)."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type not in _STATIC_ROPE:
        return f"RoPE type {rope_type!r} depends on the sequence length"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or getattr(model, "lm_head", None) is None:
        return "the model has no .model.layers / .lm_head"
    if getattr(config, "hidden_act", "silu") not in {"silu", "gelu", "gelu_pytorch_tanh", "relu"}:
        return f"activation {config.hidden_act!r}"
    for layer in layers:
        for name in PROJECTIONS:
            if not isinstance(_base(projection_module(layer, name)), nn.Linear):
                return f"decoder layer has no linear {name}"
    return None


def _base(module: Any) -> Any:
    """The plain layer under a peft LoRA wrapper (peft keeps the original module as `base_layer`)."""
    return getattr(module, "base_layer", module)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticLayer(nn.Module):
    """One decoder layer's weights, shared with the Hugging Face model (never copied)."""

    def __init__(self, layer: Any, window: int | None) -> None:
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.projections = nn.ModuleDict({name: _base(projection_module(layer, name)) for name in PROJECTIONS})
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)
        self.act = mlp.act_fn
        self.window = window  # sliding-window size of this layer, None for full attention


class StaticLlama(nn.Module):
    """The decode forward of a Llama-family `model`; see the module docstring. `max_len` bounds positions."""

    def __init__(self, model: Any, max_len: int) -> None:
        # `max_len`: positions the RoPE table covers (the slot store may hold a spare column past it).
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(reason)
        config: Any = model.config
        inner: Any = model.model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scale = self.head_dim**-0.5
        self.max_len = max_len
        window = getattr(config, "sliding_window", None)
        # Without layer_types (Mistral) a configured window applies to every layer, as in transformers.
        default_kind = "sliding_attention" if window else "full_attention"
        layer_types = getattr(config, "layer_types", None) or [default_kind] * len(inner.layers)
        self.layers = nn.ModuleList(
            StaticLayer(layer, window if kind == "sliding_attention" and window else None)
            for layer, kind in zip(inner.layers, layer_types, strict=True)
        )
        self.embed = _base(inner.embed_tokens)
        self.norm = inner.norm
        self.lm_head = _base(model.lm_head)
        weight = self.embed.weight
        with torch.no_grad():
            # The model's own rotary module gives the table, so every static RoPE variant matches it exactly.
            positions = torch.arange(max_len, device=weight.device)[None]
            probe = torch.zeros(1, max_len, self.head_dim, device=weight.device, dtype=weight.dtype)
            cos, sin = inner.rotary_emb(probe, positions)
        if cos.shape[-1] != self.head_dim:
            raise NotImplementedError(f"partial rotary embedding ({cos.shape[-1]} of {self.head_dim} dims)")
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", cos[0].contiguous(), persistent=False)
        self.register_buffer("sin", sin[0].contiguous(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        tokens: torch.Tensor,
        positions: torch.Tensor,
        columns: torch.Tensor,
        lora: LoraStacks | None = None,
        adapter_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32, [B, vocab]) for `tokens` [B] at `positions` [B]; rows are slot rows 0..B-1 of the
        per-layer `keys`/`values` ([rows, kv_heads, max_len, head_dim] each), attending to their first L columns
        (`columns` = 0..L-1). The new keys/values are written with `index_put_` on the whole per-layer
        tensors: mutating a view of a graph input would make the compiled graph copy the entire cache every step."""
        rows = tokens.shape[0]
        cos = self.cos.index_select(0, positions)[:, None, :]
        sin = self.sin.index_select(0, positions)[:, None, :]
        length = columns.shape[0]
        causal = columns[None, :] <= positions[:, None]  # [B, L]
        slot_rows = torch.arange(rows, device=tokens.device)[:, None]
        head_index = torch.arange(self.kv_heads, device=tokens.device)[None, :]
        write_at = (slot_rows, head_index, positions[:, None])
        mask = lora.row_mask(adapter_ids) if lora is not None and adapter_ids is not None else None
        x = self.embed(tokens)
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, StaticLayer)

            def project(
                name: str, inputs: torch.Tensor, layer: StaticLayer = layer, index: int = index
            ) -> torch.Tensor:
                out: torch.Tensor = layer.projections[name](inputs)
                if lora is not None and mask is not None and lora.adapts(index, name):
                    out = out + lora.delta(index, name, inputs, mask)
                return out

            h = layer.input_norm(x)
            q = project("q_proj", h).view(rows, self.heads, self.head_dim)
            k = project("k_proj", h).view(rows, self.kv_heads, self.head_dim)
            v = project("v_proj", h).view(rows, self.kv_heads, self.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[index].index_put_(write_at, k)
            values[index].index_put_(write_at, v)
            past_keys = keys[index][:rows, :, :length]  # [B, kv_heads, L, head_dim], a view
            past_values = values[index][:rows, :, :length]
            allowed = (
                causal if layer.window is None else causal & (columns[None, :] > positions[:, None] - layer.window)
            )
            # One query per head, against its row's first L columns. The query heads that share a KV head (GQA:
            # heads kv * group .. kv * group + group - 1, as transformers' repeat_kv orders them) go in as that KV
            # head's `group` queries, so each row's keys and values are read once, not once per query head
            # (`enable_gqa` does the latter: ~1.5x the time on CPU at 2 query heads per KV head).
            attended = F.scaled_dot_product_attention(
                q.view(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim),
                past_keys,
                past_values,
                attn_mask=allowed[:, None, None, :],
                scale=self.scale,
            ).reshape(rows, self.heads * self.head_dim)
            x = x + project("o_proj", attended)
            h = layer.post_norm(x)
            gated = layer.act(project("gate_proj", h)) * project("up_proj", h)
            x = x + project("down_proj", gated)
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits.float()

    def prefill(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        tokens: torch.Tensor,
        last: torch.Tensor,
        rows_at: int | torch.Tensor,
        lora: LoraStacks | None = None,
        groups: Sequence[tuple[int, torch.Tensor]] = (),
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32, [B, vocab]) after each row's prompt. `tokens` [B, T] holds row b's prompt in its first
        `last[b] + 1` columns (the rest is padding, any token); its keys/values go to columns 0..T-1 of slot row
        `rows_at + b` (an int), or of slot row `rows_at[b]` (a tensor: the compiled form, which writes with
        `index_put_` on the whole per-layer tensors, as `forward` does). Columns past a prompt get the padding's
        keys/values, which no decode step reads: a step writes its row's position before attending to it and
        masks every column after it.

        Rows are left-aligned, so every row sees positions 0..T-1 and plain causal attention is exact for its
        prompt. `lora` adds each row's adapter delta: with `groups` (`(slot, rows)` per adapter in the batch)
        per adapter over its rows (`LoraStacks.add_grouped_delta`, eager), with `mask` ([B, 1, slots * rank],
        `LoraStacks.row_mask`) as the decode step does (one graph whatever the mix, compiled)."""
        rows, width = tokens.shape
        cos = self.cos[:width][None, :, None, :]  # [1, T, 1, head_dim]
        sin = self.sin[:width][None, :, None, :]
        if not isinstance(rows_at, int):  # [B, kv_heads, T] indices of every key/value this prefill writes
            head_index = torch.arange(self.kv_heads, device=tokens.device)[None, :, None]
            write_at = (rows_at[:, None, None], head_index, torch.arange(width, device=tokens.device))
        x = self.embed(tokens)
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, StaticLayer)

            def project(
                name: str, inputs: torch.Tensor, layer: StaticLayer = layer, index: int = index
            ) -> torch.Tensor:
                out: torch.Tensor = layer.projections[name](inputs)
                if lora is not None and mask is not None:
                    if lora.adapts(index, name):
                        out = out + lora.delta(index, name, inputs, mask)
                elif lora is not None:
                    out = lora.add_grouped_delta(index, name, inputs, out, groups)
                return out

            h = layer.input_norm(x)
            q = project("q_proj", h).view(rows, width, self.heads, self.head_dim)
            k = project("k_proj", h).view(rows, width, self.kv_heads, self.head_dim)
            v = project("v_proj", h).view(rows, width, self.kv_heads, self.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q = (q * cos + _rotate_half(q) * sin).transpose(1, 2)  # [B, heads, T, head_dim]
            k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
            v = v.transpose(1, 2)
            if isinstance(rows_at, int):
                keys[index][rows_at : rows_at + rows, :, :width].copy_(k)
                values[index][rows_at : rows_at + rows, :, :width].copy_(v)
            else:
                keys[index].index_put_(write_at, k)
                values[index].index_put_(write_at, v)
            window_mask = None
            if layer.window is not None:
                query = torch.arange(width, device=tokens.device)[:, None]
                column = torch.arange(width, device=tokens.device)[None, :]
                window_mask = (column <= query) & (column > query - layer.window)
            attended = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=window_mask,
                is_causal=window_mask is None,
                scale=self.scale,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + project("o_proj", attended.transpose(1, 2).reshape(rows, width, self.heads * self.head_dim))
            h = layer.post_norm(x)
            gated = layer.act(project("gate_proj", h)) * project("up_proj", h)
            x = x + project("down_proj", gated)
        final = x[torch.arange(rows, device=tokens.device), last]  # [B, hidden]: each row's last prompt token
        logits: torch.Tensor = self.lm_head(self.norm(final))
        return logits.float()
