"""Several inference engines in one process: how much does an idle engine slow down a busy one?

A worker with `inference.max_base_models` > 1 holds one `InferenceEngine` per base model, each with its own
loop thread. On CPU every thread that ever ran torch keeps an OpenMP pool, and libgomp counts the threads of
all pools: past the CPU count every parallel region takes its slow path (`workers/inference/openmp.py`).
An engine therefore hands its pool back when it goes idle. This benchmark measures, in one run, one tiny
random Llama loaded `--neighbours + 1` times:

- `alone`: engine 0 serves waves of `--concurrency` requests, with no other engine in the process;
- `idle neighbours`: the other engines have each served a wave and gone idle, then engine 0 again;
- `idle neighbours, pools held`: the same with the idle release switched off, as it was before;
- `alone again`: the neighbours closed, engine 0 once more (how much the machine drifted meanwhile).

    python benchmarks/engines_per_process.py                     # 3 neighbours, 16 requests x 64 tokens, ~1 min
    python benchmarks/engines_per_process.py --neighbours 1 --concurrency 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import workers.inference.engine as engine_module  # noqa: E402
from workers.inference import GenerationRequest, InferenceEngine  # noqa: E402
from workers.training.tiny_model import build_tiny_model  # noqa: E402

FIRST_ID = 5  # the tiny tokenizer's special tokens are ids 0-4


def wave(engine: InferenceEngine, concurrency: int, new_tokens: int, prompt_tokens: int) -> float:
    """Seconds for `concurrency` requests submitted at once, each generating exactly `new_tokens`."""
    generator = torch.Generator().manual_seed(0)
    vocab = engine.info()["vocab_size"]
    prompts = torch.randint(FIRST_ID, vocab, (concurrency, prompt_tokens), generator=generator).tolist()
    start = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest(prompt_ids=p, max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
        for p in prompts
    ]
    for handle in handles:
        handle.result(timeout=600)
    return time.perf_counter() - start


def measure(engine: InferenceEngine, args: argparse.Namespace) -> dict[str, Any]:
    seconds = [wave(engine, args.concurrency, args.new_tokens, args.prompt_tokens) for _ in range(args.rounds)]
    median = statistics.median(seconds)
    tokens = args.concurrency * args.new_tokens
    return {"seconds": median, "tokens_per_s": tokens / median, "ms_per_token_step": 1000 * median / args.new_tokens}


@contextmanager
def idle_release_off() -> Iterator[None]:
    """The engine loop as it was before: an idle engine keeps its thread's OpenMP pool."""
    real = engine_module.release_thread_pool
    engine_module.release_thread_pool = lambda: False
    try:
        yield
    finally:
        engine_module.release_thread_pool = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neighbours", type=int, default=3, help="idle engines beside the measured one")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="waves per arm (the median is shown)")
    parser.add_argument("--decode", default="static", choices=["static", "compiled", "dynamic"])
    args = parser.parse_args()

    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(Path(tmp) / "tiny", seed=0)

        def engine() -> InferenceEngine:
            return InferenceEngine(model_path, max_batch_size=args.concurrency, device="cpu", decode=args.decode)

        measured = engine()
        wave(measured, args.concurrency, args.new_tokens, args.prompt_tokens)  # warm-up: allocator, caches
        rows.append(("alone", measure(measured, args)))

        neighbours = [engine() for _ in range(args.neighbours)]
        for other in neighbours:
            wave(other, args.concurrency, 4, args.prompt_tokens)  # its loop thread ran torch, then went idle
        time.sleep(0.5)
        rows.append((f"{args.neighbours} idle neighbours", measure(measured, args)))

        with idle_release_off():
            for other in neighbours:
                wave(other, args.concurrency, 4, args.prompt_tokens)
            time.sleep(0.5)
            rows.append((f"{args.neighbours} idle neighbours, pools held", measure(measured, args)))

        for other in neighbours:
            other.close()
        rows.append(("alone again (noise check)", measure(measured, args)))
        measured.close()

    alone = rows[0][1]["tokens_per_s"]
    print(
        f"tiny random Llama, {args.decode} decode, {torch.get_num_threads()} torch threads; "
        f"{args.concurrency} requests x {args.new_tokens} tokens, median of {args.rounds} waves"
    )
    print(f"{'arm':<36} {'tok/s':>9} {'ms/step':>8} {'vs alone':>9}")
    for name, row in rows:
        print(
            f"{name:<36} {row['tokens_per_s']:>9.0f} {row['ms_per_token_step']:>8.2f} "
            f"{row['tokens_per_s'] / alone:>8.2f}x"
        )


if __name__ == "__main__":
    main()
