"""Preallocated KV slots: row i of the running batch is slot row i of one fixed tensor, written in place.

`SlotStore.keys` and `.values` hold one `[rows, kv_heads, max_len, head_dim]` tensor per layer, allocated once
per engine (separate tensors, so the compiled step can write into each in place).
A request keeps its row while it runs: prefill writes its prompt's keys/values at columns `0..n-1`, and each
decode step writes one column at the row's position (`llama.py`); nothing is concatenated or reallocated.
The running rows are always the first `size` rows, so a decode step of padded batch size B reads the view
`keys[layer][:B]` with no gather. A finished row's slot is refilled by moving the last row into it (one copy of
that row's used columns; `SlotBatch.select` returns the new row order so the scheduler can follow), and
admission appends new rows after the running ones.
"""

from __future__ import annotations

import torch


class SlotStore:
    """The KV tensor of one engine and the column high-water mark that bounds row moves."""

    def __init__(
        self,
        *,
        layers: int,
        rows: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        vocab_size: int = 0,
    ) -> None:
        shape = (rows, kv_heads, max_len, head_dim)
        # Generated-token counts per row, for presence/frequency penalties (kept only while a row needs them).
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        self.bias = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)  # logit_bias per row
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = rows
        self.max_len = max_len
        self.used_columns = 0  # no running row has written beyond this column

    def write_prefill(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one prompt's keys/values ([layers, kv_heads, n, head_dim]) at columns 0..n-1 of `row`."""
        length = keys.shape[-2]
        for layer, (stored_keys, stored_values) in enumerate(zip(self.keys, self.values, strict=True)):
            stored_keys[row, :, :length].copy_(keys[layer])
            stored_values[row, :, :length].copy_(values[layer])
        self.used_columns = max(self.used_columns, length)

    def move(self, source: int, target: int) -> None:
        """Copy row `source`'s used columns into row `target`."""
        columns = self.used_columns
        for stored in (*self.keys, *self.values):
            stored[target, :, :columns].copy_(stored[source, :, :columns])
        self.counts[target].copy_(self.counts[source])
        self.bias[target].copy_(self.bias[source])

    def clear(self) -> None:
        for stored in (*self.keys, *self.values, self.counts, self.bias):
            stored.zero_()


class SlotBatch:
    """Rows `start .. start + size - 1` of a `SlotStore`: the running batch (start 0) or rows being admitted."""

    def __init__(self, store: SlotStore, start: int, size: int) -> None:
        if start + size > store.rows:
            raise ValueError(f"rows {start}..{start + size - 1} exceed the {store.rows} KV slots")
        self.store = store
        self.start = start
        self.size = size

    @property
    def batch_size(self) -> int:
        return self.size

    def select(self, rows: list[int]) -> list[int]:
        """Keep `rows` (increasing, relative to `start`) and close the gaps by moving later rows into them.

        Returns the new row order: entry j is the old row now at row j (not `rows` itself: moving only the last
        rows into the holes costs one copy per finished row, where keeping the order would shift everything)."""
        kept = len(rows)
        staying = set(rows)
        holes = [row for row in range(kept) if row not in staying]
        movers = [row for row in rows if row >= kept]
        order = [row for row in range(kept)]
        for hole, mover in zip(holes, movers, strict=True):
            self.store.move(self.start + mover, self.start + hole)
            order[hole] = mover
        self.size = kept
        if self.start == 0 and kept == 0:
            self.store.used_columns = 0
        return order

    def merge(self, other: SlotBatch) -> None:
        """Take `other`'s rows, which were admitted right after ours."""
        if other.store is not self.store or other.start != self.start + self.size:
            raise ValueError("only rows admitted right after this batch can join it")
        self.size += other.size
