"""Error responses: every 4xx names the field (or the dataset row and field) at fault. Under /v1 the
same errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which the OpenAI
SDK turns into its typed exceptions. A database that is overloaded (no pooled connection within
`database.pool_timeout_s`) or unreachable answers 503 with `Retry-After`, never 500."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from app.datasets.formats import DatasetInvalid
from app.services.errors import InvalidRequest
from app.services.inference import InferenceFailed

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


log = logging.getLogger(__name__)
POOL_RETRY_AFTER_S = 2  # overload passes quickly: come back soon
OUTAGE_RETRY_AFTER_S = 5
# Raised when the database cannot be reached or drops the connection (not for a bad query, which is a bug).
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


class PayloadTooLarge(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status, headers=headers
    )


_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): ")


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
        if _is_openai(request):
            return openai_error(400 if exc.status_code == 422 else exc.status_code, str(exc), exc.field)
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=exc.status_code)

    @app.exception_handler(InferenceFailed)
    async def inference_failed(request: Request, exc: InferenceFailed) -> JSONResponse:
        if _is_openai(request):
            return openai_error(exc.status, exc.message, exc.param, exc.code)
        return JSONResponse({"detail": exc.message, "field": exc.param, "code": exc.code}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if not _is_openai(request):
            return await http_exception_handler(request, exc)
        code = {401: "invalid_api_key", 404: "model_not_found"}.get(exc.status_code)
        param = "model" if exc.status_code == 404 and "model" in str(exc.detail) else None
        return openai_error(exc.status_code, str(exc.detail), param, code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        if not _is_openai(request):
            return await request_validation_exception_handler(request, exc)
        first: dict[str, Any] = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        text = str(first.get("msg")).removeprefix("Value error, ")
        if param is None and (named := _NAMED.match(text)):  # a check across fields names the one at fault
            param = named.group(1)
        code = "invalid_value"
        if first.get("type") == "extra_forbidden":  # OpenAI's own words for an argument it does not know
            text, code = "unrecognized request argument", "unknown_parameter"
        elif "supported by this server" in text:
            code = "unsupported_parameter"
        message = f"{param}: {text}" if param else text
        return openai_error(400, message, param, code)

    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    async def pool_exhausted(request: Request, exc: sqlalchemy.exc.TimeoutError) -> JSONResponse:
        log.warning("503 %s %s: no database connection free: %s", request.method, request.url.path, exc)
        return _unavailable(request, "the server is busy (no database connection free); retry", POOL_RETRY_AFTER_S)

    for kind in DATABASE_UNAVAILABLE:

        @app.exception_handler(kind)
        async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
            log.warning("503 %s %s: database unavailable: %s", request.method, request.url.path, exc)
            return _unavailable(request, "the database is unavailable; retry", OUTAGE_RETRY_AFTER_S)

    @app.exception_handler(DatasetInvalid)
    async def invalid_dataset(request: Request, exc: DatasetInvalid) -> JSONResponse:
        if _is_openai(request):  # a JSONL row is a line: OpenAI's clients show the message as is
            message = "; ".join(f"line {e.row}: {e.field}: {e.message}" for e in exc.errors)
            return openai_error(400, message, "file", "invalid_file_format")
        errors = [{"row": e.row, "field": e.field, "message": e.message} for e in exc.errors]
        return JSONResponse({"detail": str(exc), "errors": errors}, status_code=422)

    @app.exception_handler(PayloadTooLarge)
    async def too_large(request: Request, exc: PayloadTooLarge) -> JSONResponse:
        if _is_openai(request):
            return openai_error(413, exc.message, exc.message.split(":", 1)[0], "file_too_large")
        return JSONResponse({"detail": exc.message}, status_code=413)


def _unavailable(request: Request, message: str, retry_after_s: int) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)}
    if _is_openai(request):
        return openai_error(503, message, code="service_unavailable", headers=headers)
    return JSONResponse({"detail": message}, status_code=503, headers=headers)
