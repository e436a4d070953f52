"""Every /api router, one per resource. Each declares the error answers every /api route may give, and
refuses text Postgres cannot store (NUL, lone surrogates) in its parameters and body (app/api/limits.py)."""

from fastapi import APIRouter, Depends

from app.api.limits import reject_unstorable_text
from app.api.responses import API_ERRORS
from app.api.routes import (
    ab_testing,
    api_keys,
    audit,
    auth,
    datasets,
    deployments,
    evaluation,
    experiments,
    invitations,
    lineage,
    recipes,
    team_events,
    teams,
    users,
)

api_router = APIRouter(responses=API_ERRORS, dependencies=[Depends(reject_unstorable_text)])
for resource in (
    auth,
    users,
    teams,
    invitations,
    api_keys,
    audit,
    team_events,
    datasets,
    evaluation,  # its /experiments/compare before /experiments/{experiment_id}
    experiments,
    lineage,
    recipes,
    deployments,
    ab_testing,
):
    api_router.include_router(resource.router)
api_router.include_router(ab_testing.leaderboard_router)
