"""GET /metrics: the Prometheus exposition of app.core.metrics, for platform admins (a login token) or a
scraper holding `api.metrics_token`. It carries deployment ids and queue names but no team's names."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import SettingsDep, require_superuser
from app.api.responses import API_ERRORS
from app.core.config import Settings
from app.core.db import session_scope
from app.core.metrics import REGISTRY, FleetCollector
from app.services.fleet import fleet_gauges

router = APIRouter(tags=["admin"], responses=API_ERRORS)
_collector: FleetCollector | None = None


def _allowed(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = (authorization or "").removeprefix("Bearer ").strip()
    expected = settings.api.metrics_token
    if expected and token and secrets.compare_digest(token.encode(), expected.encode()):
        return
    if not token:
        raise HTTPException(
            401, "needs a platform admin's login token or the metrics token", {"WWW-Authenticate": "Bearer"}
        )
    require_superuser(settings, token)  # 401 for a bad token, 403 for anyone but a platform admin


@router.get("/metrics", dependencies=[Depends(_allowed)], response_class=Response)
def metrics(settings: SettingsDep) -> Response:
    _register_fleet(settings)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _register_fleet(settings: Settings) -> None:
    global _collector
    if _collector is None:

        def read() -> dict[str, list[tuple[dict[str, str], float]]]:
            with session_scope() as session:
                return fleet_gauges(session, settings)

        _collector = FleetCollector(read)
        REGISTRY.register(_collector)
