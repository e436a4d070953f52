"""The fleet on this machine, with CPU workers and tiny models, compared in one run with the routing of before.

(a) Inference: two base models (two different tiny random models), two inference workers
    (`max_base_models` 1), mixed concurrent traffic (half the requests for each model, interleaved), in
    `--rounds` waves. Arms: `shared` (one queue, whichever worker is free loads what it gets: the routing
    before placement) and `placed` (app/services/placement.py). Reported: errors, loads per (model, worker),
    generated tokens/s.
(b) Training dispatch: `--jobs` short jobs submitted at once to 1 and then 2 training workers. Reported:
    submit → running of the first job, and finished → next claimed (the gap a worker idles between two
    queued jobs), as a share of a job's wall time.

    python benchmarks/fleet.py                  # about 5 minutes on 2 cores; needs Postgres and Redis
    python benchmarks/fleet.py --out fleet.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.cli.processes import api_command, wait_healthy, worker_command  # noqa: E402

ADMIN, PASSWORD = "bench@studio.local", "benchmark-password"
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Greet the user", "Tell me a story"]


class Fleet:
    """API + the given workers as real processes on a fresh Postgres database and Redis db."""

    def __init__(self, root: Path, database: str, redis_url: str, env: dict[str, str]) -> None:
        self.root, self.port = root, 8766
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "STUDIO_DATA_DIR": str(root),
            "STUDIO_DATABASE__URL": database,
            "STUDIO_BROKER__URL": redis_url,
            "STUDIO_EVENTS__REDIS_URL": redis_url,
            "STUDIO_INFERENCE__HEARTBEAT_INTERVAL_S": "0.5",
            **env,
        }
        self.env.pop("STUDIO_API_KEY", None)
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Fleet:
        for args in (["migrate"], ["users", "create-admin", "--email", ADMIN, "--password", PASSWORD]):
            subprocess.run([sys.executable, "-m", "app.cli.main", *args], cwd=REPO, env=self.env, check=True)
        self.start(api_command("127.0.0.1", self.port))
        if not wait_healthy(self.url, procs=self.procs):
            raise SystemExit(f"the API did not start; see {self.root / 'fleet.log'}")
        http = httpx.Client(base_url=self.url, timeout=600)
        token = http.post("/api/auth/login", data={"username": ADMIN, "password": PASSWORD}).json()["access_token"]
        self.admin = {"Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=self.url, timeout=600, headers=self.admin)
        return self

    def start(self, argv: list[str]) -> None:
        log = (self.root / "fleet.log").open("ab")
        self.procs.append(
            subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def wait(self, what: str, ready: Any, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.root / 'fleet.log'}")
            time.sleep(0.5)


def fresh_database(name: str) -> str:
    import psycopg

    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def inference_arm(
    routing: str, models: dict[str, Path], root: Path, redis_url: str, requests: int, rounds: int
) -> dict[str, Any]:
    env = {"STUDIO_INFERENCE__ROUTING": routing, "STUDIO_INFERENCE__MAX_BASE_MODELS": "1"}
    with Fleet(root, fresh_database(f"bench_fleet_{routing}"), redis_url, env) as fleet:
        for name in ("inf-1", "inf-2"):
            fleet.start(worker_command(["inference"], f"{name}@%h", concurrency=requests + 8))
        fleet.wait("two inference workers", lambda: len(fleet.http.get("/admin/stats").json()["workers"]) == 2)
        for name, path in models.items():
            assert fleet.http.post("/api/deployments/", json={"base_model": str(path), "name": name}).status_code == 201

        def ask(i: int) -> tuple[int, int]:
            body = {
                "model": list(models)[i % 2],
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
            }
            r = fleet.http.post("/v1/chat/completions", json=body)
            return r.status_code, (r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0)

        for i in range(len(models)):  # one request per model first: its first load is not timed
            ask(i)
        statuses: Counter[int] = Counter()
        tokens, seconds = 0, 0.0
        with ThreadPoolExecutor(requests) as pool:
            for _ in range(rounds):
                start = time.perf_counter()
                for status, got in pool.map(ask, range(requests)):
                    statuses[status] += 1
                    tokens += got
                seconds += time.perf_counter() - start
        time.sleep(1.5)  # the workers' last heartbeat
        workers = fleet.http.get("/admin/stats").json()["workers"]
        loads = {
            f"{name}@{w['name'].split('@')[0]}": w.get("loads", {}).get(str(path), {}).get("count", 0)
            for w in workers
            for name, path in models.items()
        }
    return {
        "arm": routing,
        "requests": requests * rounds,
        "errors": sum(n for status, n in statuses.items() if status != 200),
        "error_codes": {str(k): v for k, v in statuses.items() if k != 200},
        "loads": loads,
        "total_loads": sum(loads.values()),
        "tokens_per_s": tokens / seconds if seconds else 0.0,
    }


def dispatch_arm(workers: int, model: Path, root: Path, redis_url: str, jobs: int) -> dict[str, Any]:
    with Fleet(root, fresh_database(f"bench_dispatch_{workers}"), redis_url, {}) as fleet:
        for i in range(workers):
            fleet.start(worker_command(["train.cpu"], f"train-{i}@%h"))
        fleet.wait("the training workers", lambda: len(fleet.http.get("/admin/fleet").json()["training"]) == workers)
        rows = [{"prompt": q, "completion": " an answer"} for q in QUESTIONS] * 4
        dataset = fleet.http.post("/api/datasets/", json={"name": "d", "rows": rows}).json()["id"]
        body = {
            "base_model": str(model),
            "dataset_id": dataset,
            "recipe": "tiny_lora_cpu",
            "hyperparameters": {"max_steps": 2},
        }
        ids = [fleet.http.post("/api/experiments/", json={**body, "name": f"j{i}"}).json()["id"] for i in range(jobs)]

        def done() -> bool:
            return all(fleet.http.get(f"/api/experiments/{i}").json()["status"] == "succeeded" for i in ids)

        fleet.wait("the jobs", done, timeout_s=600)
        runs = [fleet.http.get(f"/api/experiments/{i}").json() for i in ids]
    t = {k: [datetime.fromisoformat(r[k]) for r in runs] for k in ("created_at", "started_at", "finished_at")}
    walls = [(f - s).total_seconds() for s, f in zip(t["started_at"], t["finished_at"], strict=True)]
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_worker.setdefault(run["worker"], []).append(run)
    gaps = []
    for own in by_worker.values():
        own.sort(key=lambda r: r["started_at"])
        gaps += [
            (datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["finished_at"])).total_seconds()
            for a, b in zip(own, own[1:], strict=False)
        ]
    first = min(t["started_at"]) - min(t["created_at"])
    wall = statistics.mean(walls)
    return {
        "arm": f"{workers} training worker(s)",
        "jobs": jobs,
        "job_wall_s": wall,
        "submit_to_running_s": first.total_seconds(),
        "finished_to_next_claimed_s": statistics.mean(gaps) if gaps else 0.0,
        "gap_share_of_job": (statistics.mean(gaps) / wall) if gaps else 0.0,
        "makespan_s": (max(t["finished_at"]) - min(t["created_at"])).total_seconds(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="Concurrent requests per wave")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--out", type=Path, default=Path("fleet-benchmark.json"))
    args = parser.parse_args()

    import redis

    from workers.training.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="studio-fleet-bench-") as tmp:
        root = Path(tmp)
        models = {"model-a": build_tiny_model(root / "a", seed=0), "model-b": build_tiny_model(root / "b", seed=1)}
        results: dict[str, list[dict[str, Any]]] = {"inference": [], "dispatch": []}
        for i, routing in enumerate(("shared", "placed")):
            redis.Redis.from_url(args.redis_url).flushdb()
            results["inference"].append(
                inference_arm(routing, models, root / f"inf-{i}", args.redis_url, args.requests, args.rounds)
            )
        for workers in (1, 2):
            redis.Redis.from_url(args.redis_url).flushdb()
            results["dispatch"].append(
                dispatch_arm(workers, models["model-a"], root / f"train-{workers}", args.redis_url, args.jobs)
            )

    shared, placed = results["inference"]
    print(f"\n(a) inference, 2 workers x max_base_models 1, 2 base models, {args.requests} concurrent x {args.rounds}")
    print(f"{'routing':<10}{'errors':>8}{'loads':>8}{'tokens/s':>10}{'vs shared':>11}  loads per (model@worker)")
    for arm in results["inference"]:
        ratio = arm["tokens_per_s"] / shared["tokens_per_s"] if shared["tokens_per_s"] else float("nan")
        counts = f"{arm['arm']:<10}{arm['errors']:>8}{arm['total_loads']:>8}"
        print(f"{counts}{arm['tokens_per_s']:>10.1f}{ratio:>10.2f}x  {arm['loads']}")
    print(f"\n(b) training dispatch, {args.jobs} jobs of max_steps 2 submitted at once")
    print(f"{'arm':<24}{'job wall s':>11}{'submit->run s':>15}{'gap s':>8}{'gap/job':>9}{'makespan s':>12}")
    for arm in results["dispatch"]:
        print(
            f"{arm['arm']:<24}{arm['job_wall_s']:>11.1f}{arm['submit_to_running_s']:>15.2f}"
            f"{arm['finished_to_next_claimed_s']:>8.2f}{arm['gap_share_of_job']:>8.1%}{arm['makespan_s']:>12.1f}"
        )
    args.out.write_text(json.dumps(results, indent=2, default=str))
    speedup = placed["tokens_per_s"] / max(shared["tokens_per_s"], 1e-9)
    print(f"\nwritten to {args.out}; placed vs shared: {speedup:.2f}x tokens/s")


if __name__ == "__main__":
    main()
