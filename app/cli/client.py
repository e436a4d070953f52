"""A small HTTP client for the CLI: one place that turns API errors into one-line reasons."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import httpx
import typer

from app.cli.credentials import load_token

DEFAULT_API = "http://127.0.0.1:8000"


def api_url() -> str:
    return os.environ.get("STUDIO_API_URL", DEFAULT_API).rstrip("/")


def fail(reason: str) -> NoReturn:
    typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(1)


def auth_headers() -> dict[str, str]:
    headers = {}
    if token := load_token(api_url()):
        headers["Authorization"] = f"Bearer {token}"
    if team := os.environ.get("STUDIO_TEAM_ID"):
        headers["X-Team-Id"] = team
    return headers


def client(timeout: float | None = 60.0) -> httpx.Client:
    return httpx.Client(base_url=api_url(), timeout=timeout, headers=auth_headers())


def request(method: str, path: str, **kwargs: Any) -> Any:
    try:
        with client() as http:
            response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the API at {api_url()}: {exc}")
    if response.status_code == 401:
        fail(f"401 {_detail(response)} (run `studio login`, or set STUDIO_API_KEY)")
    if response.status_code >= 400:
        fail(f"{response.status_code} {_detail(response)}")
    return response.json() if response.content else None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors: name the first field
        first = detail[0]
        return f"{'.'.join(str(p) for p in first.get('loc', [])[1:])}: {first.get('msg')}"
    return str(detail)
