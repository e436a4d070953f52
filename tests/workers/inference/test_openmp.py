"""`openmp.release_thread_pool`: the engine's constructing thread hands its OpenMP workers back."""

from __future__ import annotations

import sys

import pytest
import torch

from workers.inference.openmp import release_thread_pool


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the runtime through /proc/self/maps")
def test_the_pool_is_released_and_rebuilt_on_demand() -> None:
    a = torch.randn(256, 256)
    expected = a @ a  # opens a parallel region: this thread now has a pool
    assert release_thread_pool() is True
    assert release_thread_pool() is True  # nothing left to release is fine too
    assert torch.equal(a @ a, expected)  # a later region builds a new pool
