"""What an API key may do outside its team, and how answers that carry a credential are sent.

- **An API key is bound to one team**, also on the routes about the caller rather than a team
  (``/users/me``, ``/teams/``): ``Caller`` carries the key's principal, so those routes show the key's
  team only, and ``AccountOwner`` refuses API keys where the account itself would change (name,
  password): that needs a login. A leaked key must not lead to its owner's other teams or account.
- **``@no_store``** marks a route's answers ``Cache-Control: no-store`` and ``Pragma: no-cache``: a
  login token, a new API key or an invitation token must not stay in a browser's or proxy's cache.
  Put it above ``@idempotent``, so replayed answers get the headers too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

from fastapi import Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import CurrentUser, SettingsDep, TokenDep, get_principal
from app.core.security import API_KEY_PREFIX
from app.models import User
from app.services.principal import Principal

API_KEY_REFUSED = "API keys cannot change the account; log in (POST /api/auth/login) and use the login token"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_RESPONSE_ARG = "no_store_response_"
EndpointT = TypeVar("EndpointT", bound=Callable[..., Any])


def _is_api_key(token: str | None) -> bool:
    return token is not None and token.startswith(API_KEY_PREFIX)


@dataclass(frozen=True)
class Caller:
    """The calling user; ``key`` is the API key's principal (its team, its effective role), None for a login."""

    user: User
    key: Principal | None


def get_caller(request: Request, settings: SettingsDep, token: TokenDep, user: CurrentUser) -> Caller:
    if not _is_api_key(token):
        return Caller(user, None)
    return Caller(user, get_principal(request, settings, token))  # the key's own team, whatever is asked


async def get_account_owner(user: CurrentUser, token: TokenDep) -> User:  # no I/O: no thread
    """The calling user, logged in: 403 for an API key (after it authenticated, so a bad one is a 401)."""
    if _is_api_key(token):
        raise HTTPException(403, API_KEY_REFUSED)
    return user


def no_store(endpoint: EndpointT) -> EndpointT:
    """Send the route's answers with ``Cache-Control: no-store`` and ``Pragma: no-cache``."""
    signature = inspect.signature(endpoint, eval_str=True)
    params = list(signature.parameters.values())
    assert _RESPONSE_ARG not in {p.name for p in params}
    extra = inspect.Parameter(_RESPONSE_ARG, inspect.Parameter.KEYWORD_ONLY, annotation=Response)

    @functools.wraps(endpoint)
    async def wrapper(**kwargs: Any) -> Any:
        response: Response = kwargs.pop(_RESPONSE_ARG)
        if inspect.iscoroutinefunction(endpoint):
            result = await endpoint(**kwargs)
        else:
            result = await run_in_threadpool(functools.partial(endpoint, **kwargs))
        # A Response (an @idempotent answer or replay) goes out as it is; else FastAPI merges ours in.
        (result if isinstance(result, Response) else response).headers.update(NO_STORE)
        return result

    wrapper.__signature__ = signature.replace(parameters=[*params, extra])  # type: ignore[attr-defined]
    return cast(EndpointT, wrapper)


CallerDep = Annotated[Caller, Depends(get_caller)]
AccountOwner = Annotated[User, Depends(get_account_owner)]
