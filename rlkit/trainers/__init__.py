"""Trainers, one module per algorithm, each with ``train(recipe) -> dict`` (final metrics)."""

from __future__ import annotations

import importlib

from rlkit.config import Recipe

TRAINERS = {
    "refl": "rlkit.trainers.refl",
    "flow_grpo": "rlkit.trainers.flow_grpo",
    "reward_model": "rlkit.trainers.reward_model",
}


def run(recipe: Recipe) -> dict:
    module = importlib.import_module(TRAINERS[recipe.algorithm])
    return module.train(recipe)
