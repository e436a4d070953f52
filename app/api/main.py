from fastapi import APIRouter

from app.api.routes import datasets, experiments

api_router = APIRouter()
api_router.include_router(datasets.router)
api_router.include_router(experiments.router)
