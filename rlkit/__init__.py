"""rlkit: reward post-training for flow-matching text-to-image models, built around DiNa-LRM."""

__version__ = "0.1.0"
