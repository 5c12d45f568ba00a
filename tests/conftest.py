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


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (its mixed precision cannot change within it); reset it around a
    test that builds its own ``Accelerator``."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture()
def placed_reward(monkeypatch):
    """Registers reward ``test-placed`` for this test and returns its class: a latent reward with one weight
    (``value``, its score) that records every device it is moved to (``moves``)."""
    import rewards
    from rewards.base import Reward, RewardOutput

    class Placed(Reward):
        space = "latent"

        def __init__(self, value: float = 1.0, device: str | None = None):
            super().__init__()
            self.value = torch.nn.Parameter(torch.tensor(float(value), device=device), requires_grad=False)
            self.moves: list[torch.device] = []

        def to(self, *args, **kwargs):
            self.moves.append(torch.device(args[0] if args else kwargs["device"]))
            return super().to(*args, **kwargs)

        def forward(self, batch):
            return RewardOutput(scores=self.value.expand(batch.batch_size))  # computed where the weight is

    monkeypatch.setitem(rewards.REGISTRY._targets, "test-placed", Placed)
    return Placed


@pytest.fixture()
def run_as_ranks():
    """``run(world, fn)`` calls ``fn(rank, gather)`` for every rank in its own thread, ``gather`` concatenating every
    rank's tensor along dim 0 as the accelerator's does, and returns the results by rank (re-raising a rank's
    error): the sharded code paths of several processes, tested in one."""
    import threading

    def run(world: int, fn):
        barrier, shared, results, errors = threading.Barrier(world, timeout=300), [None] * world, {}, []

        def gather_of(rank: int):
            def gather(tensor: torch.Tensor) -> torch.Tensor:
                shared[rank] = tensor
                barrier.wait()
                out = torch.cat(shared)
                barrier.wait()
                return out
            return gather

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, gather_of(rank))
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results

    return run


@pytest.fixture()
def checkpoint_calls(monkeypatch) -> list[int]:
    """Counts ``torch.utils.checkpoint.checkpoint`` calls (one per checkpointed block forward): a test of
    gradient checkpointing shows that it checkpoints, not only that its gradients are right."""
    calls: list[int] = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls
