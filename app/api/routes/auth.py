"""Login: the OAuth2 password form (so the API docs' Authorize button works) in, a signed JWT out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request

from app.api.auth_guards import no_store
from app.api.deps import SessionDep, SettingsDep
from app.core.security import create_access_token
from app.models import Token
from app.services import accounts

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=Token)
@no_store
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    # OAuth2's password form, bounded like the fields that set them (grant_type, scope and client
    # credentials, which the docs' Authorize button may send, are ignored).
    username: Annotated[str, Form(max_length=320, description="Your email")],
    password: Annotated[str, Form(max_length=200, json_schema_extra={"format": "password"})],
) -> Token:
    """Exchange email (`username`) and password for a bearer token. Repeated failures answer 429."""
    client = request.client.host if request.client else None
    try:
        user = accounts.authenticate(
            session=session, settings=settings, email=username, password=password, client=client
        )
    except accounts.LoginRefused as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.status_code == 429 else {"WWW-Authenticate": "Bearer"}
        raise HTTPException(exc.status_code, str(exc), headers=headers) from None
    token, ttl = create_access_token(settings, user.id)
    return Token(access_token=token, expires_in=ttl)
