"""Serving throughput through the whole path: OpenAI client → API → inference queue → worker engine → replies.

Generated tokens/s with 1, 16 and 64 concurrent requests (each exactly `--new-tokens` tokens, greedy,
`ignore_eos`), against plain sequential HF `model.generate` on the same model and prompts in the same run.
The stack is started here: the API (uvicorn) and one inference worker (Celery, thread pool) on a temporary
SQLite database, with Redis as broker and reply channel when one answers at `--redis-url` (else kombu's
SQLAlchemy transport and polled replies: slower, but no services needed). On CUDA the table also shows
the memory-bandwidth bound, `concurrency x HBM bandwidth / weight bytes`, and the fraction reached.

    python benchmarks/inference.py                           # tiny random Llama on CPU, about a minute
    python benchmarks/inference.py --shape tinyllama         # random TinyLlama-1.1B shape, bf16, on CUDA
    python benchmarks/inference.py --model PATH --out r.json # an existing local model
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.cli.processes import api_command, wait_healthy, worker_command  # noqa: E402
from benchmarks.inference_engine import build_tinyllama, run_hf_baseline  # noqa: E402

ADMIN, PASSWORD = "bench@studio.local", "benchmark-password"
WORDS = "the cat likes a short story every morning and the dog reads the answer with care".split()  # noqa: SIM905


def prompt_text(i: int, words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


def redis_ok(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Stack:
    """API + one inference worker as real processes, on a temporary data dir."""

    def __init__(self, data: Path, redis_url: str | None, max_concurrency: int, new_tokens: int) -> None:
        self.env = {
            **os.environ,
            "STUDIO_DATA_DIR": str(data),
            "PYTHONUNBUFFERED": "1",
            "STUDIO_INFERENCE__MAX_BATCH_SIZE": str(max_concurrency),
            "STUDIO_INFERENCE__CONCURRENCY": str(max_concurrency + 8),
            "STUDIO_INFERENCE__MAX_TOKENS_CAP": str(max(4096, new_tokens)),
        }
        for name in ("STUDIO_DATABASE__URL", "STUDIO_BROKER__URL", "STUDIO_EVENTS__REDIS_URL", "STUDIO_API_KEY"):
            self.env.pop(name, None)
        if redis_url:
            self.env |= {"STUDIO_BROKER__URL": redis_url, "STUDIO_EVENTS__REDIS_URL": redis_url}
        self.data = data
        self.port = 8765
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "app.cli.main", *args], cwd=REPO, env=self.env, check=True, capture_output=True
        )

    def start(self) -> None:
        self.cli("migrate")
        self.cli("users", "create-admin", "--email", ADMIN, "--password", PASSWORD)
        log = (self.data / "stack.log").open("wb")
        for argv in (api_command("127.0.0.1", self.port), worker_command(["inference"], "bench@%h")):
            self.procs.append(
                subprocess.Popen(
                    argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        if not wait_healthy(self.url, procs=self.procs):
            raise SystemExit(f"the API did not start; see {self.data / 'stack.log'}")

    def stop(self) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=60)


def run_queue(stack: Stack, model: Path, prompts: list[str], concurrency: list[int], new_tokens: int) -> list[dict]:
    import openai

    http = httpx.Client(base_url=stack.url, timeout=600)
    token = http.post("/api/auth/login", data={"username": ADMIN, "password": PASSWORD}).json()["access_token"]
    admin = {"Authorization": f"Bearer {token}"}
    team = http.get("/api/users/me", headers=admin).json()["teams"][0]["id"]
    key = http.post(f"/api/teams/{team}/api-keys/", json={"name": "bench", "role": "trainer"}, headers=admin).json()
    name = http.post(
        "/api/deployments/", json={"base_model": str(model)}, headers={"Authorization": f"Bearer {key['key']}"}
    ).json()["model"]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key["key"], max_retries=0, timeout=1200)
    deadline = time.monotonic() + 120
    while not http.get("/admin/stats", headers=admin).json()["workers"]:  # the worker reports itself when ready
        if time.monotonic() > deadline:
            raise SystemExit("the inference worker did not start")
        time.sleep(0.5)

    def ask(i: int, tokens: int = new_tokens) -> int:
        done = client.completions.create(
            model=name,
            prompt=prompts[i % len(prompts)],
            max_tokens=tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return int(done.usage.completion_tokens)

    ask(0, 4)  # loads the model on the worker
    arms = []
    for c in concurrency:
        with ThreadPoolExecutor(c) as pool:
            start = time.perf_counter()
            tokens = sum(pool.map(ask, range(c)))
            seconds = time.perf_counter() - start
        arms.append(
            {
                "arm": "studio: OpenAI API -> queue -> engine",
                "concurrency": c,
                "requests": c,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
            }
        )
    time.sleep(2.5)  # workers report stats on their heartbeat (1 s)
    stats = http.get("/admin/stats", headers=admin).json()
    histogram = {
        k: v for w in stats["workers"] for m in w["models"].values() for k, v in m["batch_size_histogram"].items()
    }
    arms[-1]["batch_size_histogram"] = histogram
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "tinyllama"], default="tiny")
    parser.add_argument("--model", type=Path, help="An existing local model instead of --shape")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-words", type=int, default=128, help="Prompt length in words (~tokens)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth (H100 SXM 3350, H200 4800)")
    parser.add_argument("--out", type=Path, default=Path("inference-benchmark.json"))
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as tmp:
        root = Path(tmp)
        if args.model:
            model = args.model
        elif args.shape == "tinyllama":
            model = build_tinyllama(root / "model", device, dtype)
        else:
            from workers.training.tiny_model import build_tiny_model

            model = build_tiny_model(root / "model", seed=0)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        prompts = [prompt_text(i, args.prompt_words) for i in range(max(args.concurrency))]
        baseline = run_hf_baseline(
            model,
            [tokenizer(p)["input_ids"] for p in prompts[: args.baseline_requests]],
            args.new_tokens,
            device,
            dtype,
        )
        baseline.pop("outputs")
        redis_url = args.redis_url if args.redis_url and redis_ok(args.redis_url) else None
        if redis_url:
            import redis

            redis.Redis.from_url(redis_url).flushdb()
        stack = Stack(root / "data", redis_url, max(args.concurrency), args.new_tokens)
        stack.start()
        try:
            arms = run_queue(stack, model, prompts, args.concurrency, args.new_tokens)
        finally:
            stack.stop()
        weight_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))

    rows = [baseline, *arms]
    print(
        f"\nmodel: {args.model or args.shape} on {device} ({dtype}), prompt ~{args.prompt_words} words, "
        f"{args.new_tokens} new tokens, transport: {'redis' if redis_url else 'sql (embedded)'}"
    )
    header = f"{'arm':<40} {'conc':>5} {'tokens':>8} {'s':>8} {'tok/s':>9} {'x base':>7}"
    if cuda:
        header += f" {'bound tok/s':>12} {'of bound':>9}"
    print(header)
    for row in rows:
        row["vs_baseline"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        line = (
            f"{row['arm']:<40} {row['concurrency']:>5} {row['tokens']:>8} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>9.1f} {row['vs_baseline']:>7.2f}"
        )
        if cuda:
            bound = row["concurrency"] * args.hbm_gbps * 1e9 / weight_bytes
            row |= {"bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": row["tokens_per_s"] / bound}
            line += f" {bound:>12.0f} {row['fraction_of_bound']:>9.1%}"
        print(line)
    print(f"batch sizes seen by the worker (size: steps): {arms[-1].get('batch_size_histogram')}")
    args.out.write_text(
        json.dumps(
            {
                "device": str(device),
                "dtype": str(dtype),
                "weight_bytes": weight_bytes,
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
