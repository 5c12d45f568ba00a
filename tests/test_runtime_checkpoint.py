"""Checkpoints: resume equals an uninterrupted run bit-for-bit; truncated or half-written ones are skipped."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from rlkit.runtime.checkpoint import (
    MARKER,
    CheckpointManager,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    step_dir_name,
)
from rlkit.runtime.seeding import Generators, make_generator

SEED = 7
TOTAL_STEPS = 6
STOP_AT = 3
BATCH, DIM = 4, 8


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _setup():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))  # dropout: global RNG
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, Generators(SEED)


def _train(accelerator, model, optimizer, gens: Generators, start: int, stop: int) -> None:
    for step in range(start, stop):
        data = make_generator(SEED, "data", step)
        x, y = torch.randn(BATCH, DIM, generator=data), torch.randn(BATCH, 1, generator=data)
        x = x + 0.1 * torch.randn(x.shape, generator=gens["noise"])  # explicit generator carried by the checkpoint
        loss = (model(x) - y).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def _weights(accelerator, model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path):
    accelerator, model, optimizer, gens = _setup()
    _train(accelerator, model, optimizer, gens, 0, TOTAL_STEPS)
    want = _weights(accelerator, model)

    accelerator, model, optimizer, gens = _setup()
    _train(accelerator, model, optimizer, gens, 0, STOP_AT)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    folder = manager.save(accelerator, STOP_AT, extra={"generators": gens.state_dict()}, state={"note": "x"})
    assert folder.name == step_dir_name(STOP_AT) and is_complete(folder)
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": STOP_AT, "note": "x"}
    _train(accelerator, model, optimizer, gens, STOP_AT, STOP_AT + 1)  # progress lost by the "crash"

    accelerator, model, optimizer, gens = _setup()
    resumed = manager.load_latest(accelerator)
    assert resumed["step"] == STOP_AT
    gens.load_state_dict(resumed["generators"])
    _train(accelerator, model, optimizer, gens, resumed["step"], TOTAL_STEPS)
    got = _weights(accelerator, model)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key

    # without restoring the RNG states the run differs (so the equality above is not trivial)
    accelerator, model, optimizer, gens = _setup()
    manager.load_latest(accelerator)
    torch.manual_seed(0)
    _train(accelerator, model, optimizer, gens, STOP_AT, TOTAL_STEPS)
    assert any(not torch.equal(v, want[k]) for k, v in _weights(accelerator, model).items())


def test_truncated_and_half_written_checkpoints_are_skipped(tmp_path):
    accelerator, model, optimizer, _ = _setup()
    manager = CheckpointManager(tmp_path, keep_last=5)
    good = manager.save(accelerator, 1)
    # a newer checkpoint whose largest file was cut short after COMPLETE was written (e.g. a partial copy)
    truncated = manager.save(accelerator, 2)
    biggest = max((p for p in truncated.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as handle:
        handle.truncate(biggest.stat().st_size // 2)
    # a crash mid-write: the .tmp folder never got renamed; and a folder without COMPLETE
    (tmp_path / (step_dir_name(3) + ".tmp")).mkdir()
    no_marker = manager.save(accelerator, 4)
    os.remove(no_marker / MARKER)

    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 4]
    with pytest.warns(UserWarning, match="incomplete or truncated"):
        assert latest_checkpoint(tmp_path) == good
    with pytest.warns(UserWarning):
        assert manager.load_latest(accelerator)["step"] == 1
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_last_prunes_old_checkpoints_and_leftovers(tmp_path):
    accelerator, model, optimizer, _ = _setup()
    manager = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / (step_dir_name(0) + ".tmp")).mkdir(parents=True)
    for step in (1, 2, 3, 4):
        manager.save(accelerator, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(3), step_dir_name(4)]
    manager.save(accelerator, 4)  # saving the same step again replaces it
    assert is_complete(tmp_path / step_dir_name(4))
    many = CheckpointManager(tmp_path / "many", keep_last=4)
    for step in (1, 2, 3):
        many.save(accelerator, step)
    assert [s for s, _ in list_checkpoints(tmp_path / "many")] == [1, 2, 3]  # fewer than keep_last: all stay
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_a_kill_while_a_step_is_saved_again_keeps_a_complete_copy(tmp_path, monkeypatch):
    """keep_last 1: the re-save of step 2 sets the old copy aside until the new one is in place; killed in
    between, the old copy is what resumes (the old code deleted it first and lost the run)."""
    import rlkit.runtime.checkpoint as ckpt

    accelerator, model, optimizer, _ = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(accelerator, 2)
    replace = os.replace

    def killed_before_the_new_copy_lands(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_before_the_new_copy_lands)
    with pytest.raises(KeyboardInterrupt):
        manager.save(accelerator, 2)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    assert not (tmp_path / step_dir_name(2)).exists()
    assert latest_checkpoint(tmp_path) == tmp_path / (step_dir_name(2) + ".old")
    assert manager.load_latest(accelerator)["step"] == 2
    manager.save(accelerator, 3)  # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(3)]


def test_a_new_save_survives_pruning_beside_a_later_step(tmp_path):
    """A run folder that already holds step 6 (a run restarted without resume): the step just written stays."""
    accelerator, *_ = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(accelerator, 6)
    manager.save(accelerator, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(2)]


def test_nothing_to_resume(tmp_path):
    accelerator, *_ = _setup()
    assert CheckpointManager(tmp_path / "none").load_latest(accelerator) is None


def test_a_run_started_afresh_in_its_folder_removes_the_checkpoints_of_the_run_before(tmp_path):
    """Else ``keep_last`` keeps the old run's higher steps over the new run's, and a later resume loads them."""
    from types import SimpleNamespace

    from rlkit.config import recipe_from_dict
    from rlkit.trainers.common import open_run_folder

    accelerator, model, optimizer, gens = _setup()
    data = {"algorithm": "refl", "rewards": [{"name": "latent-direction"}], "output_dir": str(tmp_path),
            "logging": {"backends": ["jsonl"]}}
    checkpoints, tracker = open_run_folder(recipe_from_dict(data), SimpleNamespace(is_main_process=True))
    for step in (50, 100):
        checkpoints.save(accelerator, step, {"gens": gens.state_dict()})
    tracker.close()
    assert checkpoints.latest_step() == 100
    afresh = recipe_from_dict({**data, "checkpoint": {"resume": False}})
    checkpoints, tracker = open_run_folder(afresh, SimpleNamespace(is_main_process=True))
    tracker.close()
    assert checkpoints.latest_step() is None and not list(checkpoints.directory.iterdir())
    checkpoints.save(accelerator, 10, {"gens": gens.state_dict()})
    assert [step for step, _ in list_checkpoints(checkpoints.directory)] == [10]


def test_frozen_weights_stay_out_of_a_checkpoint_and_a_resume_keeps_the_loaded_ones(tmp_path):
    """A LoRA run's base model is not written again at every checkpoint (4.6 GB at SD3.5-M): the resumed model keeps
    the frozen weights it was loaded with and takes the trainable ones from the checkpoint, which must hold them."""
    from safetensors.torch import load_file

    accelerator, model, optimizer, gens = _setup()
    frozen = accelerator.unwrap_model(model)[0]
    frozen.requires_grad_(False)
    _train(accelerator, model, optimizer, gens, 0, 2)
    saved = _weights(accelerator, model)
    folder = CheckpointManager(tmp_path).save(accelerator, 2)
    assert sorted(load_file(str(folder / "model.safetensors"))) == ["3.bias", "3.weight"]

    accelerator, model, optimizer, gens = _setup()  # a fresh start: the frozen layer as loaded, the rest anew
    accelerator.unwrap_model(model)[0].requires_grad_(False)
    with torch.no_grad():
        accelerator.unwrap_model(model)[3].weight.mul_(0)
    assert CheckpointManager(tmp_path).load_latest(accelerator)["step"] == 2
    got = _weights(accelerator, model)
    assert all(torch.equal(got[k], saved[k]) for k in saved)

    accelerator, model, optimizer, gens = _setup()  # now the first layer trains too: the checkpoint lacks it
    with pytest.raises(ValueError, match=r"model\.safetensors lacks trainable weights \['0\.weight', '0\.bias'\]"):
        CheckpointManager(tmp_path).load_latest(accelerator)
