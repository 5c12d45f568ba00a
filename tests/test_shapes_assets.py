"""The shipped Shapes checkpoints load through the same from_pretrained paths as real models and work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from rewards.base import RewardInput
from rlkit.shapes import world
from rlkit.shapes.judges import ASSETS_DIR


@pytest.fixture(scope="module")
def generator():
    from rlkit.shapes.pretrain import load_generator

    return load_generator()


def test_shipped_generator_loads_and_samples_a_batch(generator):
    from rlkit.shapes.pretrain import sample_images

    assert generator.transformer.config.patch_size == 2 and generator.latent_shape(32) == (4, 16, 16)
    assert 0.5e6 < sum(p.numel() for p in generator.transformer.parameters()) < 0.8e6
    prompts = world.heldout_prompts()[:4]
    a = sample_images(generator, prompts, seed=0, num_steps=6)
    b = sample_images(generator, prompts, seed=0, num_steps=6)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.05
    # the diffusers pipeline itself also generates from the shipped folder
    out = generator.pipeline(prompt=prompts[:2], height=32, width=32, num_inference_steps=4,
                             max_sequence_length=generator.max_sequence_length, output_type="pt",
                             generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32)


def test_shipped_vae_reconstructs_what_the_golden_judge_reads(generator):
    from rlkit.shapes.judges import read_scenes

    scenes = world.sample_scenes(48, np.random.default_rng(9))
    images = world.draw_batch(scenes, seed=9)
    with torch.no_grad():
        recon = generator.decode(generator.encode(images))
    assert (recon - images).pow(2).mean() < 0.005
    reading = read_scenes(recon, [s.caption for s in scenes])
    # colour and position survive the downsampling VAE; it rounds corners, so shapes survive less often (the
    # build measures 0.60 on 512 training pictures; the judge reads the real ones ~100% right)
    assert reading.correct["color"].float().mean() >= 0.9
    assert reading.correct["position"].float().mean() >= 0.9
    assert reading.correct["shape"].float().mean() >= 0.35  # 0.44 on these 48


def test_shipped_clip_reward_matches_real_captions():
    reward = rewards.build("shapes-clip")
    scenes = world.sample_scenes(64, np.random.default_rng(4), "heldout")
    images = world.draw_batch(scenes, seed=4)
    right = reward(RewardInput(prompts=[s.caption for s in scenes], images=images)).scores
    colors = list(world.COLORS)
    wrong_color = [world.caption(colors[(colors.index(s.color) + 1) % len(colors)], s.shape, s.position)
                   for s in scenes]
    wrong = reward(RewardInput(prompts=wrong_color, images=images)).scores
    assert (right > wrong).float().mean() >= 0.9


def test_shipped_preferences_hold_latents_and_labels(generator):
    from rlkit.shapes.preferences import load_preferences

    pairs = load_preferences()
    assert len(pairs) >= 256
    assert set(pairs.column_names) >= {"prompt", "latents_a", "latents_b", "label", "label_repeat"}
    row = pairs.with_format("torch")[0]
    assert tuple(row["latents_a"].shape) == generator.latent_shape(32)
    labels = np.asarray(pairs["label"])
    assert set(np.unique(labels)) <= {0.0, 1.0} and 0.2 < labels.mean() < 0.8
    assert not set(pairs["prompt"]) & set(world.heldout_prompts())


def test_shipped_dina_lrm_names_its_generator_and_scores_with_it_alone():
    """``rlkit eval-reward --reward dina-lrm --args pretrained=...`` needs no base model: the checkpoint names the
    shipped generator, and loading it itself scores as sharing the loaded generator's blocks does."""
    from rewards.dina_lrm.checkpoint import read_config
    from rlkit.shapes.pretrain import load_generator

    generator = load_generator()
    generator.transformer.requires_grad_(False)  # a frozen generator, as a policy with LoRA holds it

    assert read_config(ASSETS_DIR / "dina_lrm").backbone_model_id == "pkg://rlkit/shapes/assets/generator"
    alone = rewards.build("dina-lrm", pretrained=str(ASSETS_DIR / "dina_lrm"), mode="state")
    shared = rewards.build("dina-lrm", pretrained=str(ASSETS_DIR / "dina_lrm"), mode="state")
    shared.attach_generator(generator)
    prompts = world.heldout_prompts()[:3]
    latents = torch.randn(3, *generator.latent_shape(32), generator=torch.Generator().manual_seed(0))
    batch = RewardInput(prompts=prompts, latents=latents, sigmas=torch.full((3,), 0.3))
    with torch.no_grad():
        torch.testing.assert_close(alone(batch).scores, shared(batch).scores, rtol=1e-5, atol=1e-5)
    assert not alone.is_shared and shared.is_shared


def test_build_rejects_settings_of_an_unknown_stage(tmp_path):
    from rlkit.shapes.build import build_all

    with pytest.raises(ValueError, match=r"unknown stage settings \['generator'\]"):
        build_all(tmp_path, fast=True, stages=("clip",), configs={"generator": None})


def test_a_full_build_does_not_replace_a_finished_folder_unless_restarted(tmp_path, monkeypatch, capsys):
    from rlkit.shapes import build

    shipped = tmp_path / "assets"
    shutil.copytree(ASSETS_DIR, shipped, ignore=shutil.ignore_patterns("generator", "dina_lrm", "clip"))
    before = {f: f.read_bytes() for f in shipped.rglob("*") if f.is_file()}
    monkeypatch.chdir(tmp_path)
    started: list[str] = []
    with pytest.raises(FileExistsError, match=r"holds a finished build.*--restart"):
        build.build_all(shipped, fast=True, log=started.append)
    assert build.main([str(shipped), "--fast"]) == 2
    assert f"rlkit shapes build: '{shipped}' holds a finished build" in capsys.readouterr().out
    assert started == [] and before == {f: f.read_bytes() for f in shipped.rglob("*") if f.is_file()}
    # a finished build of the same world is refused alike; with no folder named, a build goes to runs/shapes
    (tmp_path / "runs" / "shapes").mkdir(parents=True)
    report = {"fast": True, "progress": {"stages": list(build.STAGES), "done": list(build.STAGES)}}
    (tmp_path / "runs" / "shapes" / build.REPORT_NAME).write_text(json.dumps(report))
    assert build.main(["--fast"]) == 2
    assert "'runs/shapes' holds a finished build" in capsys.readouterr().out
    # and so is one where a later --stages run was killed: its progress names its own stages only
    report = {"fast": True, "whole": True, "progress": {"stages": ["evaluate"], "done": []}}
    (tmp_path / "runs" / "shapes" / build.REPORT_NAME).write_text(json.dumps(report))
    assert build.main(["--fast"]) == 2
    assert "'runs/shapes' holds a finished build" in capsys.readouterr().out


def test_build_report_records_stages_and_numbers():
    report = json.loads((ASSETS_DIR / "build_report.json").read_text())
    assert set(report["seconds"]) >= {"generator", "clip", "evaluate", "preferences", "total"}
    metrics = report["stats"]["evaluate"]
    assert metrics["golden_real_heldout"]["all"] >= 0.97
    generated = metrics["golden_generated_heldout"]
    assert generated["color"] >= 0.8 and generated["position"] >= 0.8  # the base model follows those
    assert generated["all"] <= 0.7 and 0.3 <= generated["fraction"] <= 0.8  # and leaves room for alignment
    # the sizes are the shipped files' (the report counts its own previous version), all under 20 MB
    on_disk = sum(f.stat().st_size for f in ASSETS_DIR.rglob("*") if f.is_file()) / 2**20
    assert report["sizes_mb"]["total"] == pytest.approx(on_disk, abs=0.01) and on_disk < 20


def test_a_build_resumes_only_a_killed_build_of_the_same_world():
    from rlkit.shapes.build import _finished_before

    settings = {"clip": {"steps": 10, "betas": (0.9, 0.98)}}
    now = {"fast": True, "settings": settings}
    stages = ("generator", "clip", "evaluate")
    killed = {"fast": True, "settings": {"clip": {"steps": 10, "betas": [0.9, 0.98]}},  # as read back from JSON
              "progress": {"stages": list(stages), "done": ["generator", "clip"]}}
    assert _finished_before(killed, now, stages) == ["generator", "clip"]
    first = {**killed, "progress": {"stages": list(stages), "done": []}}
    assert _finished_before(first, now, stages) == []  # killed in its first stage: resumed, its checkpoints kept
    assert _finished_before(killed, {**now, "settings": {"clip": {"steps": 11, "betas": (0.9, 0.98)}}}, stages) is None
    assert _finished_before(killed, {**now, "fast": False}, stages) is None
    assert _finished_before(killed, now, ("generator", "clip")) is None  # other stages asked for
    finished = {**killed, "progress": {"stages": list(stages), "done": list(stages)}}
    assert _finished_before(finished, now, stages) is None  # a finished build is built again
    assert _finished_before({k: v for k, v in killed.items() if k != "progress"}, now, stages) is None  # no record


def _earlier_stages_outputs(out: Path) -> None:
    """The paths the DiNa-LRM recipe names (a recipe naming missing local paths does not validate), empty."""
    (out / "generator").mkdir()
    (out / "preferences").mkdir()
    for split in ("train", "eval"):
        (out / "preferences" / f"{split}.parquet").touch()


def test_the_builds_dina_lrm_trainings_checkpoint_where_a_fresh_build_clears_them(tmp_path):
    from rlkit.shapes.build import DINA_CHECKPOINT_EVERY, DINA_TRAININGS, FIXED_VARIANCE, PARTIAL_WORK, _dina_recipe

    # side by side in two processes: one progress bar on the console, the shipped training's
    expected = {"dina_lrm": ("thurstone_calibrated", True), FIXED_VARIANCE: ("thurstone_fixed", False)}
    assert set(DINA_TRAININGS) == set(expected)
    _earlier_stages_outputs(tmp_path)
    for target, extra in DINA_TRAININGS.items():
        recipe = _dina_recipe(tmp_path, False, target, extra)
        assert recipe.checkpoint.resume and recipe.checkpoint.every == DINA_CHECKPOINT_EVERY
        assert recipe.reward_model.max_steps > DINA_CHECKPOINT_EVERY  # a killed training loses less than it ran
        work = Path(recipe.output_dir)
        assert work.parent == tmp_path and work.name in PARTIAL_WORK
        assert (recipe.reward_model.loss, recipe.logging.progress) == expected[target]


def test_the_dina_lrm_stage_reports_a_failed_training_and_stops_both_when_stopped(tmp_path):
    """Two trainings in two processes: one that fails is named; SIGTERM to the build alone stops both with it (the
    process pool used before left its workers running after a killed build)."""
    import multiprocessing
    import os
    import signal
    import threading

    from rlkit.shapes.build import train_dina_lrms

    _earlier_stages_outputs(tmp_path)  # an empty generator folder: both trainings fail while loading it
    with pytest.raises(RuntimeError, match=r"dina_lrm \(exit code 1\), _dina_lrm_fixed_variance \(exit code 1\)"):
        train_dina_lrms(tmp_path, fast=True)
    handler = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit, match="stopped by signal"):
            train_dina_lrms(tmp_path, fast=True)
    finally:
        timer.cancel()
    assert multiprocessing.active_children() == []
    assert signal.getsignal(signal.SIGTERM) is handler  # the stage's own handler is gone with it


def test_a_stopped_rewards_stage_keeps_the_ablation_it_resumes_with(tmp_path, monkeypatch):
    import rlkit.shapes.reward_report
    from rlkit.shapes.build import FIXED_VARIANCE, reward_accuracies

    (tmp_path / FIXED_VARIANCE).mkdir()
    (tmp_path / FIXED_VARIANCE / "config.json").write_text("{}")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlkit.shapes.reward_report, "reward_rows", stopped)
    with pytest.raises(KeyboardInterrupt):
        reward_accuracies(tmp_path, fast=True, log=lambda _: None)
    assert (tmp_path / FIXED_VARIANCE / "config.json").is_file()  # not trained again when the build resumes


def test_a_build_keeps_what_a_killed_build_of_its_world_left_and_removes_what_another_left(tmp_path):
    from rlkit.shapes.build import PARTIAL_WORK, REPORT_NAME, build_all

    def leave_partial_work() -> None:
        for name in PARTIAL_WORK:
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "checkpoint.pt").write_bytes(b"partial")

    found_stale: list[str] = []

    def kill(line: str) -> None:
        if line == "== stage clip":
            found_stale.extend(name for name in PARTIAL_WORK if (tmp_path / name).exists())
            leave_partial_work()
            raise KeyboardInterrupt

    leave_partial_work()
    stale = {"fast": True, "settings": {}, "progress": {"stages": ["clip"], "done": []}}  # another world's
    (tmp_path / REPORT_NAME).write_text(json.dumps(stale))
    lines: list[str] = []
    kept: list[str] = []

    def resumed(line: str) -> None:
        lines.append(line)
        if line == "== stage clip":
            kept.extend(name for name in PARTIAL_WORK if (tmp_path / name / "checkpoint.pt").is_file())

    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_all(tmp_path, fast=True, num_threads=1, stages=("clip",), log=kill)
        assert found_stale == []  # the other world's partial work was removed before the stage began
        report = build_all(tmp_path, fast=True, num_threads=1, stages=("clip",), log=resumed)
        assert lines[0].startswith("resuming the build in") and "no stage finished before" in lines[0]
        assert kept == list(PARTIAL_WORK)  # what the killed build of this world left, it finds again
        assert report["progress"] == {"stages": ["clip"], "done": ["clip"]}
        assert (tmp_path / "clip" / "model.safetensors").is_file()
        leave_partial_work()  # a finished build is built afresh: nothing of the one before is read
        build_all(tmp_path, fast=True, num_threads=1, stages=("clip",), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert not any((tmp_path / name).exists() for name in PARTIAL_WORK)


@pytest.mark.slow
def test_build_all_fast_writes_every_asset(tmp_path):
    from dataclasses import replace

    from rlkit.shapes.build import STAGES, build_all, stage_configs
    from rlkit.shapes.pretrain import GeneratorTrainConfig

    # another world through ``configs``: a continuation leg on undersized pictures after the generator
    leg = GeneratorTrainConfig(steps=3, batch_size=16, num_images=64, max_minutes=1.0, seed=1, undersized_share=0.4)
    pretraining = replace(stage_configs(True)["pretrain"], continuation=(leg,))
    class Killed(Exception):
        pass

    def kill_at_rewards(line: str) -> None:
        if line == "== stage rewards":
            raise Killed

    lines: list[str] = []
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Killed):  # killed after the dina_lrm stage: its ablation waits for the rewards stage
            build_all(tmp_path, fast=True, num_threads=1, log=kill_at_rewards, configs={"pretrain": pretraining})
        killed = json.loads((tmp_path / "build_report.json").read_text())
        assert killed["progress"]["done"] == ["generator", "clip", "evaluate", "preferences", "dina_lrm"]
        assert (tmp_path / "_dina_lrm_fixed_variance" / "config.json").is_file()
        weights = (tmp_path / "generator" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
        report = build_all(tmp_path, fast=True, num_threads=1, log=lines.append, configs={"pretrain": pretraining})
    finally:
        torch.set_num_threads(threads)
    # the same command again resumes: only the rewards stage runs, on the ablation the killed build trained
    assert lines[0].startswith("resuming the build in") and "finished before" in lines[0]
    started = [line.removeprefix("== stage ") for line in lines if line.startswith("== stage ")]
    assert started[0] == "rewards" and started[1].startswith("rewards: ") and len(started) == 2
    assert not any(line.startswith("DiNa-LRM (") for line in lines)  # the ablation was not trained again
    assert weights == (tmp_path / "generator" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert report["progress"] == {"stages": list(STAGES), "done": list(STAGES)}
    dina_config = json.loads((tmp_path / "dina_lrm" / "config.json").read_text())
    assert dina_config["model"]["backbone_model_id"] == str(tmp_path / "generator")  # the generator it trained on
    assert all(report["seconds"][s] == killed["seconds"][s] for s in killed["progress"]["done"])
    assert report["stats"]["generator"]["generator_steps"] == 10 + 3
    assert report["settings"]["pretrain"]["continuation"][0]["undersized_share"] == 0.4
    for name in ("generator/model_index.json", "clip/config.json", "clip/model.safetensors",
                 "preferences/train.parquet", "build_report.json"):
        assert (tmp_path / name).is_file(), name
    assert report["stats"]["preferences"]["pairs"] == 8
    assert all(report["seconds"][s] > 0 for s in ("generator", "clip", "evaluate", "preferences", "rewards"))
    assert report["stats"]["generator"]["decoder_steps"] == 10  # both decoder refinement phases ran
    rows = report["stats"]["rewards"]  # every reward against the annotators, the fixed-variance ablation too
    for name in ("annotators / second labelling", "dina-lrm / reward", "dina-lrm / u=0.40",
                 "dina-lrm / ensemble(0.2,0.5,0.7)", "dina-lrm (fixed variance) / reward", "shapes-clip / reward",
                 "shapes-golden / reward", "dina-lrm, drawn / u=0.10", "shapes-golden, drawn / reward"):
        assert 0.0 <= rows[name]["accuracy"] <= 1.0 and rows[name]["pairs"] > 0, name
    for name in ("annotators / utility", "dina-lrm / u=0.70", "dina-lrm (fixed variance) / u=0.10",
                 "shapes-clip / clean"):  # the shortcut check of every reward
        assert set(rows[f"shortcuts / {name}"]) == {"utility", "area", "high_frequency", "groups"}, name
    assert not (tmp_path / "_dina_lrm_fixed_variance").exists() and not (tmp_path / "generator_pretrain").exists()
    # the dina_lrm stage trains the ablation beside the shipped model; the rewards stage rerun alone trains it itself
    rerun = build_all(tmp_path, fast=True, num_threads=1, stages=("rewards",), log=lambda _: None)
    assert 0.0 <= rerun["stats"]["rewards"]["dina-lrm (fixed variance) / reward"]["accuracy"] <= 1.0
    assert rerun["seconds"]["dina_lrm"] == report["seconds"]["dina_lrm"]  # the other stages' numbers are kept
    assert not (tmp_path / "_dina_lrm_fixed_variance").exists()
    from rlkit.shapes.build import format_report

    printed = format_report(report)
    assert "held-out pair accuracy: annotators / second labelling" in printed
    assert "rank correlation with utility / blob area / high-frequency energy: annotators / utility" in printed
