"""Shared fixtures: tiny models built from configs and saved locally (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline saved with ``save_pretrained`` (the layout of a hub folder)."""
    from rlkit.models.tiny import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


@pytest.fixture()
def tiny_generator(tiny_sd3_dir):
    """A fresh ``SD3Generator`` loaded from the tiny folder (each test gets its own weights)."""
    from rlkit.models.sd3 import SD3Generator

    torch.manual_seed(0)
    return SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
