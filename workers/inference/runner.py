"""The model runner: turns token ids into forwards of the (possibly peft-wrapped) model, for the loop thread.

It holds no batch state: the scheduler owns the running rows and their `PaddedKV`, and hands them in. Every
forward gets left-padded rows (`left_pad`), explicit position ids and one adapter name per row, which
`AdapterCache.forward` routes to the LoRA layers ("__base__" for the base model).

This is the "dynamic" decode path: every decode step re-launches the whole model eagerly, `DynamicCache`
re-concatenates each layer's keys and values (O(batch x length) copies per step) and peft loops over adapter
sub-batches in Python in every LoRA layer. It serves any causal LM. For Llama-family models the engine's default
is the static path (`static/`: preallocated KV slots, stacked LoRA, its own prefill forward, one fixed-shape
step that can be compiled and captured as CUDA graphs); it still scores through this runner. Per-step Python
already trimmed on this path: adapter names reach the LoRA layers through hooks registered once per adapter
change (`adapters.py`), and streaming detokenization calls the Rust decoder directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from workers.inference.adapters import AdapterCache
from workers.inference.kv import PaddedKV, check_supported, new_cache
from workers.inference.request import BASE_ADAPTER
from workers.inference.sampling import RowSampling, Sampled, next_tokens


class ModelRunner:
    """Prefill, decode and scoring forwards of one engine's model (through its `AdapterCache`)."""

    def __init__(self, adapters: AdapterCache, *, device: torch.device, pad_id: int, logits_to_keep: bool) -> None:
        self.adapters = adapters
        self.device = device
        self.pad_id = pad_id
        self._logits_to_keep = logits_to_keep  # the model's forward accepts `logits_to_keep`

    def left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(ids, mask, positions)` of `rows` right-aligned in one (batch, longest) block, on the device.

        Rows are right-aligned so every row's last token is in the last column (where prefill reads its
        logits, and where decode steps append); position ids count real tokens only, so padding never shifts
        a row's positions and a row computes what it would alone.
        """
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, length - len(row) :] = torch.tensor(row)
            mask[index, length - len(row) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
        return ids, mask, positions

    def logits(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        adapters: list[str],
        *,
        cache: DynamicCache | None = None,
        keep: int = 1,
    ) -> torch.Tensor:
        """The model's logits at the last `keep` positions of each row, (batch, keep, vocab), in its dtype.

        With a `cache` the forward extends it (generation); without one it runs without any (scoring).
        """
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if cache is not None:
            kwargs.update(past_key_values=cache, use_cache=True)
        else:
            kwargs["use_cache"] = False
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        output = self.adapters.forward(adapters, **kwargs)
        logits: torch.Tensor = output.logits
        return logits[:, -keep:, :]

    def prefill(
        self,
        prompts: list[list[int]],
        adapters: list[str],
        sampling: list[RowSampling],
        after: PaddedKV | None = None,
    ) -> tuple[Sampled, PaddedKV]:
        """Run `prompts` together into a fresh cache; returns their first tokens and that cache with its mask.
        (`after`, the batch it will join, does not matter here: `PaddedKV.merge` aligns any two caches.)"""
        ids, mask, positions = self.left_pad(prompts)
        cache = new_cache()
        logits = self.logits(ids, mask, positions, adapters, cache=cache)[:, -1, :].float()
        check_supported(cache, ids.shape[1])
        return next_tokens(logits, sampling), PaddedKV(cache, mask)

    def decode(
        self,
        kv: PaddedKV,
        last_tokens: list[int],
        positions: list[int],
        adapters: list[str],
        sampling: list[RowSampling],
        history: Sequence[Sequence[int]] | None = None,
    ) -> Sampled:
        """One step for every row of `kv`: feed each row's last token at its own position, return the next.
        `history`: each row's generated tokens so far (its penalties count them)."""
        ids = torch.tensor([[t] for t in last_tokens], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[p] for p in positions], dtype=torch.long, device=self.device)
        mask = kv.grow()
        logits = self.logits(ids, mask, position_ids, adapters, cache=kv.cache)[:, -1, :].float()
        return next_tokens(logits, sampling, history)

    def probe(self) -> None:
        """Fail at start-up, not on the first request, if the model's cache cannot be batched this way."""
        ids, mask, positions = self.left_pad([[self.pad_id], [self.pad_id, self.pad_id]])
        cache = new_cache()
        self.logits(ids, mask, positions, [BASE_ADAPTER, BASE_ADAPTER], cache=cache)
        check_supported(cache, 2)
