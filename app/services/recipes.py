"""Recipes: named presets of hyperparameters (config/recipes/<name>.yaml) that a request overrides.

A request resolves as: defaults < recipe < request overrides, validated into the one training
vocabulary (`app.core.contracts.training.Hyperparameters`), so a bad value is a 422 that names the
field before anything is queued.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.core.contracts.training import Hyperparameters

RECIPES_DIR = Path(__file__).resolve().parents[2] / "config" / "recipes"


class RecipeNotFound(LookupError):
    pass


def available_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def load_recipe(name: str, recipes_dir: Path = RECIPES_DIR) -> dict[str, Any]:
    if name not in available_recipes(recipes_dir):  # also keeps names from becoming paths
        raise RecipeNotFound(f"unknown recipe {name!r}; available: {available_recipes(recipes_dir)}")
    data = yaml.safe_load((recipes_dir / f"{name}.yaml").read_text()) or {}
    values: dict[str, Any] = data.get("hyperparameters", {})
    return values


def resolve(recipe: str | None, overrides: dict[str, Any]) -> Hyperparameters:
    """Merge recipe and overrides; raises RecipeNotFound or pydantic.ValidationError."""
    base = load_recipe(recipe) if recipe else {}
    return Hyperparameters.model_validate({**base, **overrides})
