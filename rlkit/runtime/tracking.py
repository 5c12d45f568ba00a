"""Metrics and images to ``metrics.jsonl`` (always), and to wandb / TensorBoard when the recipe names them;
the console shows a progress bar with the latest loss and reward and a line per evaluation (``logging.progress``).

Only the process created with ``enabled=True`` (the main process) writes anything; the others get a tracker
whose methods do nothing, so trainers call it unconditionally. wandb runs offline unless ``WANDB_MODE`` says
otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlkit.config import LoggingConfig
from rlkit.runtime.checkpoint import write_text_atomic

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
IMAGES_DIR = "images"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_WANDB_MODE = "offline"
WANDB_ID_FILE = "wandb_id.txt"  # the run a resumed run goes on with


def _keep_rows_up_to(path: Path, step: int | None) -> None:
    """Rewrites a metrics file with only the records at or before ``step`` (none when ``step`` is None)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [] if step is None else [line for line in lines if _record_step(line) <= step]
    if kept != lines:  # a resume of a run that was not killed between checkpoints has nothing to drop
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except ValueError:  # a line cut short by a kill
        return math.inf


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
    """``resume_step``: the step of the checkpoint the run goes on from (None: a fresh start). What a killed run
    logged after it, which no checkpoint keeps, is dropped from ``metrics.jsonl`` (all of it on a fresh start) and
    hidden in TensorBoard (``purge_step``). wandb goes on under the run's id (kept in the run folder) but cannot drop
    rows: offline it starts a second offline run of that id (``wandb sync`` both), online it keeps the killed run's
    rows and ignores the resumed run's until it passes the last step it saw. ``metrics.jsonl`` is the exact record
    (what ``rlkit compare`` reads)."""

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig | None = None, config: Mapping | None = None,
                 enabled: bool = True, resume_step: int | None = None):
        self.cfg = cfg or LoggingConfig()
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        self._file = None
        self._console = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _keep_rows_up_to(self.run_dir / METRICS_FILE, resume_step)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if "wandb" in self.cfg.backends:
            import wandb

            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
            self._wandb = wandb.init(project=self.cfg.project, name=self.run_dir.name, dir=str(self.run_dir),
                                     mode=os.environ.get("WANDB_MODE", DEFAULT_WANDB_MODE), reinit="create_new",
                                     id=run_id, resume="allow" if run_id else None)
            write_text_atomic(id_file, self._wandb.id)
        if "tensorboard" in self.cfg.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                                     purge_step=0 if resume_step is None else resume_step + 1)
        if config is not None:
            self.log_config(config)

    def log_config(self, config: Mapping) -> None:
        """The resolved recipe: ``config.json`` in the run folder, wandb's run config, a TensorBoard text."""
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        write_text_atomic(self.run_dir / CONFIG_FILE, text)
        if self._wandb is not None:
            self._wandb.config.update(json.loads(text), allow_val_change=True)
        if self._tb is not None:
            self._tb.add_text("config", f"```\n{text}\n```", 0)

    def start_progress(self, total: int, initial: int = 0, desc: str = "train") -> None:
        """Shows the run on the console from here on: a bar over ``total`` updates (``initial`` done, as after a
        resume) that every :meth:`log` moves to its step, and a line per evaluation. Off with ``logging.progress``
        false; evaluations logged before it are not printed."""
        if self.enabled and self.cfg.progress:
            self._console = ConsoleProgress(total, initial, desc)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars (numbers, one-element tensors) at ``step``; other values are ignored."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        if self._console is not None:
            self._console.show(scalars, step)
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
        if self._console is not None:
            self._console.close()
            self._console = None
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


# train keys shown in the bar (with or without a ``train/`` prefix) -> their short name there
BAR_KEYS = {"loss": "loss", "reward": "reward", "reward/mean": "reward", "accuracy": "acc"}


def evaluation_line(metrics: Mapping[str, float], step: int) -> str | None:
    """One line for an evaluation's headline numbers (``eval/<name>`` and ``eval/<kind>/<name>``, with the
    standard error ``<key>_sem`` beside its value; the per-attribute and raw breakdowns stay in the logs), or
    ``None`` when ``metrics`` holds no evaluation."""
    shown = {k: v for k, v in metrics.items() if k.startswith("eval/") and k.count("/") <= 2
             and not (k.endswith("_sem") and k.removesuffix("_sem") in metrics)}
    if not shown:
        return None
    parts = []
    for key, value in shown.items():
        sem = metrics.get(f"{key}_sem")
        parts.append(f"{key.removeprefix('eval/')} {value:.4g}" + (f" ± {sem:.2g}" if sem is not None else ""))
    return f"step {step} eval: " + ", ".join(parts)


class ConsoleProgress:
    """A tqdm bar over the run's optimiser updates, its postfix the latest loss / reward / accuracy, and a line
    above it per evaluation: a run of hours says where it is without opening its logs."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="update", dynamic_ncols=True)

    def show(self, metrics: Mapping[str, float], step: int) -> None:
        line = evaluation_line(metrics, step)
        if line is not None:
            self.bar.write(line)
        postfix = {short: metrics[key] for name, short in BAR_KEYS.items()
                   for key in (name, f"train/{name}") if key in metrics}
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (for tests, comparisons and plots)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: record {i + 1} is not JSON ({exc})") from None
            warnings.warn(f"{path}: skipping its last record, cut short (a killed run)", stacklevel=2)
            continue
        if not isinstance(records[-1], dict) or not isinstance(records[-1].get("step", 0), (int, float)):
            raise ValueError(f"{path}: record {i + 1} is not a mapping with a numeric step: {line[:80]}")
    return records
