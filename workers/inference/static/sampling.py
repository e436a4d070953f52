"""Choosing each row's next token inside the decode graph, with per-row settings as tensors.

The same rule as `workers/inference/sampling.py` (greedy, or temperature + top-p by inverse CDF over the
nucleus with one host-drawn uniform number per row), written without host reads so that it traces into the
compiled step. Rows with temperature 0 take the argmax. Presence and frequency penalties (OpenAI's
definition: `logit - frequency * count - presence * (count > 0)` over the tokens generated so far) read the
per-row token counts the step keeps up to date.
"""

from __future__ import annotations

import torch


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] minus each row's penalties over its generated-token counts [B, V]."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    *,
    sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its log-probability under the model's distribution [B]) for float32 logits [B, V].

    `sample=False` (every row greedy) skips the sort; the result is the same as with it."""
    chosen = logits.argmax(dim=-1)
    if sample:
        probs = (logits / temperature.clamp(min=1e-6)[:, None]).softmax(dim=-1)
        # stable=True: equal probabilities keep vocabulary order, so ties resolve the same in any batch.
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        kept = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)  # the token crossing top_p stays in
        cumulative = kept.cumsum(dim=-1)
        target = uniform[:, None] * cumulative[:, -1:]
        position = (cumulative <= target).sum(dim=-1).clamp(max=probs.shape[-1] - 1)
        sampled = sorted_ids.gather(-1, position[:, None]).squeeze(-1)
        chosen = torch.where(temperature > 0, sampled, chosen)
    logprob = logits.log_softmax(dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
    return chosen, logprob
