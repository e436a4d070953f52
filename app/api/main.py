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
api_router.include_router(auth.router)
api_router.include_router(users.router)
api_router.include_router(teams.router)
api_router.include_router(invitations.router)
api_router.include_router(api_keys.router)
api_router.include_router(audit.router)
api_router.include_router(team_events.router)
api_router.include_router(datasets.router)
api_router.include_router(experiments.router)
api_router.include_router(deployments.router)
api_router.include_router(ab_testing.router)
api_router.include_router(recipes.router)
