"""Training throughput: real (non-padding) tokens/s of padded batches vs padding-free packing.

Both arms run the product's own trainer (`python -m workers.training.run`) on the same model and the
same variable-length chat rows, in the same run, so the table compares ratios, not absolute times.

    python benchmarks/training.py                      # tiny random Llama, CPU, ~1 minute
    python benchmarks/training.py --shape tinyllama    # random 1.1B Llama (TinyLlama shape), on a GPU
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},
    "tinyllama": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "num_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
    },
}


def variable_length_rows(n: int, max_words: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows whose lengths spread from a few words to `max_words`, like real SFT data."""
    rng = random.Random(seed)
    words = ["the", "cat", "a", "dog", "reads", "writes", "answers", "builds", "story", "garden", "today"]
    rows = []
    for _ in range(n):
        length = int(rng.paretovariate(1.2) * 8) % max_words + 4
        answer = " ".join(rng.choice(words) for _ in range(length))
        rows.append(
            {"messages": [{"role": "user", "content": "Tell me something."}, {"role": "assistant", "content": answer}]}
        )
    return rows


def run_arm(model: Path, train_file: Path, out: Path, packing: bool, args: argparse.Namespace) -> dict[str, Any]:
    config = {
        "base_model": str(model),
        "train_file": str(train_file),
        "output_dir": str(out),
        "method": "lora",
        "lora_r": 16,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "packing": packing,
        "logging_steps": 1,
        "save_steps": 10**9,
        "learning_rate": 1e-4,
    }
    cfg = out.parent / f"{out.name}.json"
    cfg.write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "workers.training.run", str(cfg)], cwd=REPO, check=True, capture_output=True)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "metrics" and "num_tokens" in e]
    # Skip the first steps (compilation, allocator warm-up); measure the steady state.
    warm = steps[len(steps) // 5 :]
    tokens = warm[-1]["num_tokens"] - warm[0]["num_tokens"]
    seconds = warm[-1]["time"] - warm[0]["time"]
    return {
        "arm": "packing (padding-free)" if packing else "padded batches",
        "steps": len(steps),
        "real_tokens": tokens,
        "seconds": round(seconds, 2),
        "real_tokens_per_s": round(tokens / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/training.json"))
    args = parser.parse_args()

    from workers.training.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", **SHAPES[args.shape])
        train_file = root / "train.jsonl"
        rows = variable_length_rows(args.rows, max_words=args.max_seq_length // 2)
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = [
            run_arm(model, train_file, root / name, packing, args)
            for name, packing in (("padded", False), ("packed", True))
        ]
    base = results[0]["real_tokens_per_s"]
    print(f"{'arm':<24} {'steps':>6} {'real tokens':>12} {'seconds':>8} {'tok/s':>10} {'vs padded':>10}")
    for r in results:
        r["ratio_vs_padded"] = round(r["real_tokens_per_s"] / base, 2)
        print(
            f"{r['arm']:<24} {r['steps']:>6} {r['real_tokens']:>12} {r['seconds']:>8} "
            f"{r['real_tokens_per_s']:>10} {r['ratio_vs_padded']:>9}x"
        )
    args.json.write_text(
        json.dumps({"shape": args.shape, "args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
