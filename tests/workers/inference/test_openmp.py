"""`openmp.release_thread_pool`: the engine's threads hand their OpenMP workers back when they are done."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch

from workers.inference import GenerationRequest, InferenceEngine
from workers.inference.openmp import release_thread_pool

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def os_threads() -> int:
    """Threads of this process, OpenMP workers included (Python's `threading` does not see those)."""
    match = re.search(r"^Threads:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


@linux_only
def test_the_pool_is_released_and_rebuilt_on_demand() -> None:
    a = torch.randn(256, 256)
    expected = a @ a  # opens a parallel region: this thread now has a pool
    assert release_thread_pool() is True
    assert release_thread_pool() is True  # nothing left to release is fine too
    assert torch.equal(a @ a, expected)  # a later region builds a new pool


@linux_only
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a one-thread pool has no workers to hand back")
def test_an_idle_engine_hands_its_loop_threads_pool_back(tiny_model: Path) -> None:
    """Found: an engine that had served requests kept its loop thread's OpenMP workers while idle. libgomp counts
    them against every pool in the process, so beside one idle engine (a multi-model worker) a busy one took
    the slow path in every parallel region: 3-4x slower per step on 2 cores."""
    with InferenceEngine(tiny_model, max_batch_size=8, device="cpu") as engine:
        idle_before = os_threads()  # the loop thread, which has run no torch yet
        prompt = list(range(5, 69))
        request = GenerationRequest(prompt_ids=prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
        for handle in [engine.submit(request) for _ in range(8)]:
            handle.result(timeout=60)  # the loop thread ran the model: its pool's workers started
        deadline = time.monotonic() + 30
        while os_threads() > idle_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os_threads() <= idle_before, "the idle engine's loop thread kept its OpenMP workers"
        # ...and builds them again for the next request, which still runs.
        assert engine.generate(request, timeout=60).token_ids
