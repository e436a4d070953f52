"""The running batch's KV cache: a transformers `DynamicCache` plus the left-padded attention mask that goes with it.

Rows are right-aligned: row i holds `[padding][prompt][generated]`, so every decode step appends one real
column for every row, and a row's tokens stay contiguous (sliding-window masks stay right too, since they
compare column distances). Rows join by left-padding the shorter of two caches and concatenating along the
batch dimension, and leave by `index_select`; columns that became padding for every remaining row are then
trimmed off the left, so the cache is never longer than its longest row.

This relies on every layer being a plain `DynamicLayer` (keys/values of shape (batch, heads, seq, head_dim)).
That holds for a `DynamicCache()` created without a config, which keeps full-length layers even for
sliding-window models; `check_supported` rejects anything else (linear-attention/hybrid caches, KV sharing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def new_cache() -> DynamicCache:
    # No config on purpose: with a config, sliding-window layers would keep only the window, and two such
    # caches of different lengths could not be aligned by padding.
    return DynamicCache()


def check_supported(cache: DynamicCache, length: int) -> None:
    """Raise if `cache` (just filled by a forward of `length` columns) is not something `PaddedKV` can batch."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise NotImplementedError(
                f"cache layer {index} is {type(layer).__name__} (or empty); continuous batching here needs a "
                "plain DynamicLayer per attention layer"
            )
        if layer.keys.dim() != 4 or layer.keys.shape[-2] != length:
            raise NotImplementedError(f"cache layer {index} has keys of shape {tuple(layer.keys.shape)}")


class PaddedKV:
    """A batch's cache and mask, kept in step. Row order matches the engine's list of running sequences."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # (batch, columns) of 0/1, long

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def grow(self) -> torch.Tensor:
        """Append a real column for every row (the token about to be fed) and return the mask to pass."""
        ones = torch.ones((self.batch_size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def merge(self, other: PaddedKV) -> None:
        """Append `other`'s rows after ours, left-padding whichever side is shorter."""
        length = max(self.length, other.length)
        pad_self, pad_other = length - self.length, length - other.length
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            assert isinstance(mine, DynamicLayer) and isinstance(theirs, DynamicLayer)
            assert mine.keys is not None and mine.values is not None
            assert theirs.keys is not None and theirs.values is not None
            mine.keys = torch.cat([_pad_seq(mine.keys, pad_self), _pad_seq(theirs.keys, pad_other)], dim=0)
            mine.values = torch.cat([_pad_seq(mine.values, pad_self), _pad_seq(theirs.values, pad_other)], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (pad_self, 0)), F.pad(other.mask, (pad_other, 0))], dim=0)

    def select(self, rows: list[int]) -> list[int]:
        """Keep only `rows` (in that order), then drop leading columns that no remaining row uses; returns `rows`."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0)
        start = int(used.to(torch.int8).argmax()) if bool(used.any()) else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
        return rows


def _pad_seq(states: torch.Tensor, amount: int) -> torch.Tensor:
    """Left-pad (batch, heads, seq, head_dim) along seq with zeros (masked out, so never attended)."""
    return F.pad(states, (0, 0, amount, 0)) if amount else states
