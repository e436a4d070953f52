from fastapi import APIRouter

from app.api.routes import api_keys, audit, auth, datasets, experiments, invitations, team_events, teams, users

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
