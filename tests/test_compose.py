"""docker/compose.yml runs the whole fleet (docker itself is not available here): every service of ours
runs a real `studio` command with options the CLI accepts, every STUDIO_* variable it sets is a real setting
with a valid value, and the fleet has what it needs (database, broker, object store with its bucket,
migrations, API, a training worker, an inference worker, Flower)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from app.cli.main import app as cli
from app.core.config import Settings

pytestmark = pytest.mark.fast
COMPOSE = Path(__file__).resolve().parents[1] / "docker" / "compose.yml"
COMPOSE_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
NOT_SETTINGS = {"STUDIO_FLOWER_BASIC_AUTH"}  # read by `studio flower` itself (its --basic-auth option)


def services() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def test_the_fleet_is_complete() -> None:
    found = services()
    assert {"postgres", "redis", "minio", "minio-bucket", "migrate", "api", "flower"} <= set(found)
    commands = [s.get("command", []) for s in found.values()]
    assert ["studio", "migrate"] in commands
    workers = [c for c in commands if c[:2] == ["studio", "worker"]]
    queues = {c[c.index("--queue") + 1] for c in workers}
    assert "inference" in queues and any(q.startswith("train.") for q in queues)
    assert "mc mb --ignore-existing" in " ".join(found["minio-bucket"]["entrypoint"])


@pytest.mark.parametrize("name", sorted(n for n, s in services().items() if "build" in s))
def test_each_command_is_a_real_studio_command(name: str) -> None:
    service = services()[name]
    argv = service.get("command") or _image_command(service["build"]["dockerfile"])
    assert argv[0] == "studio", argv
    group = typer.main.get_command(cli)
    context = group.make_context("studio", list(argv[1:2]), resilient_parsing=True)
    command = group.get_command(context, argv[1])  # type: ignore[attr-defined]
    assert command is not None, f"{name}: `studio {argv[1]}` is not a command"
    command.make_context(argv[1], list(argv[2:]))  # raises on an option the command does not take


@pytest.mark.parametrize("name", sorted(n for n, s in services().items() if "build" in s))
def test_each_studio_variable_is_a_real_setting(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: str(v) for k, v in services()[name]["environment"].items()}
    for key in list(env):
        if key.startswith("STUDIO_") and key not in NOT_SETTINGS:
            assert _is_setting(key.removeprefix("STUDIO_").lower().split("__")), f"{name}: {key} is no setting"
    for key, value in env.items():
        monkeypatch.setenv(key, COMPOSE_DEFAULT.sub(lambda m: m.group(1), value))  # compose's ${VAR:-default}
    Settings(_env_file=None)  # type: ignore[call-arg]  # every value parses


def _image_command(dockerfile: str) -> list[str]:
    """The CMD of the service's image (a JSON array in its Dockerfile)."""
    lines = (COMPOSE.parents[1] / dockerfile).read_text().splitlines()
    cmd = [line for line in lines if line.startswith("CMD ")]
    assert cmd, f"{dockerfile} has no CMD"
    return list(json.loads(cmd[-1].removeprefix("CMD ")))


def _is_setting(path: list[str]) -> bool:
    model: Any = Settings
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return True
