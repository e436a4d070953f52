"""Training recipes: the named presets in config/recipes that a request can start from and override."""

from __future__ import annotations

from typing import Any

import yaml
from fastapi import APIRouter

from app.api.deps import Viewer
from app.core.contracts.training import Hyperparameters
from app.services.recipes import RECIPES_DIR, available_recipes, load_recipe

router = APIRouter(prefix="/recipes", tags=["recipes"])


@router.get("/hyperparameters")
def hyperparameter_schema(_: Viewer) -> dict[str, Any]:
    """The JSON schema of `hyperparameters` (every knob: type, bounds, default, help text), from the very model
    that validates a request, so a form generated from it never drifts from what the API accepts."""
    return Hyperparameters.model_json_schema()


@router.get("/")
def list_recipes(_: Viewer) -> dict[str, Any]:
    """Each recipe's name, description and hyperparameters."""
    data = []
    for name in available_recipes():
        header = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()) or {}
        data.append({"name": name, "description": header.get("description", ""), "hyperparameters": load_recipe(name)})
    return {"data": data, "count": len(data)}
