"""A tiny accelerate training loop that checkpoints and exits on SIGTERM, and resumes (for test_runtime_guards).

``python sigterm_train.py RUN_DIR TOTAL_STEPS [STEP_DELAY_S]`` resumes from ``RUN_DIR/checkpoints`` if there is
a checkpoint, trains to ``TOTAL_STEPS`` and writes the final weights to ``RUN_DIR/final.pt``. On SIGTERM it
saves a checkpoint after the current step and exits with code 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

SEED = 3
BATCH, DIM = 4, 6
KEEP_LAST = 2


def setup():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(DIM, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def train_step(accelerator, model, optimizer, step: int) -> None:
    from rlkit.runtime.seeding import make_generator

    g = make_generator(SEED, "data", step)
    x, y = torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, 1, generator=g)
    accelerator.backward((model(x) - y).square().mean())
    optimizer.step()
    optimizer.zero_grad()


def weights(accelerator, model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def main(run_dir: Path, total_steps: int, delay_s: float) -> int:
    from rlkit.runtime.checkpoint import CheckpointManager
    from rlkit.runtime.guards import TrainingGuard

    accelerator, model, optimizer = setup()
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=KEEP_LAST)
    guard = TrainingGuard()
    resumed = checkpoints.load_latest(accelerator)
    step = resumed["step"] if resumed else 0
    print(f"start {step}", flush=True)
    while step < total_steps:
        train_step(accelerator, model, optimizer, step)
        step += 1
        print(f"step {step}", flush=True)
        if guard.should_stop():
            checkpoints.save(accelerator, step)
            print(f"stopped {step}", flush=True)
            return 0
        time.sleep(delay_s)
    torch.save(weights(accelerator, model), run_dir / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
