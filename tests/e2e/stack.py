"""Start the product as real processes (uvicorn API, Celery workers) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.cli.processes import api_command, wait_healthy, worker_command

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(predicate, timeout_s: float = 120.0, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextmanager
def running_stack(env_overrides: dict[str, str], logs: Path, workers: bool = True) -> Iterator[Stack]:
    """Migrate, then start the API and a training worker with the given STUDIO_* environment."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **env_overrides, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "app.cli.main", "migrate"], cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, logs=logs)
    try:
        stack.start("api", api_command("127.0.0.1", port))
        if workers:
            stack.start("worker", worker_command(["train.cpu"], "train-test@%h"))
        assert wait_healthy(stack.url, procs=list(stack.procs.values())), stack.log("api")
        yield stack
    finally:
        for name in list(stack.procs):
            stack.stop(name)
