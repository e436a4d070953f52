"""Service-level errors that the API turns into 4xx answers naming the field at fault."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A 4xx: ``field`` is the request field at fault (dotted path)."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        self.field = field
        self.message = message
        self.status_code = status_code
        super().__init__(f"{field}: {message}")


class Conflict(InvalidRequest):
    def __init__(self, message: str, field: str = "status") -> None:
        super().__init__(field, message, status_code=409)


class NotFound(InvalidRequest):
    """Also what a caller gets for another team's object: its existence is not revealed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message, status_code=404)
