"""Start the product's processes: API (uvicorn) and Celery workers, alone or all together (`up`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from app.core.config import Settings, get_settings


def worker_command(queues: list[str], name: str, concurrency: int | None = None) -> list[str]:
    """Training workers run one job per process (prefork); inference workers run a thread per request,
    so concurrent requests share one engine and meet in its batch."""
    serving = "inference" in queues
    if concurrency is None:
        concurrency = get_settings().inference.concurrency if serving else 1
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app.core.celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "-n",
        name,
        "--concurrency",
        str(concurrency),
        "--pool",
        "threads" if serving else "prefork",
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]


def api_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port)]


def worker_env(gpus: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if gpus is not None:
        # Pin before CUDA initialises: the worker and its trainer children see only these GPUs.
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def wait_healthy(url: str, timeout_s: float = 120.0, procs: list[subprocess.Popen[bytes]] | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if procs and any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def run_all(settings: Settings, host: str, port: int) -> int:
    """`studio up`: API + one training worker + one inference-queue worker; Ctrl-C stops all."""
    signal.signal(signal.SIGTERM, _interrupt)  # stop the children on `kill` too, not only Ctrl-C
    env = dict(os.environ)
    train_queues = [q.name for q in settings.training.queues]
    procs = [
        subprocess.Popen(api_command(host, port), env=env),
        subprocess.Popen(worker_command(train_queues, "train@%h"), env=env),
        subprocess.Popen(worker_command(["inference", "default"], "inference@%h"), env=env),
    ]
    url = f"http://{host}:{port}"
    try:
        if not wait_healthy(url, procs=procs):
            print("error: the API did not become healthy", file=sys.stderr)
            return 1
        print(f"Fine-Tuning Studio is up at {url} (API docs: {url}/docs). Ctrl-C stops it.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("error: a studio process exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
