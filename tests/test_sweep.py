"""rlkit sweep: expansion, launch scripts, the shipped sweep files, and a tiny ReFL sweep that is
interrupted, resumed without redoing the finished run, and reported."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from rlkit.config import ConfigError
from rlkit.sweep import DONE_FILE, load_sweep, main, write_slurm_script

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))


def tiny_base(tmp_path: Path, model_dir: Path) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square at the top\na green triangle on the left\na yellow cross\n")
    recipe = {
        "algorithm": "refl", "name": "tiny", "seed": 3,
        "model": {"pretrained": str(model_dir), "resolution": 32, "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8},
        "rewards": [{"name": "latent-direction", "args": {"seed": 1, "scale": 10.0}}],
        "prompts": {"source": str(prompts)},
        "optim": {"lr": 5e-3, "weight_decay": 0.0, "grad_clip": 10.0},
        "refl": {"num_steps": 4, "grad_step_range": [1, 3], "guidance_scale": 1.0, "batch_size": 2,
                 "max_steps": 2, "loss": "neg"},
        "eval": {"every": 1, "prompts": str(prompts), "num_prompts": 2, "num_steps": 4, "batch_size": 2,
                 "grid_images": 0, "golden": [{"name": "latent-direction", "args": {"seed": 2}}]},
        "logging": {"backends": ["jsonl"], "progress": False},
        "checkpoint": {"every": 1, "keep_last": 1},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_sweep(tmp_path: Path, base: Path, **extra) -> Path:
    sweep = {"base": base.name, "name": "tiny_sweep", "output_dir": str(tmp_path / "out"),
             "axes": [{"name": "reward", "options": [{"label": "latent", "overrides": []}]}],
             "seeds": [0, 1], **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_labels_that_yaml_reads_as_numbers_or_booleans_name_their_run_folders(tmp_path):
    """A run's folder is its name as written: the launch script marks that folder done."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [{"name": "latent-direction"}]}))
    labels = ["0.10", "010", "no", "1e-3"]
    path = write_sweep(tmp_path, base, seeds=[], axes=[
        {"name": "lr", "options": [{"label": label, "overrides": []} for label in labels]}])
    sweep = load_sweep(path)
    assert [r.run_dir.name for r in sweep.validate()] == [r.name for r in sweep.runs()] == labels


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweeps_load_and_expand(path):
    sweep = load_sweep(path)
    recipes = sweep.validate()
    runs = sweep.runs()
    assert len(recipes) == len(runs) >= 4 and len({r.name for r in runs}) == len(runs)
    assert len({r.seed for r in recipes}) >= 2
    rewards = {tuple(s.name for s in r.rewards) for r in recipes}
    assert len(rewards) >= 2, "a reward ablation varies the reward"
    assert all(r.eval.golden for r in recipes)
    assert all(r.run_dir.parent == sweep.dir for r in recipes)
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert f"rlkit sweep recipes/sweeps/{path.name}" in header  # the header names the launch command


def test_expansion_names_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [{"name": "latent-direction"}]}))
    path = write_sweep(tmp_path, base, overrides=["refl.max_steps=7"], axes=[
        {"name": "reward", "options": [{"label": "a", "overrides": ["rewards.0.args={seed: 5}"]},
                                       {"label": "b", "overrides": ["rewards=[{name: pickscore}]"]}]},
        {"name": "lr", "options": [{"label": "lr1", "overrides": ["optim.lr=0.1"]}]}])
    sweep = load_sweep(path)
    runs = sweep.runs()
    assert [r.name for r in runs] == ["a__lr1__seed0", "a__lr1__seed1", "b__lr1__seed0", "b__lr1__seed1"]
    assert runs[2].labels == {"reward": "b", "lr": "lr1", "seed": "seed0"}
    recipes = sweep.validate()
    assert recipes[0].rewards[0].args == {"seed": 5} and recipes[2].rewards[0].name == "pickscore"
    assert [r.seed for r in recipes] == [0, 1, 0, 1]
    assert all(r.refl.max_steps == 7 and r.optim.lr == 0.1 for r in recipes)
    assert recipes[3].run_dir == tmp_path / "out" / "tiny_sweep" / "b__lr1__seed1"

    sbatch = write_slurm_script(sweep).read_text()
    assert "#SBATCH --array=0-3" in sbatch and sbatch.count("accelerate launch") == 4
    assert main([str(path), "--emit", "accelerate"]) == 0
    launch = (sweep.dir / "launch.sh").read_text()
    assert launch.count("accelerate launch") == 4 and "name=\"b__lr1__seed1\"" in launch
    assert launch.count("--config_file") == 4 and (recipes[3].run_dir / "accelerate_config.yaml").is_file()
    # a failing run stops the script with its status, and is not marked done
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, status in (("accelerate", 3), ("rlkit", 0)):
        (bin_dir / tool).write_text(f"#!/bin/sh\nexit {status}\n")
        (bin_dir / tool).chmod(0o755)
    import os
    import subprocess

    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(sweep.dir / "launch.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 3 and not list(sweep.dir.rglob("DONE*"))


def test_bad_sweep_names_the_field(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [{"name": "latent-direction"}]}))
    path = write_sweep(tmp_path, base, seeds=[0, 0], axes=[{"name": "r", "options": [{"label": "a b"}]},
                                                          {"name": "lr", "options": [{"label": "lr__1e-3"}]}])
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "seeds" in text and "axes.0.options.0.label" in text
    assert "axes.1.options.0.label" in text and "'__' (which joins the labels of a run's name)" in text
    bad = write_sweep(tmp_path, base, overrides=["refl.max_step=3"])
    with pytest.raises(ConfigError, match="max_step"):
        load_sweep(bad).validate()
    base.write_text("algorithm: refl\nrefl: {max_steps: 3}\nrefl: {max_steps: 4}\n")  # a problem of the base
    with pytest.raises(ConfigError, match=rf"\[latent__seed0: {re.escape(str(base))}\]: line 3: "
                                          r".*'refl' is given twice"):
        load_sweep(bad).validate()
    base.unlink()
    with pytest.raises(ConfigError, match=rf"sweep\.yaml: base: no such recipe: {re.escape(str(base))}"):
        load_sweep(bad)


def test_tiny_sweep_resumes_after_interruption_and_reports(tmp_path, tiny_sd3_dir, monkeypatch):
    import rlkit.trainers

    path = write_sweep(tmp_path, tiny_base(tmp_path, tiny_sd3_dir))
    real_run = rlkit.trainers.run
    trained: list[str] = []

    def interrupted(recipe):
        if trained:
            raise KeyboardInterrupt  # the machine went away during the second run
        trained.append(recipe.name)
        return real_run(recipe)

    monkeypatch.setattr(rlkit.trainers, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([str(path)])
    out = tmp_path / "out" / "tiny_sweep"
    assert trained == ["latent__seed0"]
    assert (out / "latent__seed0" / DONE_FILE).is_file() and not (out / "latent__seed1" / DONE_FILE).exists()

    def counted(recipe):
        trained.append(recipe.name)
        return real_run(recipe)

    monkeypatch.setattr(rlkit.trainers, "run", counted)
    assert main([str(path)]) == 0
    assert trained == ["latent__seed0", "latent__seed1"], "the finished run must not be repeated"
    for name, seed in (("latent__seed0", 0), ("latent__seed1", 1)):
        run_dir = out / name
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["seed"] == seed
        done = json.loads((run_dir / DONE_FILE).read_text())
        assert done["wall_s"] > 0 and done["peak_rss_bytes"] > 2**20 and done["labels"]["seed"] == f"seed{seed}"

    table = list(csv.DictReader((out / "report" / "compare.csv").open()))
    assert [r["run"] for r in table] == ["latent__seed0", "latent__seed1"]
    for r in table:
        assert r["group"] == "latent" and float(r["wall_s"]) > 0 and float(r["peak_mem_mib"]) > 1
        assert r["proxy"] == "latent-direction" and r["golden_gain/latent-direction"]
        assert int(r["reward_images"]) == 2 * 2  # 2 steps x batch 2
    assert float(table[0]["proxy_gain"]) != float(table[1]["proxy_gain"])  # the seeds differ
    assert (out / "report" / "curves.png").stat().st_size > 10_000
