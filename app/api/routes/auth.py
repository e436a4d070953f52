"""Login: the OAuth2 password form (so the API docs' Authorize button works) in, a signed JWT out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import OAuth2PasswordRequestForm

from app.api.deps import SessionDep, SettingsDep
from app.core.security import create_access_token
from app.models import Token
from app.services import accounts

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=Token)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
) -> Token:
    """Exchange email (`username`) and password for a bearer token. Repeated failures answer 429."""
    client = request.client.host if request.client else None
    try:
        user = accounts.authenticate(
            session=session, settings=settings, email=form.username, password=form.password, client=client
        )
    except accounts.LoginRefused as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.status_code == 429 else {"WWW-Authenticate": "Bearer"}
        raise HTTPException(exc.status_code, str(exc), headers=headers) from None
    token, ttl = create_access_token(settings, user.id)
    return Token(access_token=token, expires_in=ttl)
