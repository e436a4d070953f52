"""`studio experiments`: submit, list, show, watch (live progress bar and loss), stop."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.client import client, fail, request

app = typer.Typer(help="Submit and follow fine-tuning experiments.", no_args_is_help=True)
console = Console()
TERMINAL = {"succeeded", "failed", "cancelled"}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value`: values are read as JSON when they parse (numbers, bools, lists)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"--set {pair!r}: expected key=value")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


@app.command()
def submit(
    name: Annotated[str, typer.Option(help="Experiment name")],
    base_model: Annotated[str, typer.Option(help="Hub id or local model directory")],
    dataset: Annotated[str, typer.Option(help="Dataset id")],
    recipe: Annotated[str | None, typer.Option(help="Preset from config/recipes")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value (repeatable)")] = None,
    queue: Annotated[str | None, typer.Option(help="Training queue (GPU class)")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs to train on (processes on a CPU queue)")] = 1,
    watch_: Annotated[bool, typer.Option("--watch", help="Follow progress until it ends")] = False,
) -> None:
    """Submit an experiment; prints its id."""
    body = {
        "name": name,
        "base_model": base_model,
        "dataset_id": dataset,
        "recipe": recipe,
        "hyperparameters": parse_overrides(set_ or []),
        "queue": queue,
        "gpus": gpus,
    }
    experiment = request("POST", "/api/experiments/", json=body)
    console.print(f"[green]experiment {experiment['id']}[/] queued on {experiment['queue']}")
    print_waiting(experiment)
    print_warnings(experiment)
    if watch_:
        watch(experiment["id"])


@app.command("list")
def list_(status: Annotated[str | None, typer.Option(help="Filter by status")] = None) -> None:
    """List experiments, newest first."""
    body = request("GET", "/api/experiments/", params={"status": status} if status else None)
    table = Table("id", "name", "status", "base model", "created")
    for e in body["data"]:
        table.add_row(e["id"], e["name"], e["status"], e["base_model"][-40:], e["created_at"][:19])
    console.print(table)


@app.command()
def show(experiment_id: str) -> None:
    """Show one experiment as JSON, then what the dataset report warned of at submit."""
    experiment = request("GET", f"/api/experiments/{experiment_id}")
    console.print_json(json.dumps(experiment))
    print_waiting(experiment)
    print_warnings(experiment)


def print_waiting(experiment: dict[str, Any]) -> None:
    """Why a queued run cannot start (no live worker of its class, or none with its GPUs)."""
    if reason := experiment.get("waiting_reason"):
        console.print(f"[yellow]waiting:[/] {reason}", highlight=False)


def print_warnings(experiment: dict[str, Any]) -> None:
    """The dataset report's findings that did not block the run (duplicates, rows that will be cut, ...)."""
    for warning in experiment.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


@app.command()
def stop(experiment_id: str) -> None:
    """Stop (cancel) an experiment."""
    experiment = request("POST", f"/api/experiments/{experiment_id}/stop")
    console.print(
        f"experiment {experiment_id}: {experiment['status']}" + (" (stopping)" if experiment["stop_requested"] else "")
    )


@app.command()
def pause(experiment_id: str) -> None:
    """Pause an experiment: it checkpoints at the end of its step and frees its worker."""
    experiment = request("POST", f"/api/experiments/{experiment_id}/pause")
    pausing = experiment["status"] == "running" and experiment["pause_requested"]
    console.print(f"experiment {experiment_id}: {experiment['status']}" + (" (pausing)" if pausing else ""))


@app.command()
def resume(experiment_id: str) -> None:
    """Queue a paused, failed or cancelled experiment again; it continues from its last checkpoint."""
    experiment = request("POST", f"/api/experiments/{experiment_id}/start")
    console.print(f"experiment {experiment_id}: {experiment['status']}")


@app.command()
def watch(experiment_id: str) -> None:
    """Follow an experiment live: progress bar, loss; exit code 0 only if it succeeds."""
    experiment = request("GET", f"/api/experiments/{experiment_id}")
    total = experiment["hyperparameters"].get("max_steps") or 0
    status = experiment["status"]
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}"),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(status, total=total if total > 0 else None, loss="")
        try:
            with (
                client(timeout=None) as http,
                connect_sse(http, "GET", f"/api/experiments/{experiment_id}/events") as source,
            ):
                for sse in source.iter_sse():
                    if not sse.data:  # keep-alive ping
                        continue
                    data = json.loads(sse.data)
                    if sse.event == "status":
                        status = data["status"]
                        progress.update(task, description=status)
                    elif sse.event == "started" and (tokens := data.get("train_tokens")):
                        over = tokens["rows_over_max_seq_length"]
                        progress.console.print(
                            f"{data['train_rows']} train rows, {tokens['tokens_total']:,} tokens "
                            f"(mean {tokens['tokens_mean']}, max {tokens['tokens_max']})"
                            + (
                                f" — [yellow]{over} rows longer than max_seq_length={tokens['max_seq_length']} "
                                "will be cut[/]"
                                if over
                                else ""
                            )
                        )
                    elif sse.event == "metrics" and "loss" in data:
                        progress.update(task, completed=data.get("step", 0), loss=f"loss {data['loss']:.4f}")
        except httpx.HTTPError as exc:
            fail(f"lost the event stream: {exc}")
    final = request("GET", f"/api/experiments/{experiment_id}")
    console.print(
        f"experiment {experiment_id}: {final['status']}" + (f" — {final['error']}" if final.get("error") else "")
    )
    if final["status"] != "succeeded":
        raise typer.Exit(1)
