"""Request limits and response hardening: the body size limit, enforced while the body streams in (also
for chunked uploads), no text Postgres cannot store (NUL, lone surrogates) in what a route reads, and
security headers on every response."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import openai_error
from app.services.errors import InvalidRequest

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class BodySizeLimit:
    """``max_bytes`` for every request body, except paths in ``large`` (uploads) with their own limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, large: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = max_bytes
        self.large = large or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.large.get(scope["path"].rstrip("/") or "/", self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send, limit)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not response_started:
                await self._reject(scope, receive, send, limit)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        message = f"request body larger than {limit} bytes"
        if scope["path"].startswith("/v1/"):  # the shape /v1 declares (app/api/responses.py)
            response = openai_error(413, message, code="request_too_large")
        else:
            response = JSONResponse({"detail": message}, status_code=413)
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class SecurityHeaders:
    """The web UI loads only its own files and is never framed; nothing is sniffed or referred. (The API
    docs pages load Swagger from a CDN, so the content policy applies to the UI only.)"""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    ]
    UI_POLICY = (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        extra = [*self.HEADERS, *([self.UI_POLICY] if scope["path"].startswith("/ui") else [])]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


async def reject_unstorable_text(request: Request) -> None:
    """A router dependency: 422 naming the field for text Postgres cannot store (a NUL character, or a lone
    surrogate, which has no UTF-8 form) in a path or query parameter, a JSON string or key, or a form field.
    Such a value would otherwise end as a 500 wherever it reaches a query, and no field of this API has a
    use for one. The body is the one FastAPI has already read and parsed (Starlette caches both), and it is
    walked only when its bytes hold such an escape."""
    for name, value in (*request.path_params.items(), *request.query_params.multi_items()):
        _check(name, str(value))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        for name, field in (await request.form()).multi_items():
            _check(name, name)
            if isinstance(field, str):
                _check(name, field)
        return
    if not _SUSPECT_JSON.search(await request.body()):
        return
    try:
        data = await request.json()
    except ValueError:  # not JSON (FastAPI answers the route's parse error)
        return
    _check_json(data)


# In JSON text, a NUL or a surrogate can only be written as a \u escape (raw control characters are invalid).
_SUSPECT_JSON = re.compile(rb"\\u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _check(field: str, text: str) -> None:
    found = _UNSTORABLE.search(text)
    if found is None:
        return
    if found.group() == "\x00":
        raise InvalidRequest(field or "body", "must not contain NUL characters (\\u0000)")
    lone = f"\\u{ord(found.group()):04x}"
    raise InvalidRequest(field or "body", f"must be valid Unicode text (holds {lone}, half of a surrogate pair)")


def _check_json(data: Any) -> None:
    """Every string and key of a parsed JSON document, named by its dotted path. Iterative: a deeply nested
    document must not overflow the stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check(path, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                _check(where, str(key))
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value))
