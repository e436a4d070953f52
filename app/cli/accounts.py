"""`studio login/logout`, `studio users ...` and `studio keys ...`: accounts from the command line."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli.client import api_url, fail, request
from app.cli.credentials import forget_token, save_token

users_app = typer.Typer(help="Users, invitations and the first admin.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for scripts and the OpenAI client.", no_args_is_help=True)
console = Console()
ROLES = ("viewer", "trainer", "admin")


def login(
    email: Annotated[str, typer.Option(prompt=True, help="Your email")],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, help="Your password")],
) -> None:
    """Log in to the API at STUDIO_API_URL and remember the token for this user."""
    body = request("POST", "/api/auth/login", data={"username": email, "password": password})
    path = save_token(api_url(), body["access_token"])
    console.print(f"logged in to {api_url()} as {email} (token saved in {path})")


def logout() -> None:
    """Forget the saved token for STUDIO_API_URL."""
    console.print("logged out" if forget_token(api_url()) else "no saved login for this API")


@users_app.command("create-admin")
def create_admin(
    email: Annotated[str, typer.Option(help="The admin's email")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True, hide_input=True, confirmation_prompt=True, help="At least 10 characters, not easy to guess"
        ),
    ],
    full_name: Annotated[str, typer.Option(help="Display name")] = "",
) -> None:
    """Create a platform admin (also admin of the default team), straight in the database. The password
    policy applies: at least 10 characters, and a zxcvbn strength of 3 of 4."""
    from app.core.db import session_scope
    from app.core.migrate import upgrade
    from app.services.accounts import create_admin as create
    from app.services.errors import InvalidRequest

    upgrade()
    try:
        with session_scope() as session:
            user = create(session=session, email=email, password=password, full_name=full_name)
            console.print(f"admin {user.email} created ({user.id})")
    except InvalidRequest as exc:
        fail(str(exc))


@users_app.command("me")
def me() -> None:
    """Who you are logged in as, and your teams."""
    body = request("GET", "/api/users/me")
    console.print(f"{body['email']}{' (platform admin)' if body['is_superuser'] else ''}")
    for team in body["teams"]:
        console.print(f"  {team['id']}  {team['name']}  {team['role']}")


@users_app.command("invite")
def invite(
    email: Annotated[str, typer.Option(help="Who to invite")],
    role: Annotated[str, typer.Option(help="viewer, trainer or admin")] = "trainer",
) -> None:
    """Invite someone to your team; prints the one-time token to send them."""
    _check_role(role)
    body = request("POST", f"/api/teams/{_team_id()}/invitations", json={"email": email, "role": role})
    console.print(f"invited {body['email']} as {body['role']}; token (shown once): {body['token']}")


@users_app.command("accept")
def accept(
    token: Annotated[str, typer.Option(help="The invitation token")],
    password: Annotated[str | None, typer.Option(help="Sets up your account if you are new")] = None,
    full_name: Annotated[str, typer.Option(help="Your name, for a new account")] = "",
) -> None:
    """Accept an invitation."""
    payload: dict[str, Any] = {"token": token, "full_name": full_name, **({"password": password} if password else {})}
    body = request("POST", "/api/invitations/accept", json=payload)
    console.print(f"{body['email']} joined as {body['role']}")


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="What the key is for")],
    role: Annotated[str, typer.Option(help="viewer, trainer or admin; at most your own")] = "trainer",
) -> None:
    """Create an API key; it is printed once and never again."""
    _check_role(role)
    body = request("POST", f"/api/teams/{_team_id()}/api-keys/", json={"name": name, "role": role})
    console.print(f"API key {body['id']} ({body['role']}), shown once:")
    typer.echo(body["key"])


@keys_app.command("list")
def list_keys() -> None:
    """Your API keys (admins: the team's)."""
    body = request("GET", f"/api/teams/{_team_id()}/api-keys/")
    table = Table("id", "name", "prefix", "role", "created", "revoked")
    for k in body["data"]:
        table.add_row(k["id"], k["name"], k["prefix"], k["role"], k["created_at"][:19], (k["revoked_at"] or "")[:19])
    console.print(table)


@keys_app.command("revoke")
def revoke_key(key_id: Annotated[str, typer.Argument(help="Key id")]) -> None:
    """Revoke an API key."""
    request("DELETE", f"/api/teams/{_team_id()}/api-keys/{key_id}")
    console.print(f"revoked {key_id}")


def _team_id() -> str:
    if team := os.environ.get("STUDIO_TEAM_ID"):
        return team
    teams = request("GET", "/api/users/me")["teams"]
    if not teams:
        fail("you are not a member of any team")
    return str(teams[0]["id"])


def _check_role(role: str) -> None:
    if role not in ROLES:
        fail(f"--role: must be one of {', '.join(ROLES)}")
