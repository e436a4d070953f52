"""Every /api router, one per resource."""

from fastapi import APIRouter

from app.api.routes import (
    ab_testing,
    api_keys,
    audit,
    auth,
    datasets,
    deployments,
    experiments,
    invitations,
    recipes,
    team_events,
    teams,
    users,
)

api_router = APIRouter()
for resource in (
    auth,
    users,
    teams,
    invitations,
    api_keys,
    audit,
    team_events,
    datasets,
    experiments,
    recipes,
    deployments,
    ab_testing,
):
    api_router.include_router(resource.router)
