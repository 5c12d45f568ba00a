"""Reward plugins behind one interface: ``rewards.build(name, **args)(RewardInput) -> RewardOutput``.

Importing this package loads no model code; each reward's module is imported when it is built.
"""

from rewards.base import MemoDecode, Reward, RewardInput, RewardOutput, TextConditioning, affine_normalizer
from rewards.registry import ENTRY_POINT_GROUP, REGISTRY, Registry

register = REGISTRY.register
build = REGISTRY.build
available = REGISTRY.available
resolve = REGISTRY.resolve

__all__ = [
    "ENTRY_POINT_GROUP",
    "MemoDecode",
    "REGISTRY",
    "Registry",
    "Reward",
    "RewardInput",
    "RewardOutput",
    "TextConditioning",
    "affine_normalizer",
    "available",
    "build",
    "register",
    "resolve",
]
