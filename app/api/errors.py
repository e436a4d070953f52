"""Error responses: every 4xx names the field (or the dataset row and field) at fault."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.datasets.formats import DatasetInvalid
from app.services.errors import InvalidRequest


class PayloadTooLarge(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequest)
    async def invalid_request(_: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=exc.status_code)

    @app.exception_handler(DatasetInvalid)
    async def invalid_dataset(_: Request, exc: DatasetInvalid) -> JSONResponse:
        errors = [{"row": e.row, "field": e.field, "message": e.message} for e in exc.errors]
        return JSONResponse({"detail": str(exc), "errors": errors}, status_code=422)

    @app.exception_handler(PayloadTooLarge)
    async def too_large(_: Request, exc: PayloadTooLarge) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=413)
