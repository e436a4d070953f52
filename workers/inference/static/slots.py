"""Preallocated KV slots: a request keeps one row for its lifetime; decode writes in place."""

from __future__ import annotations

import torch


class KvSlots:
    """KV storage [layers, 2, rows, kv_heads, max_len, head_dim] plus a free list of rows."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        self.kv = torch.zeros(layers, 2, rows, kv_heads, max_len, head_dim, dtype=dtype)
        self._free = list(range(rows - 1, -1, -1))

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)

    @property
    def free_count(self) -> int:
        return len(self._free)


def write_step(
    kv: torch.Tensor,
    layer: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Write one token's keys/values [batch, kv_heads, head_dim] at per-row positions in place."""
    kv[layer, 0, rows, :, positions] = keys
    kv[layer, 1, rows, :, positions] = values
