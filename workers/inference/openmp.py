"""Keeping the engine's loop thread off libgomp's slow path (CPU forwards).

Every OpenMP parallel region torch runs (an MKL GEMM, an inductor CPU kernel, a large elementwise op) wakes
the worker threads of the *calling* thread's pool. libgomp keeps one pool per thread that ever opened a
region, for as long as that thread lives, and counts all their threads: once that count exceeds the CPUs,
every pool's workers spin about 100 iterations instead of 300,000 before they sleep on a futex (its
"throttled" spin count), so each region the loop thread opens pays a futex wake-up. On the 2-core CI box a
64 x 64 GEMM took 6 us on the main thread and 40-65 us on the loop thread, and an inductor kernel likewise;
with the constructing thread's pool released the loop thread runs them as fast as the main thread.

The thread that builds an engine has usually opened regions of its own (loading weights, the probe forward,
compiling), and it does no more torch work afterwards: `release_thread_pool` hands its pool back (OpenMP 5.0
`omp_pause_resource_all`, which libgomp applies to the calling thread's pool). A region that thread opens later
builds a new pool, so the slow path comes back only while someone else keeps doing CPU torch work in the same
process. Where the runtime lacks the call (or is not found) nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_soft: threads are stopped, the runtime stays initialised
_RUNTIMES = ("libgomp", "libiomp", "libomp")


@cache
def _pause_function() -> Any:
    """`omp_pause_resource_all` of the OpenMP runtime loaded in this process, or None."""
    candidates: list[str | None] = []
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/" in line}
        except OSError:
            paths = set()
        runtimes: list[str] = [p for p in paths if any(name in p.rsplit("/", 1)[-1] for name in _RUNTIMES)]
        runtimes.sort(key=lambda path: ("/torch/" not in path, path))  # torch's own first
        candidates += runtimes
    candidates.append(None)  # then whatever the global namespace resolves
    for candidate in candidates:
        try:
            function = ctypes.CDLL(candidate).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int
        return function
    return None


def release_thread_pool() -> bool:
    """Stop the OpenMP worker threads of the calling thread's pool; True if the runtime did."""
    function = _pause_function()
    if function is None:
        return False
    try:
        released = function(OMP_PAUSE_SOFT) == 0
    except Exception:  # a foreign runtime misbehaving must not stop the engine
        log.debug("omp_pause_resource_all failed", exc_info=True)
        return False
    return released
