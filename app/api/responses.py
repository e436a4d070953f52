"""The error answers each route declares in the OpenAPI document, with the bodies `app/api/errors.py` sends.

Every /api router declares `API_ERRORS` (app/api/main.py, admin), the /v1 router `OPENAI_ERRORS` and `/ready`
`READY_RESPONSES`; a route adds the codes only it returns (`UPSTREAM_ERRORS`). The 422 declared here replaces
FastAPI's default (a list of validation errors only): a 422 is that list when the request does not parse, or
one message naming its field when a service refuses a value, with the rows at fault for a bad dataset. Under
/v1 nothing answers 422 (OpenAI's 400 instead), so "4XX" is declared there, which also keeps FastAPI from
adding its own 422. `tests/api/test_fuzz.py` holds every answer to these declarations.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ApiError(BaseModel):
    """An /api error: what is wrong, the request field at fault when there is one, and a machine-readable
    code for inference failures."""

    detail: str
    field: str | None = None
    code: str | None = None


class ValidationIssue(BaseModel):
    """One way the request failed to parse (FastAPI's validation error)."""

    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class DatasetRowError(BaseModel):
    """A dataset row (1-based, the line of a JSONL file; null for the file as a whole) and its field at fault."""

    row: int | None = None
    field: str | None = None
    message: str


class ApiValidationError(BaseModel):
    """An /api 422: `detail` lists the validation errors when the request does not parse; otherwise it is
    one message, with `field` naming the field at fault (and `errors` the rows of a dataset)."""

    detail: str | list[ValidationIssue]
    field: str | None = None
    errors: list[DatasetRowError] | None = None


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """A /v1 error, in OpenAI's shape (which the OpenAI SDK turns into its typed exceptions)."""

    error: OpenAIErrorBody


class Readiness(BaseModel):
    """`/ready`: each check's status ("ok", "error" with the exception's type, or "timeout") and the failed ones."""

    status: str
    checks: dict[str, dict[str, str]]
    failed: list[str]


def _api(description: str) -> dict[str, Any]:
    return {"model": ApiError, "description": description}


def _openai(description: str) -> dict[str, Any]:
    return {"model": OpenAIError, "description": description}


Responses = dict[int | str, dict[str, Any]]

API_ERRORS: Responses = {
    400: _api("The body is not UTF-8 JSON, or a value is refused as sent (`field` names it)"),
    401: _api("No credentials, or an invalid, expired or revoked token or API key"),
    403: _api("The caller's role (or credential kind) may not do this"),
    404: _api("No such object in the caller's team (also another team's object, or a team you are not in)"),
    409: _api("Conflicts with the object's state, or a request with the same Idempotency-Key is still running"),
    413: _api("Request body (or upload, or inline rows) over its limit"),
    422: {"model": ApiValidationError, "description": "The request does not parse, or a value is refused"},
    429: _api("Too many failed logins, or the team is at a quota (see `Retry-After` where sent)"),
    503: _api("The database is overloaded or unreachable, or no inference worker runs; retry after `Retry-After`"),
}
# Routes that wait on an inference worker: it was lost (502) or took too long (504).
UPSTREAM_ERRORS: Responses = {
    502: _api("The inference worker was lost or answered badly"),
    504: _api("The inference worker took longer than the request timeout"),
}

READY_RESPONSES: Responses = {
    200: {"model": Readiness, "description": "The database and the broker answer"},
    503: {"model": Readiness, "description": "A check failed (`failed` names it): take the API out of rotation"},
}

OPENAI_ERRORS: Responses = {
    400: _openai("Invalid request: the body does not parse or a value is refused (`param` names it)"),
    401: _openai("Invalid API key"),
    403: _openai("The API key's role may not do this"),
    404: _openai("No such model deployed in the key's team"),
    413: _openai("Request body over its limit"),
    429: _openai("The team's in-flight request quota is full"),
    "4XX": _openai("Any other client error, in the same shape"),
    502: _openai("The inference worker was lost or answered badly"),
    503: _openai("No inference worker runs, or the database is overloaded or unreachable"),
    504: _openai("Generation took longer than the request timeout"),
}
