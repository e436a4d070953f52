"""Choosing each row's next token: greedy, or temperature + top-p with a per-request random generator.

Reproducibility per request, whatever else is in the batch: each sampling row draws exactly one uniform
number per step from its own CPU `torch.Generator` and turns it into a token by inverse-CDF over the
nucleus. The draw never depends on the batch (unlike `torch.multinomial` on a batched tensor), the same
seed gives the same text on CPU and GPU, and the rest of the computation stays vectorized on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Sampled = tuple[list[int], list[float]]  # each row's token and its log-probability


@dataclass(frozen=True, slots=True)
class RowSampling:
    """One row's sampling settings; `generator` is None exactly when the row is greedy (temperature 0)."""

    temperature: float
    top_p: float
    generator: torch.Generator | None

    @classmethod
    def create(cls, temperature: float, top_p: float, seed: int | None) -> RowSampling:
        if temperature == 0:
            return cls(0.0, top_p, None)
        generator = torch.Generator()  # CPU on purpose, see the module docstring
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return cls(temperature, top_p, generator)


def next_tokens(logits: torch.Tensor, rows: Sequence[RowSampling]) -> tuple[list[int], list[float]]:
    """Pick one token per row of float32 `logits` (batch, vocab); returns the tokens and their log-probabilities
    under the model's distribution. One device->host sync in total."""
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.generator is not None]
    if sampled:
        device = logits.device
        index = torch.tensor(sampled, device=device)
        temperature = torch.tensor([rows[i].temperature for i in sampled], device=device, dtype=torch.float32)
        top_p = torch.tensor([rows[i].top_p for i in sampled], device=device, dtype=torch.float32)
        uniform = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(device)
        probs = (logits.index_select(0, index).float() / temperature[:, None]).softmax(dim=-1)
        # stable=True: equal probabilities keep vocabulary order, so ties resolve the same in any batch.
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        kept = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)  # the token crossing top_p stays in
        cumulative = kept.cumsum(dim=-1)
        target = uniform[:, None] * cumulative[:, -1:]
        # First position whose cumulative mass exceeds the target (cumulative is non-decreasing).
        position = (cumulative <= target).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)
        chosen[index] = sorted_ids.gather(-1, position[:, None]).squeeze(-1)
    logprobs = logits.log_softmax(dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
    picked = torch.stack([chosen.to(logprobs.dtype), logprobs]).tolist()  # token ids < 2**24: exact in float32
    return [int(t) for t in picked[0]], picked[1]
