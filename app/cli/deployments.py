"""`studio deployments ...` and `studio chat`: serve a run, and talk to it from the terminal."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.table import Table

from app.cli.client import client, fail, request

app = typer.Typer(help="Serve experiments and base models behind the OpenAI-compatible API.", no_args_is_help=True)
console = Console()


@app.command("create")
def create(
    experiment: Annotated[str | None, typer.Option(help="Serve this succeeded experiment's adapter")] = None,
    base_model: Annotated[str | None, typer.Option(help="Or serve a base model as is")] = None,
    name: Annotated[str | None, typer.Option(help="The model name clients use; default from the run")] = None,
) -> None:
    """Deploy; prints the model name to pass to OpenAI clients."""
    body: dict[str, Any] = {"experiment_id": experiment, "base_model": base_model, "name": name}
    created = request("POST", "/api/deployments/", json={k: v for k, v in body.items() if v is not None})
    console.print(f"[green]deployment {created['id']}[/]: model [cyan]{created['model']}[/]")


@app.command("list")
def list_() -> None:
    """The team's deployments."""
    table = Table("id", "model", "base model", "experiment", "status")
    for d in request("GET", "/api/deployments/")["data"]:
        table.add_row(d["id"], d["model"], d["base_model"][-40:], d["experiment_id"] or "", d["status"])
    console.print(table)


@app.command("retire")
def retire(deployment_id: Annotated[str, typer.Argument(help="Deployment id")]) -> None:
    """Stop serving a deployment."""
    request("DELETE", f"/api/deployments/{deployment_id}")
    console.print(f"retired {deployment_id}")


def chat(
    model: Annotated[str, typer.Argument(help="Deployment model name")],
    message: Annotated[str, typer.Argument(help="Your message")],
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0, max=2)] = 0.7,
) -> None:
    """One chat turn with a deployment, streamed to the terminal."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    with client(timeout=None) as http, connect_sse(http, "POST", "/v1/chat/completions", json=body) as source:
        if source.response.status_code >= 400:
            source.response.read()
            fail(f"{source.response.status_code} {source.response.json().get('error', {}).get('message')}")
        for sse in source.iter_sse():
            if sse.data == "[DONE]":
                break
            chunk = json.loads(sse.data)
            if "error" in chunk:
                fail(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                typer.echo(choice["delta"].get("content") or "", nl=False)
    typer.echo()
