"""The `studio` command: run the product, and drive it over its REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli import accounts, deployments, experiments
from app.cli.client import fail, request
from app.core.config import Settings

app = typer.Typer(help="Fine-Tuning Studio: fine-tune open LLMs and serve them.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload and inspect datasets.", no_args_is_help=True)
models_app = typer.Typer(help="Local models for demos and tests.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(experiments.app, name="experiments")
app.add_typer(models_app, name="models")
app.add_typer(accounts.users_app, name="users")
app.add_typer(accounts.keys_app, name="keys")
app.add_typer(deployments.app, name="deployments")
app.command()(deployments.chat)
app.command()(accounts.login)
app.command()(accounts.logout)
console = Console()
LOCAL_ADMIN = "admin@studio.local"


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    host: Annotated[str, typer.Option(help="API bind address")] = "127.0.0.1",
) -> None:
    """Run everything on this machine: migrate, then API + a training worker + an inference worker."""
    from app.cli.processes import run_all
    from app.core.config import get_settings
    from app.core.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade()
    first_admin(settings, f"http://{host}:{port}")
    raise typer.Exit(run_all(settings, host, port))


def first_admin(settings: Settings, url: str) -> None:
    """No users yet: create the admin from STUDIO_ADMIN_EMAIL/PASSWORD, or in development a local admin
    with a random password (printed once), and log this machine's CLI in with an API key for it."""
    from app.cli.credentials import save_token
    from app.core.db import session_scope
    from app.core.passwords import generate_password
    from app.models import DEFAULT_TEAM_ID, ApiKeyCreate, Role
    from app.services import accounts, api_keys
    from app.services.principal import Principal

    with session_scope() as session:
        if accounts.user_count(session=session):
            return
        if settings.admin_email and settings.admin_password.get_secret_value():
            accounts.bootstrap_admin(session=session, settings=settings)
            return
        if settings.environment != "development":
            fail("no users yet: set STUDIO_ADMIN_EMAIL and STUDIO_ADMIN_PASSWORD, or run `studio users create-admin`")
        password = generate_password()  # random, and checked against the password policy
        admin = accounts.create_admin(session=session, email=LOCAL_ADMIN, password=password)
        actor = Principal(admin.id, DEFAULT_TEAM_ID, Role.admin)
        _, key = api_keys.create_key(session=session, actor=actor, body=ApiKeyCreate(name="local CLI", role=Role.admin))
    path = save_token(url, key)
    console.print(
        f"[bold]First start:[/] created admin [cyan]{LOCAL_ADMIN}[/] with password [cyan]{password}[/] "
        f"(shown once). This machine's CLI is logged in ({path}).",
        soft_wrap=True,
    )


@app.command()
def api(
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    host: Annotated[str, typer.Option(help="API bind address")] = "127.0.0.1",
) -> None:
    """Run the API server alone (production: several behind a load balancer)."""
    from app.cli.processes import api_command

    os.execv(sys.executable, api_command(host, port))  # noqa: S606 - fixed argv


@app.command()
def worker(
    queue: Annotated[str, typer.Option(help="Queues to consume, comma-separated (train.h100, inference)")],
    gpus: Annotated[str | None, typer.Option(help="GPU ids this worker owns, e.g. 0,1")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name; default <queue>@<host>")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Jobs at once: training 1 per GPU group; inference default from settings")
    ] = None,
) -> None:
    """Run one Celery worker pinned to a GPU group."""
    from app.cli.processes import worker_command, worker_env

    queues = [q.strip() for q in queue.split(",") if q.strip()]
    if not queues:
        fail("--queue: name at least one queue")
    suffix = f"-gpu{gpus.replace(',', '-')}" if gpus else ""
    command = worker_command(queues, name or f"{queues[0]}{suffix}@%h", concurrency)
    os.execve(sys.executable, command, worker_env(gpus))  # noqa: S606 - fixed argv


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from app.core.migrate import upgrade

    upgrade()
    console.print("database is up to date")


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Flower port")] = 5555,
    basic_auth: Annotated[
        str | None, typer.Option(envvar="STUDIO_FLOWER_BASIC_AUTH", help="user:password (required)")
    ] = None,
) -> None:
    """Run the Flower monitoring UI for the worker fleet, behind basic auth."""
    if not basic_auth or ":" not in basic_auth:
        fail("--basic-auth user:password (or STUDIO_FLOWER_BASIC_AUTH) is required: Flower can revoke tasks")
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app.core.celery_app",
        "flower",
        f"--port={port}",
        f"--basic-auth={basic_auth}",
    ]
    os.execv(sys.executable, argv)  # noqa: S606 - fixed argv


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, JSON, CSV or Parquet")],
    name: Annotated[str | None, typer.Option(help="Dataset name; default the file name")] = None,
    format: Annotated[str | None, typer.Option(help="Row format; detected when omitted")] = None,
    eval_fraction: Annotated[float, typer.Option(min=0, max=0.99)] = 0.1,
) -> None:
    """Upload a dataset file; prints its id."""
    data = {
        "eval_fraction": str(eval_fraction),
        **({"name": name} if name else {}),
        **({"format": format} if format else {}),
    }
    with path.open("rb") as f:
        body = request("POST", "/api/datasets/upload", files={"file": (path.name, f)}, data=data)
    console.print(
        f"[green]dataset {body['id']}[/] {body['name']}: {body['format']}, "
        f"{body['row_count']} rows ({body['train_rows']} train / {body['eval_rows']} eval)"
    )


@datasets_app.command("list")
def datasets_list() -> None:
    """List datasets."""
    body = request("GET", "/api/datasets/")
    table = Table("id", "name", "format", "rows", "created")
    for d in body["data"]:
        table.add_row(d["id"], d["name"], d["format"], str(d["row_count"]), d["created_at"][:19])
    console.print(table)


@models_app.command("tiny")
def models_tiny(
    output_dir: Annotated[Path, typer.Argument(help="Where to write the model")],
    seed: Annotated[int, typer.Option(help="Same seed, same bytes")] = 0,
) -> None:
    """Build a tiny random Llama with a locally trained tokenizer and chat template (offline)."""
    # Built by the worker code in its own process: the CLI never imports torch or workers.
    argv = [sys.executable, "-m", "workers.training.tiny_model", str(output_dir), "--seed", str(seed)]
    done = subprocess.run(argv, capture_output=True, text=True)  # noqa: S603 - fixed argv
    if done.returncode != 0:
        fail(f"building the tiny model failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    path = Path(done.stdout.strip().splitlines()[-1])
    console.print(f"tiny model written to {path}")
    console.print(json.dumps({"path": str(path)}))


if __name__ == "__main__":
    app()
