"""The FastAPI app: middleware, error handlers, routers, and the outbox relay's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.api.errors import install_error_handlers
from app.api.limits import BodySizeLimit, SecurityHeaders
from app.api.main import api_router
from app.api.routes import admin, health, metrics, openai, openai_files, openai_fine_tuning
from app.core.config import get_settings
from app.core.db import session_scope
from app.services.accounts import bootstrap_admin
from app.services.relay import OutboxRelay, set_relay

MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/api/datasets/upload", "/v1/files")
WEB_DIR = Path(__file__).resolve().parent / "web" / "static"


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    with session_scope() as session:  # first start: the admin named by STUDIO_ADMIN_EMAIL / _PASSWORD
        bootstrap_admin(session=session, settings=get_settings())
    relay = OutboxRelay(get_settings())
    set_relay(relay)
    relay.start()
    try:
        yield
    finally:
        relay.stop()
        set_relay(None)


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="Fine-Tuning Studio", version="0.1.0", lifespan=lifespan)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.api.max_request_bytes,
        large={path: settings.api.max_upload_bytes + MULTIPART_OVERHEAD for path in UPLOAD_PATHS},
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(api_router, prefix="/api")
    app.include_router(openai.router)
    app.include_router(openai_files.router)
    app.include_router(openai_fine_tuning.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.mount("/ui", StaticFiles(directory=WEB_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    return app


app = create_app()
