"""Metrics and images to ``metrics.jsonl`` (always), and to wandb / TensorBoard when the recipe names them.

Only the process created with ``enabled=True`` (the main process) writes anything; the others get a tracker
whose methods do nothing, so trainers call it unconditionally. wandb runs offline unless ``WANDB_MODE`` says
otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlkit.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
IMAGES_DIR = "images"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_WANDB_MODE = "offline"


def _scalar(value: Any) -> float | None:
    """A float for numbers and one-element tensors; None for anything else (not logged)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item()) if value.numel() == 1 else None
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


class Tracker:
    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig | None = None, config: Mapping | None = None,
                 enabled: bool = True):
        self.cfg = cfg or LoggingConfig()
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if "wandb" in self.cfg.backends:
            import wandb

            self._wandb = wandb.init(project=self.cfg.project, name=self.run_dir.name, dir=str(self.run_dir),
                                     mode=os.environ.get("WANDB_MODE", DEFAULT_WANDB_MODE), reinit="create_new")
        if "tensorboard" in self.cfg.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
        if config is not None:
            self.log_config(config)

    def log_config(self, config: Mapping) -> None:
        """The resolved recipe: ``config.json`` in the run folder, wandb's run config, a TensorBoard text."""
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (self.run_dir / CONFIG_FILE).write_text(text)
        if self._wandb is not None:
            self._wandb.config.update(json.loads(text), allow_val_change=True)
        if self._tb is not None:
            self._tb.add_text("config", f"```\n{text}\n```", 0)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars (numbers, one-element tensors) at ``step``; other values are ignored."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        record = {"step": step, "time": time.time(), **{k: _json_number(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def log_images(self, name: str, images: torch.Tensor, step: int, captions: list[str] | None = None,
                   nrow: int | None = None) -> Path | None:
        """Saves a grid to ``images/<name>_<step>.png`` and sends it to wandb / TensorBoard; returns the path."""
        if not self.enabled:
            return None
        from rlkit.runtime.images import make_image_grid

        grid = make_image_grid(images, nrow, captions)
        path = self.run_dir / IMAGES_DIR / f"{name.replace('/', '_')}_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path, format="PNG")
        self._file.write(json.dumps({"step": step, "time": time.time(), "image": name, "path": str(path)}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(grid, caption=" | ".join(captions or []))}, step=step)
        if self._tb is not None:
            import numpy as np

            self._tb.add_image(name, np.asarray(grid), step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, enabled: bool = True, desc: str = "train", initial: int = 0):
    """A tqdm bar (disabled on non-main processes or when ``logging.progress`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (for tests, comparisons and plots)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
