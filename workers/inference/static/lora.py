"""Per-row LoRA as gathered batched matmuls (the punica/S-LoRA BGMV idea in torch ops).

Adapters live in fixed-capacity tensors so the decode step has one shape whatever mix of
adapters a batch holds: slot 0 is the zero adapter that base-model rows point at.
"""

from __future__ import annotations

import torch


class StackedLora:
    """One target module's adapters: A [slots, in, r], B [slots, r, out], scaling [slots]."""

    def __init__(self, slots: int, in_features: int, out_features: int, max_rank: int, dtype: torch.dtype) -> None:
        # Zero-initialised so slot 0 (base rows) and unused slots add exactly nothing.
        self.a = torch.zeros(slots, in_features, max_rank, dtype=dtype)
        self.b = torch.zeros(slots, max_rank, out_features, dtype=dtype)
        self.scaling = torch.zeros(slots, dtype=dtype)

    def load(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Copy peft weights (lora_A [r, in], lora_B [out, r]) into `slot`, zero-padding rank."""
        if slot == 0:
            raise ValueError("slot 0 is the zero adapter for base rows")
        rank = lora_a.shape[0]
        if rank > self.a.shape[2]:
            raise ValueError(f"adapter rank {rank} exceeds max rank {self.a.shape[2]}")
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :, :rank].copy_(lora_a.T)
        self.b[slot, :rank, :].copy_(lora_b.T)
        self.scaling[slot] = scaling

    def delta(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """LoRA delta for x [rows, tokens, in] with one adapter id per row; no Python per row."""
        return bgmv(x, self.a, self.b, self.scaling, adapter_ids)


def bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """Gather each row's A/B and apply them with two batched matmuls: (x @ A_i) @ B_i * s_i."""
    shrunk = torch.bmm(x, a.index_select(0, adapter_ids))
    expanded = torch.bmm(shrunk, b.index_select(0, adapter_ids))
    return expanded * scaling.index_select(0, adapter_ids).view(-1, 1, 1)
