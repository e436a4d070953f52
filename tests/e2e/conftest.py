from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.conftest import RUN_ID, create_database, drop_database
from tests.e2e.stack import E2E_DB, E2E_REDIS, Stack, free_port, running_stack

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "How many legs does a spider have?", "output": "A spider has eight legs."},
    {"instruction": "Greet the user", "input": "Bob", "output": "Hello Bob, nice to meet you."},
    {"instruction": "Why is the sky blue?", "output": "Sunlight scatters off the air."},
] * 4
CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["output"]},
        ]
    }
    for row in ALPACA_ROWS
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis.Redis.from_url(E2E_REDIS).flushdb()
    url = create_database(E2E_DB)
    data = tmp_path_factory.mktemp("pg-stack")
    env = {
        "STUDIO_DATA_DIR": str(data),
        "STUDIO_DATABASE__URL": url,
        "STUDIO_BROKER__URL": E2E_REDIS,
        "STUDIO_EVENTS__REDIS_URL": E2E_REDIS,
        "STUDIO_TRAINING__STALE_AFTER_S": "8",
        "STUDIO_TRAINING__REQUEUE_BACKOFF_S": "1",
        "STUDIO_TRAINING__RESEND_AFTER_S": "6",
        "STUDIO_INFERENCE__HEARTBEAT_INTERVAL_S": "0.5",
        "STUDIO_INFERENCE__WORKER_STALE_AFTER_S": "4",
        "STUDIO_INFERENCE__QUEUE_TIMEOUT_S": "15",
        "STUDIO_INFERENCE__MAX_BATCH_SIZE": "32",
        "STUDIO_API__REPORT_INLINE_ROWS": "50",  # larger datasets' reports go to a default-queue worker
    }
    try:
        with running_stack(env, data / "logs") as s:
            yield s
    finally:
        drop_database(E2E_DB)


class RedisServer:
    """A private ``redis-server`` on a free loopback port (no persistence) that a test may SIGKILL and
    start again on the same port, to cut everything that talks to it."""

    def __init__(self, workdir: Path, name: str = "redis") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("needs the redis-server binary")
        self.binary, self.workdir, self.name = binary, workdir, name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir)]
        out = (self.workdir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not start on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)


class TcpProxy:
    """Forwards a loopback port to ``upstream``. ``stop()`` closes the port and cuts every connection
    through it; ``start()`` opens the same port again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._listener.close()
            self._listener = None
        with self._lock:
            cut, self._open = self._open, set()
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the other
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A started private redis-server, killed after the test."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def private_stack(name: str, data: Path, env: dict[str, str], workers: bool = False) -> Iterator[Stack]:
    """A stack of its own (database, data dir, the given STUDIO_* settings), for fault tests that kill
    what it depends on without touching the shared ``stack``."""
    db = f"studio_e2e_{name}_{RUN_ID}"
    url = create_database(db)
    try:
        with running_stack(
            {"STUDIO_DATA_DIR": str(data), "STUDIO_DATABASE__URL": url, **env}, data / "logs", workers=workers
        ) as s:
            yield s
    finally:
        drop_database(db)


@contextmanager
def cuttable_stack(
    name: str, tmp_path_factory: pytest.TempPathFactory, *, workers: bool, env: dict[str, str] | None = None
) -> Iterator[tuple[Stack, TcpProxy, RedisServer]]:
    """A stack whose database is reached through a TCP proxy the test can cut, and whose broker and event bus
    is a private redis-server the test can kill: for outage tests that must not disturb the shared ``stack``."""
    db = f"studio_{name}_{RUN_ID}"
    direct = urlsplit(create_database(db))
    proxy = TcpProxy((direct.hostname or "127.0.0.1", direct.port or 5432)).start()
    netloc = f"{direct.username}@127.0.0.1:{proxy.port}" if direct.username else f"127.0.0.1:{proxy.port}"
    redis_server = RedisServer(tmp_path_factory.mktemp(f"{name}-redis"), f"{name}-redis").start()
    data = tmp_path_factory.mktemp(name)
    stack_env = {
        "STUDIO_DATA_DIR": str(data),
        "STUDIO_DATABASE__URL": urlunsplit(direct._replace(netloc=netloc)),
        "STUDIO_BROKER__URL": redis_server.url,
        "STUDIO_EVENTS__REDIS_URL": redis_server.url,
        **(env or {}),
    }
    try:
        with running_stack(stack_env, data / "logs", workers=workers) as stack:
            yield stack, proxy, redis_server
    finally:
        proxy.stop()
        redis_server.kill()
        drop_database(db)
