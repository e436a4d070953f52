"""The static decode path of the engine: a prefill into KV slots, then one fixed-shape step per decoded token.

`StaticDecoder` has the scheduler-facing surface of `ModelRunner` (`adapters`, `prefill`, `decode`):

- `prefill` runs the prompts through `StaticLlama.prefill` (left-aligned rows, causal SDPA, the stacked LoRA
  of `lora.py` instead of peft's loop over adapter sub-batches), which writes each row's keys/values straight
  into its slot row (`slots.py`), and samples the first tokens as the dynamic path does;
- `decode` turns the per-row settings into tensors and runs `step`: `StaticLlama` over the slots with the
  stacked LoRA of `lora.py`, then `sampling.choose_tokens`. The step runs at the exact batch size and reads
  exactly the columns in use, except under CUDA graphs, where rows are padded to the next power of two and
  columns to the next power of two from 64 (each such bucket is a captured graph).
  Padded rows are free slot rows past the batch; what they compute is dropped.

With `compiled=True` the step is `torch.compile(fullgraph=True)` (mode "reduce-overhead", i.e. CUDA graphs,
on CUDA) and `warm_up` compiles it before the engine takes requests (every bucket under CUDA graphs; one graph
with symbolic sizes on CPU), logging the time.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from workers.inference.adapters import AdapterCache
from workers.inference.request import BASE_ADAPTER
from workers.inference.runner import ModelRunner
from workers.inference.sampling import (
    MAX_TOP_LOGPROBS,
    RowSampling,
    Sampled,
    choose_tokens,
    next_tokens,
    to_host,
    uniform_draws,
)
from workers.inference.static.llama import StaticLlama
from workers.inference.static.lora import BASE_SLOT, LoraStacks
from workers.inference.static.slots import SlotBatch, SlotStore

log = logging.getLogger(__name__)

LENGTH_STEP = 64
# Each combination of the compiled step's flags is a graph (8 on CPU), and each shape the LoRA stacks grow to
# (they never shrink: a rank step or new projections, a dozen times at most) is another set of them. Past
# Dynamo's default limit of 8 per function, fullgraph=True would fail the requests instead.
RECOMPILE_LIMIT = 128
DECODE_CHUNK = 8  # tokens per compiled decode call (see StaticDecoder.chunk)
# The step's outputs: chosen tokens, their log-probabilities, and (ids, log-probabilities) of the top_k.
StepOutput = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit` itself."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket_for(value: int, sizes: Sequence[int]) -> int:
    return next(size for size in sizes if size >= value)


def spread(low: int, high: int) -> list[int]:
    """`low`, `high` and one size between: the shapes a warm-up runs where sizes are symbolic."""
    return sorted({low, (low + high) // 2, high})


class StaticDecoder:
    """Prefill into KV slots and decode with `StaticLlama`; see the module docstring."""

    def __init__(
        self,
        runner: ModelRunner,
        model: nn.Module,
        *,
        max_batch_size: int,
        max_len: int,
        compiled: bool,
    ) -> None:
        self.adapters: AdapterCache = runner.adapters
        self._runner = runner
        self.device = runner.device
        self._layers: list[nn.Module] = list(model.model.layers)  # type: ignore[union-attr,arg-type]
        self.model = StaticLlama(model, max_len)
        self.lora = LoraStacks(
            self.adapters.capacity,
            device=self.device,
            dtype=self.model.dtype,
            # CUDA graphs: final shapes before the first adapter (no re-capture for it). On CPU the stacks cost
            # every step, so they grow with the adapters actually loaded (one recompile when that changes).
            preallocate_for=self._layers if compiled and self.device.type == "cuda" else (),
        )
        self._lora_version = -1
        # One row and one column more than any step reads: a slice that is never the whole tensor keeps the
        # compiled graph from specialising on "the bucket is the maximum".
        self.store = SlotStore(
            layers=len(self._layers),
            rows=max_batch_size + 1,
            kv_heads=self.model.kv_heads,
            max_len=max_len + 1,
            head_dim=self.model.head_dim,
            dtype=self.model.dtype,
            device=self.device,
            vocab_size=self.model.lm_head.out_features,
        )
        log.info(
            "static decode: KV slots for %d rows x %d tokens, %.2f GiB",
            max_batch_size,
            max_len,
            sum(t.numel() * t.element_size() for t in (*self.store.keys, *self.store.values)) / 2**30,
        )
        # CUDA graphs replay one captured graph per (batch, length) bucket, so rows are padded to powers of two
        # and columns to powers of two from 64: few graphs. Elsewhere the step runs at the exact batch size and
        # reads exactly the columns in use (attention reads every column it is given): eager has no graphs,
        # and the CPU-compiled step is one graph with symbolic sizes, except that rows and columns are at
        # least 2, since dynamic shapes specialise a size of 1 into a graph of its own.
        self.captured = compiled and self.device.type == "cuda"
        if self.captured:
            self.batch_buckets: list[int] | None = buckets(max(max_batch_size, 2), start=2)
            self.length_buckets: list[int] | None = buckets(max_len, start=min(LENGTH_STEP, max_len))
        else:
            self.batch_buckets = self.length_buckets = None
        self._min_size = 2 if compiled else 1
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.compiled = compiled
        # Tokens per decode call (`decode_steps`): the compiled step's host work (inputs, guards, reading the
        # outputs) is a large share of a step on CPU and leaves a GPU idle, so it is spread over several tokens.
        self.chunk = DECODE_CHUNK if compiled else 1
        self._columns = torch.arange(max_len + 1, device=self.device)
        self._step: Callable[..., StepOutput] = self.step
        if compiled:
            if self.device.type == "cuda":  # tensors the step writes: CUDA graphs must see them at fixed addresses
                for stored in (*self.store.keys, *self.store.values, self.store.counts, self.store.bias):
                    torch._dynamo.mark_static_address(stored)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            # Sizes are static but for those `_inputs` marks dynamic (rows and columns): a symbolic head count or
            # head size would cost codegen quality and invite duck-sizing specialisations (2 rows = 2 KV heads).
            # On CPU the graph's Python wrapper (a size/stride check per input, a view per intermediate, the
            # calls into the kernels) cost ~0.15 ms a step; inductor's C++ wrapper does the same in C++. Under
            # CUDA graphs a replay skips the wrapper anyway.
            options: dict[str, str | int | bool | Callable[..., Any]] | None = (
                None if self.device.type == "cuda" else {"cpp_wrapper": True}
            )
            self._step = torch.compile(self.step, fullgraph=True, mode=mode, options=options)
        # On CPU the compiled path compiles the prefill too (one graph with symbolic rows and width): eager, its
        # many elementwise ops over [rows, width, hidden] and the per-adapter scatter of the LoRA deltas cost
        # more than its matmuls. Under CUDA graphs prefill stays eager: its shapes vary too much to capture.
        self._compiled_prefill: Callable[..., torch.Tensor] | None = None
        if compiled and not self.captured:
            self._compiled_prefill = torch.compile(self.prefill_forward, fullgraph=True)

    # --- the scheduler's surface ---------------------------------------------------------------------------

    def prefill(
        self,
        prompts: list[list[int]],
        adapters: list[str],
        sampling: list[RowSampling],
        after: SlotBatch | None = None,
    ) -> tuple[Sampled, SlotBatch]:
        """Run `prompts` through the model, store their keys/values in the slot rows after `after`'s."""
        start = after.size if after is not None else 0
        batch = SlotBatch(self.store, start, len(prompts))  # raises before any work if the rows do not fit
        logits = self._prefill_logits(prompts, adapters, start)
        first = next_tokens(logits, sampling)
        self.store.used_columns = max(self.store.used_columns, max(len(prompt) for prompt in prompts))
        for row, settings in enumerate(sampling):  # always: a slot row may still hold an earlier request's bias
            self._write_bias(start + row, settings)
        if any(row.penalized for row in sampling):
            counts = self.store.counts[start : start + len(prompts)]
            counts.zero_()
            counts[torch.arange(len(prompts)), torch.tensor(first.tokens, device=self.device)] = 1.0
        return first, batch

    def decode(
        self,
        batch: SlotBatch,
        last_tokens: list[int],
        positions: list[int],
        adapters: list[str],
        sampling: list[RowSampling],
        history: list[list[int]] | None = None,
    ) -> Sampled:
        """One token for every row of `batch` (the running rows, slot rows 0..n-1). Penalties read the token
        counts the slots keep (`history` is the dynamic path's way to the same numbers)."""
        return self.decode_steps(batch, last_tokens, positions, adapters, sampling, 1)[0]

    def decode_steps(
        self,
        batch: SlotBatch,
        last_tokens: list[int],
        positions: list[int],
        adapters: list[str],
        sampling: list[RowSampling],
        steps: int,
    ) -> list[Sampled]:
        """Up to `steps` tokens for every row (fewer where the slots run out of columns), one `Sampled` per step.
        Each step's tokens feed the next on the device, so the steps cost one set of inputs, and the host reads
        them all at the end. A row that finishes after step j gets tokens for the later steps as well; the
        scheduler drops them (they cost compute only: the row leaves its slot). A grammar needs the host between
        tokens, so constrained rows take one step at a time."""
        rows = len(last_tokens)
        assert batch.start == 0 and batch.size == rows
        constrained = [(row, settings) for row, settings in enumerate(sampling) if settings.constraint is not None]
        if constrained and steps > 1:
            raise ValueError("rows with a grammar decode one step at a time")
        steps = max(1, min(steps, self.max_len - max(positions)))
        for row, settings in constrained:  # this step's grammar mask joins the row's logit_bias
            self._write_bias(row, settings, constrained=True)
        ids = self._slot_ids(adapters)
        penalize = any(row.penalized for row in sampling)
        biased = bool(constrained) or any(row.bias for row in sampling)
        if self.captured:  # one graph with both: next to a GPU step their ops cost nothing
            penalize = biased = True
        elif self.compiled:  # two graphs, with both and with neither: on CPU they cost every step, few rows ask
            penalize = biased = penalize or biased
        sample = any(row.generator is not None for row in sampling)
        wanted = [row.top for row in sampling]
        flags: dict[str, Any] = {
            "sample": sample,
            "penalize": penalize,
            "biased": biased,
            "with_lora": self.compiled or any(ids),  # compiled: one graph whatever the mix (zeros for base rows)
            # Compiled: two graphs, with the top 20 when any row asks for alternatives and without (few requests
            # do, and a top-k over the vocabulary would cost every step).
            "top_k": (MAX_TOP_LOGPROBS if any(wanted) else 0) if self.compiled else max(wanted),
        }
        ints, floats, columns = self._inputs(
            self._padded(rows, self.batch_buckets),
            self._padded(max(positions) + 1, self.length_buckets),
            [last_tokens, positions, ids],
            [
                [row.temperature for row in sampling],
                [row.top_p for row in sampling],
                uniform_draws(sampling),
                [row.presence for row in sampling],
                [row.frequency for row in sampling],
            ],
        )
        outputs: list[StepOutput] = []
        for step in range(steps):
            if step:
                chosen = outputs[-1][0]
                ints = torch.stack((chosen, ints[1] + 1, ints[2]))
                if sample:  # each step's draw from each row's own generator, in order
                    floats = floats.clone()
                    floats[2, :rows] = torch.tensor(uniform_draws(sampling), dtype=floats.dtype).to(self.device)
                columns = self._columns[: self._padded(max(positions) + 1 + step, self.length_buckets)]
                self._mark_dynamic(ints, floats, columns)
            chosen, logprobs, top = self._run_step(ints, floats, columns, **flags)
            if self.captured:  # a CUDA-graph replay reuses its output memory: keep this step's before the next
                chosen, logprobs = chosen.clone(), logprobs.clone()
                top = None if top is None else (top[0].clone(), top[1].clone())
            outputs.append((chosen, logprobs, top))
        self.store.used_columns = max(self.store.used_columns, max(positions) + steps)
        return [
            to_host(chosen[:rows], logprobs[:rows], None if top is None else (top[0][:rows], top[1][:rows]), wanted)
            for chosen, logprobs, top in outputs
        ]

    def _padded(self, size: int, bucket_sizes: list[int] | None) -> int:
        """`size` rows or columns as the step runs them: the next bucket under CUDA graphs, else exact."""
        if bucket_sizes is not None:
            return bucket_for(size, bucket_sizes)
        return max(size, self._min_size)

    def _prefill_logits(self, prompts: list[list[int]], adapters: list[str], start: int) -> torch.Tensor:
        """`StaticLlama.prefill` of `prompts` (left-aligned, padded with token 0) into slot rows from `start`."""
        if self._compiled_prefill is not None:
            return self._run_compiled_prefill(prompts, self._slot_ids(adapters), start)
        tokens, last = self._prompt_batch(prompts, len(prompts), max(len(prompt) for prompt in prompts))
        rows_of: dict[int, list[int]] = {}
        for row, slot in enumerate(self._slot_ids(adapters)):
            if slot != BASE_SLOT:
                rows_of.setdefault(slot, []).append(row)
        groups = [(slot, torch.tensor(rows, dtype=torch.long).to(self.device)) for slot, rows in rows_of.items()]
        return self.model.prefill(
            self.store.keys,
            self.store.values,
            tokens,
            last,
            start,
            self.lora if groups else None,
            groups,
        )

    def prefill_forward(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        tokens: torch.Tensor,
        last: torch.Tensor,
        slot_rows: torch.Tensor,
        adapter_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The compiled prefill: `StaticLlama.prefill` into slot rows `slot_rows`, with every row's LoRA delta
        in the stacked, masked form of the decode step (`adapter_ids`: each row's slot, 0 for the base)."""
        use_lora = len(self.lora.a) > 0
        mask = self.lora.row_mask(adapter_ids)[:, None, :] if use_lora else None
        return self.model.prefill(keys, values, tokens, last, slot_rows, self.lora if use_lora else None, mask=mask)

    def _run_compiled_prefill(self, prompts: list[list[int]], slot_ids: list[int], start: int) -> torch.Tensor:
        """`prefill_forward` at sizes of at least 2 (as for the step): a lone prompt gets a padding row, written
        to the free slot row after it; a one-token prompt a padding column, which no step reads."""
        rows = len(prompts)
        size = max(rows, self._min_size)
        tokens, last = self._prompt_batch(prompts, size, max(self._min_size, *(len(prompt) for prompt in prompts)))
        ids = torch.tensor(slot_ids + [BASE_SLOT] * (size - rows)).to(self.device)
        slot_rows = torch.arange(start, start + size, device=self.device)
        for tensor in (tokens, last, ids, slot_rows):
            torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(tokens, 1)
        assert self._compiled_prefill is not None
        _allow_recompiles()
        logits = self._compiled_prefill(self.store.keys, self.store.values, tokens, last, slot_rows, ids)
        return logits[:rows]

    def _prompt_batch(self, prompts: list[list[int]], size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompts` left-aligned in `size` rows of `width` tokens (padding: token 0, and whole rows of it past
        the prompts), and each row's last prompt column (0 for padding rows)."""
        padding_rows = size - len(prompts)
        padded = [prompt + [0] * (width - len(prompt)) for prompt in prompts] + [[0] * width] * padding_rows
        tokens = torch.tensor(padded, dtype=torch.long).to(self.device)
        last = torch.tensor([len(prompt) - 1 for prompt in prompts] + [0] * padding_rows, dtype=torch.long)
        return tokens, last.to(self.device)

    def _write_bias(self, slot: int, settings: RowSampling, *, constrained: bool = False) -> None:
        """The slot's bias row: its request's logit_bias, plus (`constrained`) the grammar's mask of this step."""
        bias = self.store.bias[slot]
        if constrained and settings.constraint is not None:
            bias.copy_(settings.constraint.mask())
        else:
            bias.zero_()
        for token, value in settings.bias:
            bias[token] += value

    # --- the step ------------------------------------------------------------------------------------------

    def step(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        ints: torch.Tensor,
        floats: torch.Tensor,
        columns: torch.Tensor,
        counts: torch.Tensor,
        bias: torch.Tensor,
        *,
        sample: bool,
        penalize: bool,
        biased: bool,
        with_lora: bool,
        top_k: int = 0,
    ) -> StepOutput:
        """Next token and its log-probability for each of the B rows; the graph that `torch.compile` captures.

        `ints` [3, B]: last token, position, adapter slot; `floats` [5, B]: temperature, top-p, uniform draw,
        presence and frequency penalty; `columns` [L]: the attended column indices (its length is the length
        bucket); `counts` [rows, V]: generated-token counts, updated here when `penalize`; `bias` [rows, V]: each
        row's logit_bias, added when `biased`."""
        use_lora = with_lora and len(self.lora.a) > 0
        logits = self.model(
            keys, values, ints[0], ints[1], columns, self.lora if use_lora else None, ints[2] if use_lora else None
        )
        rows = ints.shape[1]
        penalties = (counts[:rows], floats[3], floats[4]) if penalize else None
        chosen, logprobs, top = choose_tokens(
            logits,
            floats[0],
            floats[1],
            floats[2],
            sample=sample,
            penalties=penalties,
            bias=bias[:rows] if biased else None,
            top_k=top_k,
        )
        if penalize:
            ones = torch.ones(rows, dtype=counts.dtype, device=counts.device)
            counts.index_put_((torch.arange(rows, device=counts.device), chosen), ones, accumulate=True)
        return chosen, logprobs, top

    def _run_step(self, ints: torch.Tensor, floats: torch.Tensor, columns: torch.Tensor, **flags: Any) -> StepOutput:
        """The (possibly compiled) step on this decoder's slots and token counts."""
        store = self.store
        if self.compiled:
            _allow_recompiles()
        return self._step(store.keys, store.values, ints, floats, columns, store.counts, store.bias, **flags)

    def _inputs(
        self, size: int, length: int, ints: list[list[int]], floats: list[list[float]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's tensors for `size` padded rows: padding rows are token 0 at position 0 on the base model,
        greedy."""
        padding = size - len(ints[0])
        int_rows = torch.tensor([row + [0] * padding for row in ints], dtype=torch.long)
        float_rows = torch.tensor(
            [row + [fill] * padding for row, fill in zip(floats, (0.0, 1.0, 0.0, 0.0, 0.0), strict=True)],
            dtype=torch.float32,
        )
        int_rows = int_rows.to(self.device, non_blocking=True)
        float_rows = float_rows.to(self.device, non_blocking=True)
        columns = self._columns[:length]
        self._mark_dynamic(int_rows, float_rows, columns)
        return int_rows, float_rows, columns

    def _mark_dynamic(self, ints: torch.Tensor, floats: torch.Tensor, columns: torch.Tensor) -> None:
        """Compiled: the step's rows and columns are symbolic, so one graph serves every size (of at least 2:
        a size of 1 would specialise)."""
        if self.compiled:
            torch._dynamo.mark_dynamic(ints, 1)
            torch._dynamo.mark_dynamic(floats, 1)
            torch._dynamo.mark_dynamic(columns, 0)

    def warm_up(self) -> float:
        """Run (compile, when compiled) the step before the engine takes requests, greedy and sampling; compiled,
        also with and without the top alternatives and (on CPU) with and without penalties and biases. Under
        CUDA graphs for every batch and length bucket, else at the smallest, a middle and the largest sizes (a
        graph with symbolic sizes serves them all). Compiled on CPU, also the prefill. Returns the seconds."""
        start = time.perf_counter()
        tops = (0, MAX_TOP_LOGPROBS) if self.compiled else (0,)
        adjusted = (True,) if self.captured else (False, True) if self.compiled else (False,)
        sizes = self.batch_buckets or spread(self._min_size, self.max_batch_size)
        lengths = self.length_buckets or spread(self._min_size, self.max_len)
        shapes = unequal_first(itertools.product(sizes, lengths))
        for (size, length), sample, top_k, adjust in itertools.product(shapes, (False, True), tops, adjusted):
            ints, floats, columns = self._inputs(size, length, [[], [], []], [[]] * 5)
            self._run_step(
                ints,
                floats,
                columns,
                sample=sample,
                penalize=adjust,
                biased=adjust,
                with_lora=self.compiled,
                top_k=top_k,
            )
        if self._compiled_prefill is not None:
            for size, width in unequal_first(itertools.product(sizes, spread(self._min_size, LENGTH_STEP))):
                self._run_compiled_prefill([[0] * width] * size, [BASE_SLOT] * size, 0)
        self.store.clear()
        seconds = time.perf_counter() - start
        log.info(
            "static decode step %s for batch sizes %s x lengths %s in %.1fs",
            "compiled" if self.compiled else "warmed up",
            sizes,
            lengths,
            seconds,
        )
        return seconds

    def _slot_ids(self, adapters: list[str]) -> list[int]:
        if self.adapters.version != self._lora_version:
            self.lora.sync(self._layers, self.adapters.loaded())
            self._lora_version = self.adapters.version
        return self.lora.slot_ids(adapters, BASE_ADAPTER)


def _allow_recompiles() -> None:
    """Raise Dynamo's recompile limit to RECOMPILE_LIMIT for the calling thread (its config is per thread)."""
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT


def unequal_first(shapes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """`shapes` with the pairs of two different sizes first. Dynamo's duck sizing gives two sizes that are equal
    when a graph compiles one symbol, so a graph first compiled at, say, 2 rows x 2 columns would serve only
    square batches. (Turning duck sizing off made each compile several times slower.)"""
    return sorted(shapes, key=lambda shape: shape[0] == shape[1])
