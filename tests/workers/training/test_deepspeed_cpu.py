"""DeepSpeed on this machine's CPUs: the multi-process path is proven here with DDP over gloo (tests/e2e/
test_fleet.py, a 2-process run through `accelerate launch` from the API); ZeRO itself needs the deepspeed
package, which CPU CI does not install (its wheel builds CUDA ops at install time), so ZeRO is checked by
the `gpu`-marked tests/workers/training/test_gpu.py::test_deepspeed_zero_across_two_gpus (`make gpu`)."""

from __future__ import annotations

import importlib.util

import pytest

from app.core.contracts.training import DEEPSPEED_DIR, deepspeed_configs


def test_the_named_configs_exist_and_shard_as_named() -> None:
    import json

    assert {"zero2", "zero3"} <= set(deepspeed_configs())
    for name in ("zero2", "zero3"):
        config = json.loads((DEEPSPEED_DIR / f"{name}.json").read_text())
        assert config["zero_optimization"]["stage"] == int(name[-1])


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed on CPU CI (its install builds CUDA ops); ZeRO runs in the gpu-marked test",
)
def test_zero_runs_on_cpu_where_deepspeed_is_installed() -> None:  # pragma: no cover - not on CPU CI
    import deepspeed

    assert deepspeed.__version__
