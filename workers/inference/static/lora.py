"""Per-row LoRA for a whole batch in two plain matmuls per projection (the punica/S-LoRA idea in torch ops).

Every loaded adapter owns a slot; for each (layer, projection) the adapters' A matrices sit side by side in one
`[in, slots * rank]` tensor and their B matrices (scaling folded in) stacked in one `[slots * rank, out]`
tensor. A row's delta is `((x @ A_all) * onehot(slot of the row)) @ B_all`: the one-hot keeps only its own
adapter's `rank` columns, so every row gets exactly its adapter's `B(A x) * scaling`, base rows (slot 0, all
zeros) get nothing, and no per-row weights are ever gathered (a gather would copy `rows x in x rank` per
projection and step, more memory traffic than the base weights). The shapes depend only on the capacity, so
the decode step keeps one graph whatever mix of adapters a batch holds; the extra multiply-adds on other
slots' columns are `slots` times a LoRA's, small next to the base projection.

The stacks mirror what the engine's `AdapterCache` has loaded into the peft model (the one source of truth):
`sync` copies the LoRA weights of newly loaded adapters into free slots and clears the slots of removed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from workers.inference.adapters import AdapterMismatch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_SLOT = 0
RANK_STEP = 16  # stacks grow their rank in steps of this (one reallocation, not one per adapter)


class AdapterUnsupported(AdapterMismatch):
    """The adapter adapts modules the static decode path does not (e.g. embeddings or the output head)."""


class LoraStacks(nn.Module):
    """The stacked A/B tensors of every adapted projection; see the module docstring."""

    def __init__(
        self,
        capacity: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        preallocate_for: Sequence[nn.Module] = (),
    ) -> None:
        """`preallocate_for`: decoder layers to allocate rank-`RANK_STEP` stacks for on every projection now, so
        a compiled step has its final shapes before the first adapter arrives (no recompile for it)."""
        super().__init__()
        self.slots = capacity + 1  # slot 0: the base model (zeros)
        self.rank = 0
        self.device, self.dtype = device, dtype
        self.a = nn.ParameterDict()  # "layer__projection" -> [in, slots * rank]
        self.b = nn.ParameterDict()  # "layer__projection" -> [slots * rank, out]
        self.register_buffer("column_slot", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self._slot_of: dict[str, int] = {}
        if preallocate_for:
            keys = {f"{index}__{projection}" for index in range(len(preallocate_for)) for projection in PROJECTIONS}
            self._allocate(preallocate_for, RANK_STEP, keys)

    def slot_ids(self, names: Sequence[str], base: str) -> list[int]:
        """The slot of each row's adapter name (`base`: the base model)."""
        return [BASE_SLOT if name == base else self._slot_of[name] for name in names]

    def adapts(self, layer: int, projection: str) -> bool:
        return f"{layer}__{projection}" in self.a

    def row_mask(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """[B, slots * rank] one-hot of each row's slot, repeated over its rank columns; computed once a step."""
        return (slot_ids[:, None] == self.column_slot[None, :]).to(self.dtype)

    def delta(self, layer: int, projection: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """LoRA delta of `projection` in `layer` for x [B, in] (or [B, T, in] with mask [B, 1, slots*rank])."""
        key = f"{layer}__{projection}"
        return torch.matmul(torch.matmul(x, self.a[key]) * mask, self.b[key])

    def add_grouped_delta(
        self,
        layer: int,
        projection: str,
        x: torch.Tensor,
        out: torch.Tensor,
        groups: Sequence[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:
        """`out` plus the LoRA delta of `projection` in `layer`, for x [B, T, in] whose rows `groups` assigns to
        slots (`(slot, row indices)`, base rows left out). For prefill: with many tokens per row, each adapter's
        own `rank` columns over its rows cost less than every slot's columns times a mask over all rows."""
        key = f"{layer}__{projection}"
        if not groups or key not in self.a:
            return out
        a, b = self.a[key], self.b[key]
        for slot, rows in groups:
            columns = slice(slot * self.rank, (slot + 1) * self.rank)
            delta = torch.matmul(torch.matmul(x.index_select(0, rows), a[:, columns]), b[columns])
            out = out.index_add(0, rows, delta)
        return out

    def sync(self, decoder_layers: Sequence[nn.Module], loaded: Sequence[str]) -> None:
        """Make the slots hold exactly the adapters in `loaded`, reading their weights from the peft layers."""
        for name in [n for n in self._slot_of if n not in loaded]:
            self._clear(self._slot_of.pop(name))
        new = [name for name in loaded if name not in self._slot_of]
        if not new:
            return
        weights = {name: _lora_weights(decoder_layers, name) for name in new}
        rank = max((lora_a.shape[0] for found in weights.values() for lora_a, _, _ in found.values()), default=0)
        targets = {key for found in weights.values() for key in found}
        if rank > self.rank or not targets <= set(self.a):
            # Reallocate once for the larger rank / new projections and reload everything already here.
            keep = [name for name in loaded if name in self._slot_of]
            self._allocate(decoder_layers, -(-max(rank, self.rank) // RANK_STEP) * RANK_STEP, targets | set(self.a))
            self._slot_of = {}
            weights.update({name: _lora_weights(decoder_layers, name) for name in keep})
            new = keep + new
        free = [slot for slot in range(1, self.slots) if slot not in self._slot_of.values()]
        if len(new) > len(free):
            raise RuntimeError(f"{len(new)} adapters to place but only {len(free)} free LoRA slots")
        for name, slot in zip(new, free, strict=False):
            self._place(slot, weights[name])
            self._slot_of[name] = slot

    def _allocate(self, decoder_layers: Sequence[nn.Module], rank: int, keys: set[str]) -> None:
        self.rank = rank
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for key in sorted(keys):
            layer, projection = key.split("__", 1)
            base = _base_linear(decoder_layers[int(layer)], projection)
            width = self.slots * rank
            self.a[key] = _frozen(torch.zeros(base.in_features, width, device=self.device, dtype=self.dtype))
            self.b[key] = _frozen(torch.zeros(width, base.out_features, device=self.device, dtype=self.dtype))
        self.column_slot = torch.arange(self.slots * rank, device=self.device) // rank

    def _place(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self._clear(slot)
        start = slot * self.rank
        with torch.no_grad():
            for key, (lora_a, lora_b, scaling) in weights.items():
                rank = lora_a.shape[0]
                self.a[key][:, start : start + rank].copy_(lora_a.T)
                self.b[key][start : start + rank, :].copy_(lora_b.T * scaling)

    def _clear(self, slot: int) -> None:
        start = slot * self.rank
        with torch.no_grad():
            for key in self.a:
                self.a[key][:, start : start + self.rank].zero_()
                self.b[key][start : start + self.rank, :].zero_()


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    # A parameter, not a plain tensor: compiled graphs treat parameters as fixed addresses (no copy per replay).
    return nn.Parameter(tensor, requires_grad=False)


def projection_module(layer: Any, projection: str) -> Any:
    """The module of `projection` in a Llama-family decoder layer (attention or MLP), None if it has none."""
    owner = layer.self_attn if projection in PROJECTIONS[:4] else layer.mlp
    return getattr(owner, projection, None)


def _base_linear(layer: nn.Module, projection: str) -> nn.Linear:
    module = projection_module(layer, projection)
    base = getattr(module, "base_layer", module)
    assert isinstance(base, nn.Linear)
    return base


def _lora_weights(
    decoder_layers: Sequence[nn.Module], name: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """`{"layer__projection": (lora_A [r, in], lora_B [out, r], scaling)}` of adapter `name` in the peft model."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for index, layer in enumerate(decoder_layers):
        for projection in PROJECTIONS:
            module = projection_module(layer, projection)
            lora_a = getattr(module, "lora_A", None) or {}
            if name in lora_a:
                found[f"{index}__{projection}"] = (
                    lora_a[name].weight,
                    module.lora_B[name].weight,
                    float(module.scaling[name]),
                )
    return found


def check_adapter_targets(model: nn.Module, name: str) -> None:
    """Raise `AdapterUnsupported` if adapter `name` adapts anything but the decoder layers' linear projections."""
    for module_name, module in model.named_modules():
        adapted = name in (getattr(module, "lora_A", None) or {}) or name in (
            getattr(module, "lora_embedding_A", None) or {}
        )
        if adapted and module_name.rsplit(".", 1)[-1] not in PROJECTIONS:
            raise AdapterUnsupported(
                f"adapter {name!r} adapts {module_name}; the static decode path serves LoRA on the decoder's "
                "linear projections only (serve it with inference.decode = dynamic)"
            )
        if name in (getattr(module, "modules_to_save", None) or {}):
            raise AdapterUnsupported(
                f"adapter {name!r} replaces {module_name} (modules_to_save); the static decode path cannot mix it "
                "per row (serve it with inference.decode = dynamic)"
            )
