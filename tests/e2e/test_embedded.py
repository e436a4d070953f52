"""The embedded default: `studio up` on SQLite + kombu's SQLAlchemy transport, driven by the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from app.cli.processes import wait_healthy
from tests.e2e.stack import REPO, free_port, processes_with_env

pytestmark = pytest.mark.e2e
EMBEDDED_ENV = ("STUDIO_DATABASE__URL", "STUDIO_BROKER__URL", "STUDIO_EVENTS__REDIS_URL")


def studio(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_studio_up_trains_on_the_embedded_default(tmp_path: Path, tiny_model: Path, alpaca_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_ENV}
    env |= {
        "STUDIO_DATA_DIR": str(tmp_path / ".studio"),
        "STUDIO_API_URL": f"http://127.0.0.1:{free_port()}",
        "PYTHONUNBUFFERED": "1",
        "STUDIO_CREDENTIALS_FILE": str(tmp_path / "credentials.json"),
    }
    env.pop("STUDIO_API_KEY", None)
    port = env["STUDIO_API_URL"].rsplit(":", 1)[1]
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", "up", "--port", port],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert wait_healthy(env["STUDIO_API_URL"], procs=[up]), (tmp_path / "up.log").read_text()[-3000:]
        # First start created a local admin, printed its password once, and logged this CLI in.
        assert "created admin admin@studio.local with password" in (tmp_path / "up.log").read_text()
        key = json.loads((tmp_path / "credentials.json").read_text())[env["STUDIO_API_URL"]]
        assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0
        assert (
            studio(env | {"STUDIO_CREDENTIALS_FILE": str(tmp_path / "none.json")}, "datasets", "list").returncode == 1
        )
        uploaded = studio(env, "datasets", "upload", str(alpaca_file))
        assert uploaded.returncode == 0, uploaded.stderr
        dataset_id = uploaded.stdout.split()[1]

        submit = f"experiments submit --base-model {tiny_model} --dataset {dataset_id}".split()
        bad = studio(env, *submit, "--name", "x", "--set", "learning_rate=-1")
        assert bad.returncode == 1 and "hyperparameters.learning_rate" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1

        run = studio(env, *submit, "--name", "demo", "--recipe", "tiny_lora_cpu", "--watch")
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "up.log").read_text()[-3000:]
        assert "succeeded" in run.stdout
        assert "train rows" in run.stdout and "tokens (mean" in run.stdout  # token statistics of the run
        experiment_id = run.stdout.split()[1]
        with httpx.Client(base_url=env["STUDIO_API_URL"], headers={"Authorization": f"Bearer {key}"}) as http:
            metrics = http.get(f"/api/experiments/{experiment_id}/metrics").json()["data"]
            losses = [m["data"]["loss"] for m in metrics if "loss" in m["data"]]
            assert sum(losses[-3:]) / 3 < losses[0]
            files = {a["path"] for a in http.get(f"/api/experiments/{experiment_id}/artifacts").json()["data"]}
            assert {"adapter_model.safetensors", "README.md"} <= files
        # Serving on the embedded default: kombu's SQLAlchemy broker, replies polled from SQLite.
        deployed = studio(env, "deployments", "create", "--experiment", experiment_id, "--name", "demo-chat")
        assert deployed.returncode == 0, deployed.stderr
        chat = studio(
            env, "chat", "demo-chat", "What is the capital of France?", "--max-tokens", "8", "--temperature", "0"
        )
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr + (tmp_path / "up.log").read_text()[-3000:]
        # The README's way to an SDK key: log in with the printed password (API keys cannot mint keys).
        password = re.search(r"with password (\S+)", (tmp_path / "up.log").read_text())
        assert password, (tmp_path / "up.log").read_text()[-2000:]
        assert studio(env, "keys", "create", "--name", "sdk").returncode == 1  # still on the CLI's API key
        logged_in = studio(env, "login", "--email", "admin@studio.local", "--password", password.group(1))
        assert logged_in.returncode == 0, logged_in.stderr
        created = studio(env, "keys", "create", "--name", "sdk")
        assert created.returncode == 0, created.stderr
        sdk_key = created.stdout.strip().splitlines()[-1]
        assert sdk_key.startswith("fts_")
        client = openai.OpenAI(base_url=f"{env['STUDIO_API_URL']}/v1", api_key=sdk_key, max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model="demo-chat",
            max_tokens=8,
            temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert answer.choices[0].message.content == chat.stdout.strip()
        missing = studio(env, "chat", "no-such-model", "hi")
        assert missing.returncode == 1 and "no-such-model" in missing.stderr
        assert (tmp_path / ".studio" / "studio.db").exists()
        assert list((tmp_path / ".studio" / "storage" / "experiments").glob("*/artifacts/adapter_model.safetensors"))
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    assert not processes_with_env(f"STUDIO_DATA_DIR={tmp_path / '.studio'}"), "studio up left processes behind"
