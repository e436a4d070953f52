"""Start the product as real processes (uvicorn API, Celery workers) for end-to-end tests."""

from __future__ import annotations

import contextlib
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
from tests.conftest import REDIS_BASE, REDIS_DB, RUN_ID

REPO = Path(__file__).resolve().parents[2]
E2E_DB = f"studio_e2e_{RUN_ID}"
E2E_REDIS = f"{REDIS_BASE}/{REDIS_DB + 1}"  # its own Redis db, next to the in-process tests' one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ADMIN_EMAIL = "admin@e2e.test"
ADMIN_PASSWORD = "e2e-admin-password"


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # the admin's API key, once logged in
    jwt_headers: dict[str, str] = field(default_factory=dict)  # the admin's login token (platform admin)

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)

    def log_in(self) -> None:
        """Log in as the admin over HTTP and act with a fresh API key from then on."""
        with httpx.Client(base_url=self.url, timeout=60) as http:
            r = http.post("/api/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
            assert r.status_code == 200, r.text
            jwt_headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
            team = http.get("/api/users/me", headers=jwt_headers).json()["teams"][0]["id"]
            r = http.post(f"/api/teams/{team}/api-keys/", json={"name": "e2e", "role": "admin"}, headers=jwt_headers)
            assert r.status_code == 201, r.text
        self.headers = {"Authorization": f"Bearer {r.json()['key']}"}
        self.jwt_headers = jwt_headers

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        old = self.procs.get(name)
        assert old is None or old.poll() is not None, f"{name} is already running: stop it first"
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def start_inference_worker(self) -> None:
        """An inference worker (thread pool), returning once it reports itself; one per stack."""
        if "inference" in self.procs and self.procs["inference"].poll() is None:
            return
        self.start("inference", worker_command(["inference"], "inference-test@%h", concurrency=40))
        with self.http() as http:
            wait_for(
                lambda: http.get("/admin/stats", headers=self.jwt_headers).json()["workers"],
                timeout_s=90,
                what="the inference worker to report",
            )

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    @contextmanager
    def stopped(self, name: str, then: list[str], sig: signal.Signals = signal.SIGTERM) -> Iterator[None]:
        """Stop `name` with `sig`, and start it again as `then` however the block ends: a failing check
        inside must not leave the rest of the module's tests without that process."""
        self.stop(name, sig)
        try:
            yield
        finally:
            self.start(name, then)


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
    subprocess.run(
        [sys.executable, "-m", "app.cli.main", "migrate"], cwd=REPO, env=env, check=True, capture_output=True
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli.main",
            "users",
            "create-admin",
            "--email",
            ADMIN_EMAIL,
            "--password",
            ADMIN_PASSWORD,
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, logs=logs)
    try:
        stack.start("api", api_command("127.0.0.1", port))
        if workers:
            stack.start("worker", worker_command(["train.cpu"], "train-test@%h"))
        assert wait_healthy(stack.url, procs=list(stack.procs.values())), stack.log("api")
        stack.log_in()
        yield stack
    finally:
        for name in list(stack.procs):
            try:
                stack.stop(name)
            except Exception as exc:  # stop the others anyway
                print(f"stopping {name} failed: {exc}", file=sys.stderr)
        # Whatever escaped (a crashed teardown, a grandchild): nothing of this stack may outlive it, or it
        # would keep consuming the shared Redis queues of later runs.
        for pid in processes_with_env(f"STUDIO_DATA_DIR={env['STUDIO_DATA_DIR']}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_with_env(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` (e.g. this stack's data dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
