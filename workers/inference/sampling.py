"""Choosing each row's next token: greedy, or temperature + top-p with a per-request random generator.

Reproducibility per request, whatever else is in the batch: each sampling row draws exactly one uniform
number per step from its own CPU `torch.Generator` and turns it into a token by inverse-CDF over the
nucleus. The draw never depends on the batch (unlike `torch.multinomial` on a batched tensor), the same
seed gives the same text on CPU and GPU, and the rest of the computation stays vectorized on the device.
`choose_tokens` is the same rule without host reads, for the static decode graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workers.inference.constraints import TokenConstraint

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the compiled step computes this many when any row asks


@dataclass(frozen=True, slots=True)
class Sampled:
    """Each row's chosen token, its log-probability, and its requested most likely alternatives."""

    tokens: list[int]
    logprobs: list[float]
    tops: list[list[tuple[int, float]]]  # (token, log-probability), most likely first; empty when not asked


@dataclass(frozen=True, slots=True)
class RowSampling:
    """One row's sampling settings; `generator` is None exactly when the row is greedy (temperature 0)."""

    temperature: float
    top_p: float
    generator: torch.Generator | None
    presence: float = 0.0
    frequency: float = 0.0
    top: int = 0  # alternatives (with their log-probabilities) to report per token
    bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    constraint: TokenConstraint | None = None  # a grammar the tokens must follow (its state changes per token)

    @property
    def penalized(self) -> bool:
        return self.presence != 0 or self.frequency != 0

    @classmethod
    def create(
        cls,
        temperature: float,
        top_p: float,
        seed: int | None,
        *,
        presence: float = 0.0,
        frequency: float = 0.0,
        top: int = 0,
        bias: tuple[tuple[int, float], ...] = (),
        constraint: TokenConstraint | None = None,
    ) -> RowSampling:
        if temperature == 0:
            return cls(0.0, top_p, None, presence, frequency, top, bias, constraint)
        generator = torch.Generator()  # CPU on purpose, see the module docstring
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return cls(temperature, top_p, generator, presence, frequency, top, bias, constraint)


def next_tokens(
    logits: torch.Tensor, rows: Sequence[RowSampling], history: Sequence[Sequence[int]] | None = None
) -> Sampled:
    """Pick one token per row of float32 `logits` (batch, vocab); returns the tokens and their log-probabilities
    under the model's distribution. `history`: each row's generated tokens, for its penalties. Only the
    sampling rows are sorted. One device->host sync in total."""
    model_logits = logits
    penalized = [i for i, row in enumerate(rows) if row.penalized and history is not None and history[i]]
    if penalized and history is not None:
        counts = torch.zeros(len(penalized), logits.shape[-1], device=logits.device)
        for slot, i in enumerate(penalized):
            counts[slot].index_add_(
                0, torch.tensor(history[i], device=logits.device), torch.ones(len(history[i]), device=logits.device)
            )
        index = torch.tensor(penalized, device=logits.device)
        presence = torch.tensor([rows[i].presence for i in penalized], device=logits.device)
        frequency = torch.tensor([rows[i].frequency for i in penalized], device=logits.device)
        logits = logits.clone()
        logits[index] = apply_penalties(logits.index_select(0, index), counts, presence, frequency)
    biased = [i for i, row in enumerate(rows) if row.bias]
    if biased:
        logits = logits.clone() if logits is model_logits else logits
        for i in biased:
            ids = torch.tensor([token for token, _ in rows[i].bias], device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor([b for _, b in rows[i].bias], device=logits.device))
    constrained = [(i, row.constraint) for i, row in enumerate(rows) if row.constraint is not None]
    if constrained:
        logits = logits.clone() if logits is model_logits else logits
        for i, constraint in constrained:
            logits[i] += constraint.mask().to(logits.device)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.generator is not None]
    if sampled:
        device = logits.device
        index = torch.tensor(sampled, device=device)
        temperature = torch.tensor([rows[i].temperature for i in sampled], device=device, dtype=torch.float32)
        top_p = torch.tensor([rows[i].top_p for i in sampled], device=device, dtype=torch.float32)
        uniform = torch.tensor(uniform_draws([rows[i] for i in sampled]), device=device)
        chosen[index] = nucleus_sample(logits.index_select(0, index), temperature, top_p, uniform)
    wanted = [row.top for row in rows]
    logprobs, top = logprob_report(model_logits, chosen, max(wanted, default=0))
    return to_host(chosen, logprobs, top, wanted)


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's presence/frequency penalties: logits [B, V] minus each row's over its token counts [B, V]."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    *,
    sample: bool,
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`next_tokens` as tensor ops only, for the static decode graph: every row goes through the same ops
    (rows with temperature 0 take the argmax). `sample=False` (every row greedy) skips the sort.
    `penalties`: (counts [B, V], presence [B], frequency [B]); `bias` [B, V] is added to the logits.
    Returns the chosen tokens, their log-probabilities and the `top_k` report of `logprob_report`."""
    scores = logits if penalties is None else apply_penalties(logits, *penalties)
    if bias is not None:
        scores = scores + bias
    chosen = scores.argmax(dim=-1)
    if sample:
        chosen = torch.where(temperature > 0, nucleus_sample(scores, temperature, top_p, uniform), chosen)
    return chosen, *logprob_report(logits, chosen, top_k)


def nucleus_sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """The token whose nucleus CDF first exceeds each row's `uniform` draw (temperature > 0 rows)."""
    probs = (logits / temperature.clamp(min=1e-6)[:, None]).softmax(dim=-1)
    # stable=True: equal probabilities keep vocabulary order, so ties resolve the same in any batch.
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)  # the token crossing top_p stays in
    cumulative = kept.cumsum(dim=-1)
    target = uniform[:, None] * cumulative[:, -1:]
    # First position whose cumulative mass exceeds the target (cumulative is non-decreasing).
    position = (cumulative <= target).sum(dim=-1).clamp(max=probs.shape[-1] - 1)
    return sorted_ids.gather(-1, position[:, None]).squeeze(-1)


def uniform_draws(rows: Sequence[RowSampling]) -> list[float]:
    """One draw per row from its own generator (0.0 for greedy rows, which draw nothing)."""
    return [float(torch.rand(1, generator=row.generator)) if row.generator is not None else 0.0 for row in rows]


def logprob_report(
    logits: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The log-probability of each row's chosen token under the model's distribution, and with `k` > 0 the k
    most likely tokens and their log-probabilities (ids, values; most likely first). One log-softmax."""
    log_probs = logits.log_softmax(dim=-1)
    chosen_logprobs = log_probs.gather(-1, chosen[:, None]).squeeze(-1)
    if not k:
        return chosen_logprobs, None
    values, ids = log_probs.topk(k, dim=-1)
    return chosen_logprobs, (ids, values)


def to_host(
    chosen: torch.Tensor,
    logprobs: torch.Tensor,
    top: tuple[torch.Tensor, torch.Tensor] | None = None,
    wanted: Sequence[int] = (),
) -> Sampled:
    """Everything as lists, in one device->host copy (token ids < 2**24 are exact in float32). `wanted`: how
    many of the `top` alternatives each row asked for."""
    columns = [chosen[:, None].to(logprobs.dtype), logprobs[:, None]]
    if top is not None:
        columns += [top[0].to(logprobs.dtype), top[1]]
    rows = torch.cat(columns, dim=1).tolist()
    k = 0 if top is None else top[0].shape[1]
    tops = [
        [(int(row[2 + j]), row[2 + k + j]) for j in range(min(want, k))]
        for row, want in zip(rows, list(wanted) or [0] * len(rows), strict=True)
    ]
    return Sampled([int(row[0]) for row in rows], [row[1] for row in rows], tops)
