"""Atomic checkpoints: accelerate's ``save_state`` plus the trainer's own state, resumable bit-for-bit.

Layout of ``<dir>/step_000123/``: whatever ``accelerator.save_state`` writes (model, optimizer, DeepSpeed shards,
per-process RNG states), ``trainer_state.json`` (step and small JSON-able facts), ``trainer_extra.pt`` (anything
else the trainer hands over: EMA weights, schedule, generators) and ``COMPLETE``, a manifest of every file
with its size.

The prepared model's frozen weights (the base model under a LoRA, a reward's borrowed blocks) are not written:
they are the ones it was loaded with, and at SD3.5-M scale they would add 4.6 GB to every checkpoint. A resumed
run loads them as a fresh one does, then the trainable weights from the checkpoint.

Writing goes to ``step_000123.tmp``; the main process fsyncs every file, writes ``COMPLETE`` last, and
renames the folder. A crash mid-write leaves a ``.tmp`` folder that is ignored (and removed by the next save);
a folder whose files no longer match its manifest (truncated, copied halfway) is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"
STATE_JSON = "trainer_state.json"
EXTRA_FILE = "trainer_extra.pt"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"  # a checkpoint being replaced by a re-save of its step, until the new one is in place
STEP_DIGITS = 6
STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")


def _model_file(input_dir: str | os.PathLike, index: int) -> Path:
    """Where accelerate's ``save_state`` writes the ``index``-th prepared model's weights (without DeepSpeed)."""
    return Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def _drop_frozen(models: list, weights: list, output_dir: str) -> None:
    for model, state in zip(models, weights):
        for name, param in model.named_parameters():
            if not param.requires_grad:
                state.pop(name, None)


def _load_trainable(models: list, input_dir: str) -> None:
    """Loads what :func:`_drop_frozen` kept, refusing a file without some trainable weight, and leaves nothing for
    accelerate's own (strict) load."""
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        state = load_file(str(_model_file(input_dir, i)))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise ValueError(f"{_model_file(input_dir, i)} lacks trainable weights {missing[:5]} "
                             f"({len(missing)} in all): it was written for another model or set of trainable weights")
        model.load_state_dict(state, strict=False)
    models.clear()


@contextlib.contextmanager
def _trainable_weights_only(accelerator, load: bool = False) -> Iterator[dict[str, Any]]:
    """``save_state`` / ``load_state`` keyword arguments, and hooks, that keep the prepared models' frozen weights
    out of a checkpoint: DeepSpeed's own ``exclude_frozen_parameters``, otherwise accelerate's state hooks."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        yield {"load_module_strict": False} if load else {"exclude_frozen_parameters": True}
        return
    handle = (accelerator.register_load_state_pre_hook(_load_trainable) if load
              else accelerator.register_save_state_pre_hook(_drop_frozen))
    try:
        yield {}
    finally:
        handle.remove()


def step_dir_name(step: int) -> str:
    return f"step_{step:0{STEP_DIGITS}d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` so that ``path`` is never half-written: written beside, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_folder_atomic(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fills ``folder`` atomically: ``write`` fills a sibling ``.tmp`` folder, which then replaces ``folder``.

    A write killed midway leaves the old folder (or none) and a ``.tmp`` leftover that the next call clears,
    never a half-written ``folder``.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def _manifest(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has a ``COMPLETE`` manifest and every listed file exists with its recorded size."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MARKER).read_text())
        files = manifest["files"]
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every finished-looking ``step_N`` folder (``.tmp`` folders excluded), by step; a
    ``step_N.old`` one counts only while its replacement ``step_N`` is missing (a kill during a re-save)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and not (match.group(2) and path.with_suffix("").is_dir()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, skipping incomplete or truncated ones (with a warning)."""
    for step, path in reversed(list_checkpoints(directory)):
        if is_complete(path):
            return path
        warnings.warn(f"skipping incomplete or truncated checkpoint {path}", stacklevel=2)
    return None


def read_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_JSON).read_text())


class CheckpointManager:
    """Saves to and resumes from ``directory``, keeping the newest ``keep_last`` complete checkpoints.

    Every process must call :meth:`save` and :meth:`load_latest` (DeepSpeed writes one shard per rank).
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, accelerator, step: int, extra: dict[str, Any] | None = None,
             state: dict[str, Any] | None = None, write: Callable[[Path], None] | None = None) -> Path:
        """Writes checkpoint ``step`` atomically and returns its folder.

        ``state``: small JSON-able facts, stored in ``trainer_state.json`` beside ``step``; ``extra``: anything
        ``torch.save`` can write (EMA tensors, scheduler and generator states), returned by :meth:`load_latest`;
        ``write``: called on the main process with the unfinished folder, before the manifest: what it writes
        there (an export of the weights, say) is part of the checkpoint.
        """
        final = self.directory / step_dir_name(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # before any rank writes its shard or RNG file into it
        accelerator.wait_for_everyone()
        with _trainable_weights_only(accelerator) as kwargs:
            accelerator.save_state(str(tmp), **kwargs)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(extra or {}, tmp / EXTRA_FILE)
            _write_synced(tmp / STATE_JSON, json.dumps({"step": step, **(state or {})}, indent=2).encode())
            if write is not None:
                write(tmp)
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            _write_synced(tmp / MARKER, json.dumps({"step": step, "files": _manifest(tmp)}, indent=1).encode())
            _fsync_dir(tmp)
            old = final.with_name(final.name + OLD_SUFFIX)
            if final.exists():  # a re-save of the same step: set the old copy aside until the new one is in place
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            shutil.rmtree(old, ignore_errors=True)
            self.prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def prune(self, keep: Path | None = None) -> None:
        """Removes all but the newest ``keep_last`` complete checkpoints (never ``keep``, the one just written),
        and leftover ``.tmp`` folders."""
        complete = [path for _, path in list_checkpoints(self.directory) if is_complete(path) and path != keep]
        for path in complete[: max(0, len(complete) - (self.keep_last - (keep is not None)))]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(f"step_*{TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(f"step_*{OLD_SUFFIX}"):
            if path.with_suffix("").is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def clear(self) -> int:
        """Removes every checkpoint folder (complete or not); returns how many there were. A run started afresh in
        its folder calls it, so that no checkpoint of the run before outlives its own (``prune`` keeps the highest
        steps) or is resumed later as if it were this run's."""
        folders = [p for p in self.directory.glob("step_*") if p.is_dir()] if self.directory.is_dir() else []
        for path in folders:
            shutil.rmtree(path, ignore_errors=True)
        return len(folders)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def latest_step(self) -> int | None:
        """The step :meth:`load_latest` would resume from (None: nothing to resume)."""
        folder = self.latest()
        return None if folder is None else int(read_trainer_state(folder)["step"])

    def load_latest(self, accelerator) -> dict[str, Any] | None:
        """Restores the newest complete checkpoint into the prepared objects; returns ``{"step", ...extra}``.

        None when there is nothing to resume from. ``extra``'s keys come first, then ``step`` and the JSON
        ``state`` keys (under ``"state"``).
        """
        folder = self.latest()
        if folder is None:
            return None
        with _trainable_weights_only(accelerator, load=True) as kwargs:
            accelerator.load_state(str(folder), **kwargs)
        trainer_state = read_trainer_state(folder)
        extra = torch.load(folder / EXTRA_FILE, map_location="cpu", weights_only=False)
        return {**extra, "step": int(trainer_state["step"]), "state": trainer_state, "path": str(folder)}
