"""Tracking (JSONL, TensorBoard, offline wandb), progress bars and image grids."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rlkit.config import LoggingConfig
from rlkit.runtime.images import PADDING, make_image_grid, save_image_grid
from rlkit.runtime.tracking import Tracker, evaluation_line, read_metrics


def _images(n: int, size: int = 8) -> torch.Tensor:
    """Image i is a flat colour (i / n, 0, 1) so each tile can be found in the grid."""
    out = torch.zeros(n, 3, size, size)
    for i in range(n):
        out[i, 0] = i / n
        out[i, 2] = 1.0
    return out


def test_image_grid_layout_and_pixels(tmp_path):
    images = _images(5)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path).convert("RGB"))
    cell = 8 + PADDING
    assert grid.shape == (2 * cell + PADDING, 3 * cell + PADDING, 3)
    for i in range(5):
        y, x = PADDING + (i // 3) * cell, PADDING + (i % 3) * cell
        assert tuple(grid[y + 3, x + 3]) == (round(255 * i / 5), 0, 255)
    assert tuple(grid[PADDING + cell + 3, PADDING + 2 * cell + 3]) == (255, 255, 255)  # empty sixth cell
    captioned = np.asarray(make_image_grid(_images(2, size=32), captions=["red circle", "a blue square on the left"]))
    # 32-pixel tiles are enlarged 3x for their captions, pixel for pixel; the captions get room below the tiles
    assert captioned.shape[1] == 2 * (96 + PADDING) + PADDING and captioned.shape[0] > 96 + 2 * PADDING
    second = captioned[PADDING:PADDING + 96, 2 * PADDING + 96:2 * PADDING + 192]
    assert (second == np.array([round(255 * 1 / 2), 0, 255], dtype=np.uint8)).all()
    with pytest.raises(ValueError, match="captions"):
        make_image_grid(images, captions=["one"])
    with pytest.raises(ValueError, match="shape"):
        make_image_grid(torch.zeros(2, 1, 8, 8))


def test_captions_wrap_whole_words_and_say_when_they_are_cut():
    from rlkit.runtime.images import caption_lines

    assert caption_lines("a blue circle at the top left", 96) == ["a blue circle at", "the top left"]
    long = caption_lines("a green triangle at the bottom right, drawn small on a dark background", 96)
    assert len(long) == 3 and all(len(line) <= 16 for line in long) and long[-1].endswith("...")
    assert caption_lines("", 96) == []


def test_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(backends=["jsonl", "tensorboard"])
    with Tracker(tmp_path, cfg, config={"train": {"lr": 1e-4}}) as tracker:
        tracker.log({"loss": torch.tensor(0.5), "reward": 2, "bad": math.nan, "vector": torch.ones(3)}, step=1)
        tracker.log({"loss": 0.25}, step=2)
        image_path = tracker.log_images("eval/samples", _images(4), step=2, captions=list("abcd"))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["loss"] == 0.5 and records[0]["reward"] == 2.0 and records[0]["bad"] == "nan"
    assert "vector" not in records[0]
    assert records[2]["path"] == str(image_path) and image_path.exists()
    assert json.loads((tmp_path / "config.json").read_text()) == {"train": {"lr": 1e-4}}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert "eval/samples" in events.Tags()["images"]


def test_a_resumed_tracker_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    """Rows after the checkpoint's step leave metrics.jsonl (a line cut short by the kill too) and TensorBoard;
    a fresh start keeps none of an earlier run's rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(backends=["jsonl", "tensorboard"])
    with Tracker(tmp_path, cfg) as killed:
        for step in range(5):
            killed.log({"loss": float(step)}, step=step)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # the kill
    with Tracker(tmp_path, cfg, resume_step=3) as resumed:  # the checkpoint was at step 3
        resumed.log({"loss": 40.0}, step=4)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0),
                                                                        (4, 40.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0),
                                                                    (4, 40.0)]
    Tracker(tmp_path, cfg, resume_step=None).close()  # started afresh in the same folder
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a run killed mid-write
    with pytest.warns(UserWarning, match="skipping its last record, cut short"):
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "rank1", LoggingConfig(backends=["jsonl", "tensorboard"]), config={}, enabled=False)
    tracker.log({"loss": 1.0}, step=0)
    assert tracker.log_images("x", _images(1), step=0) is None
    tracker.close()
    assert not (tmp_path / "rank1").exists()


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    with Tracker(tmp_path, LoggingConfig(backends=["jsonl", "wandb"]), config={"seed": 3}) as tracker:
        assert tracker._wandb.settings.mode == "offline"
        assert tracker._wandb.config["seed"] == 3
        tracker.log({"loss": 1.0}, step=0)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    first = (tmp_path / "wandb_id.txt").read_text()
    with Tracker(tmp_path, LoggingConfig(backends=["wandb"]), resume_step=0) as resumed:
        assert resumed._wandb.id == first  # a resumed run goes on with its wandb run
    with Tracker(tmp_path, LoggingConfig(backends=["wandb"])) as fresh:
        assert fresh._wandb.id != first


def test_console_shows_a_bar_from_the_resumed_step_and_a_line_per_evaluation(tmp_path, capsys):
    with Tracker(tmp_path, LoggingConfig()) as tracker:
        tracker.start_progress(total=6, initial=2, desc="refl_shapes")
        tracker.log({"eval/golden/judge": 0.4521, "eval/golden/judge_sem": 0.031, "eval/golden/judge/color": 0.9,
                     "eval/proxy/dina-lrm": 1.25, "eval/proxy/dina-lrm/raw": 3.0, "time/elapsed_s": 3.0}, step=2)
        tracker.log({"train/loss": 0.25, "train/reward": 1.5, "train/lr": 1e-4}, step=4)
        bar = tracker._console.bar
        assert (bar.n, bar.total, bar.desc) == (4, 6, "refl_shapes")
        assert bar.postfix == "loss=0.25, reward=1.5"
        tracker.log({"loss": 0.125, "accuracy": 0.75, "eval/accuracy_u=0.10": 0.8}, step=5)  # the reward model's
        assert bar.n == 5 and bar.postfix == "loss=0.125, acc=0.75"
    out, err = capsys.readouterr()
    assert out.splitlines() == ["step 2 eval: golden/judge 0.4521 ± 0.031, proxy/dina-lrm 1.25",
                                "step 5 eval: accuracy_u=0.10 0.8"]
    assert "refl_shapes" in err and "2/6" in err and "5/6" in err
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 5]  # the logs are unchanged
    assert evaluation_line({"train/loss": 1.0, "time/elapsed_s": 2.0}, step=3) is None


@pytest.mark.parametrize("enabled, progress", [(False, True), (True, False)])
def test_no_console_on_other_ranks_or_with_progress_off(tmp_path, capsys, enabled, progress):
    tracker = Tracker(tmp_path, LoggingConfig(progress=progress), enabled=enabled)
    tracker.start_progress(total=3)
    tracker.log({"train/loss": 1.0, "eval/golden/judge": 0.5}, step=1)
    tracker.close()
    assert capsys.readouterr() == ("", "")
