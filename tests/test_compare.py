"""rlkit compare on constructed metrics files: gains, grouping, the reward-hacking flag, table + plot."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlkit.compare import Curve, group_rows, hacked_goldens, main, summarize, varied_keys, write_report


def make_run(root: Path, name: str, reward: str, seed: int, proxy: list[float], golden: list[float]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    recipe = {"algorithm": "refl", "name": name, "seed": seed, "output_dir": str(root),
              "rewards": [{"name": reward, "weight": 1.0, "args": {}}], "refl": {"batch_size": 4},
              "launch": {"num_processes": 2}}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rows = []
    for i, (p, g) in enumerate(zip(proxy, golden)):
        step = 10 * i
        if step:
            rows.append({"step": step, "train/loss": -p, "train/time/update_s": 0.5,
                         "train/time/elapsed_s": 2.0 * step - 1})
        rows.append({"step": step, f"eval/proxy/{reward}": p, f"eval/proxy/{reward}/raw": 100 * p,
                     "eval/golden/judge": g, "eval/golden/judge_sem": 0.01 * (i + 1), "time/elapsed_s": 2.0 * step})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_hacking_flag_by_hand():
    steps = [0, 10, 20, 30]
    proxy = Curve(steps, [0.0, 1.0, 2.0, 3.0], [0.0] * 4)
    falls = Curve(steps, [0.0, 0.5, 0.3, 0.1], [0.0] * 4)  # best at step 10, then falls
    rises = Curve(steps, [0.0, 0.2, 0.4, 0.6], [0.0] * 4)
    assert hacked_goldens(proxy, {"a": falls, "b": rises}) == ["a"]
    # the same golden fall with a flat proxy after the golden peak is not hacking, just a bad run
    flat = Curve(steps, [0.0, 1.0, 1.0, 1.0], [0.0] * 4)
    assert hacked_goldens(flat, {"a": falls}) == []
    # a tolerance larger than the fall (0.4) silences it
    assert hacked_goldens(proxy, {"a": falls}, tol=0.5) == []


@pytest.mark.parametrize("sem_best, sem_last, hacked", [
    (0.10, 0.10, True),    # 2 sqrt(0.1^2 + 0.1^2) = 0.283 < the fall of 0.4
    (0.15, 0.15, False),   # 0.424 > 0.4: within the noise of two evaluations
    (0.25, 0.05, False),   # 0.510: the best evaluation's error counts as much as the last one's
    (0.05, 0.25, False),
    (float("nan"), 0.3, True),  # an error not logged at the best: no noise allowance
])
def test_a_golden_fall_counts_as_hacking_only_beyond_two_standard_errors_of_the_difference(sem_best, sem_last,
                                                                                          hacked):
    steps = [0, 10, 20, 30]
    proxy = Curve(steps, [0.0, 1.0, 2.0, 3.0], [0.0] * 4)
    # best at step 10, last 0.4 lower; the errors at the other evaluations do not matter
    falls = Curve(steps, [0.0, 0.5, 0.3, 0.1], [0.0] * 4, [9.0, sem_best, 9.0, sem_last])
    assert hacked_goldens(proxy, {"a": falls}) == (["a"] if hacked else [])


def test_a_runs_group_leaves_out_the_settings_of_algorithms_it_does_not_run(tmp_path):
    refl = make_run(tmp_path, "refl_s0", "dina", 0, [0.0, 1.0], [0.0, 0.1])
    grpo = make_run(tmp_path, "grpo_s0", "dina", 0, [0.0, 1.0], [0.0, 0.1])
    recipe = yaml.safe_load((grpo / "recipe.yaml").read_text())
    recipe.update(algorithm="flow_grpo", flow_grpo={"group_size": 8}, refl={"batch_size": 1})
    (grpo / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert varied_keys([yaml.safe_load((d / "recipe.yaml").read_text()) for d in (refl, grpo)]) == [
        "algorithm", "flow_grpo.group_size", "refl.batch_size"]
    groups = {s.name: s.group for s in summarize([refl, grpo])}
    assert groups == {"refl_s0": "algorithm=refl, refl.batch_size=4",
                      "grpo_s0": "algorithm=flow_grpo, flow_grpo.group_size=8"}


def test_runs_are_grouped_by_setting_and_named_by_their_labels_where_those_name_one(tmp_path):
    """Two sweeps that both label a run ``dina`` (ReFL in one, Flow-GRPO in the other) are not seeds of one group;
    a finished run (labelled) and an unfinished one (no DONE.json) of one setting are."""
    refl = make_run(tmp_path / "refl_sweep", "dina__seed0", "dina", 0, [0.0, 1.0], [0.0, 0.3])
    grpo = make_run(tmp_path / "grpo_sweep", "dina__seed0", "dina", 0, [0.0, 1.0], [0.0, -0.1])
    recipe = yaml.safe_load((grpo / "recipe.yaml").read_text())
    (grpo / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "algorithm": "flow_grpo"}))
    pix = make_run(tmp_path / "refl_sweep", "pix__seed0", "pix", 0, [0.0, 1.0], [0.0, 0.1])
    unfinished = make_run(tmp_path / "refl_sweep", "pix__seed1", "pix", 1, [0.0, 1.0], [0.0, 0.2])
    for d, label in ((refl, "dina"), (grpo, "dina"), (pix, "pix")):
        (d / "DONE.json").write_text(json.dumps({"labels": {"reward": label, "seed": "seed0"}}))
    groups = {str(s.path.relative_to(tmp_path)): s.group for s in summarize([refl, grpo, pix, unfinished])}
    assert groups == {"refl_sweep/dina__seed0": "algorithm=refl, rewards.0.name=dina",
                      "grpo_sweep/dina__seed0": "algorithm=flow_grpo, rewards.0.name=dina",
                      "refl_sweep/pix__seed0": "pix", "refl_sweep/pix__seed1": "pix"}


def test_a_resumed_runs_wall_time_is_its_own_clock_across_launches(tmp_path):
    """A sweep times only the launch that finished a run; the run's elapsed time goes on across resumes."""
    d = make_run(tmp_path, "r", "dina", 0, [0.0, 0.5, 1.0], [0.0, 0.1, 0.2])  # elapsed up to 40 s
    (d / "DONE.json").write_text(json.dumps({"wall_s": 15.0}))  # the launch after a resume
    assert summarize([d])[0].wall_s == pytest.approx(40.0)


def test_report_flags_the_hacked_run_and_groups_by_what_varied(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "dina_s0", "dina", 0, [0.0, 0.5, 1.0], [0.0, 0.2, 0.4])
    make_run(root, "dina_s1", "dina", 1, [0.1, 0.4, 0.9], [0.1, 0.2, 0.5])
    make_run(root, "pix_s0", "pix", 0, [0.0, 1.0, 3.0], [0.0, 0.3, -0.2])  # proxy up, golden down: hacked
    (root / "dina_s1" / "DONE.json").write_text("")  # what the cluster scripts' `touch` leaves
    (root / "dina_s0" / "DONE.json").write_text(json.dumps({"wall_s": 41.5, "peak_rss_bytes": 3 * 2**20}))
    recipes = [yaml.safe_load((root / n / "recipe.yaml").read_text()) for n in ("dina_s0", "pix_s0")]
    assert varied_keys(recipes) == ["rewards.0.name"]

    summaries = {s.name: s for s in summarize(sorted(root.iterdir()))}
    assert summaries["pix_s0"].hacking == ["judge"]
    assert summaries["dina_s0"].hacking == [] and summaries["dina_s1"].hacking == []
    assert summaries["dina_s0"].group == summaries["dina_s1"].group == "rewards.0.name=dina"
    assert summaries["dina_s1"].golden["judge"].gain == pytest.approx(0.4)
    assert summaries["pix_s0"].proxy_curve.gain == pytest.approx(3.0)
    assert set(summaries["pix_s0"].proxy) == {"pix"}  # the /raw sub-key is not a separate reward
    assert set(summaries["pix_s0"].golden) == {"judge"}  # nor is the standard error
    assert summaries["pix_s0"].golden_sem == {"judge": pytest.approx(0.03)}  # the last evaluation's
    assert summaries["pix_s0"].golden["judge"].sem == pytest.approx([0.01, 0.02, 0.03])
    assert summaries["dina_s0"].reward_images == 20 * 4 * 2  # steps x batch x processes
    from rlkit.compare import _reward_images

    assert _reward_images({"algorithm": "refl", "refl": {"batch_size": 2, "grad_accum": 3}}, 5) == 5 * 2 * 3
    grpo = {"algorithm": "flow_grpo", "launch": {"num_processes": 4},  # prompts x group: global, per epoch
            "flow_grpo": {"prompts_per_epoch": 8, "group_size": 4, "updates_per_epoch": 2, "inner_epochs": 2}}
    assert _reward_images(grpo, 8) == 2 * 32 and _reward_images(grpo, 9) == 3 * 32  # a partial epoch scored too
    assert summaries["dina_s0"].wall_s == pytest.approx(41.5) and summaries["dina_s0"].peak_memory_bytes == 3 * 2**20
    assert summaries["dina_s1"].wall_s == pytest.approx(40.0)  # from the metrics' elapsed time

    paths = write_report([root], tmp_path / "report")  # a sweep folder expands to its runs
    table = list(csv.DictReader(paths["csv"].open()))
    assert [r["run"] for r in table] == ["dina_s0", "dina_s1", "pix_s0"]
    assert [r["hacking"] for r in table] == ["", "", "judge"]
    assert float(table[2]["golden_gain/judge"]) == pytest.approx(-0.2)
    assert [r["proxy"] for r in table] == ["dina", "dina", "pix"] and float(table[2]["proxy_gain"]) == 3.0
    md = paths["markdown"].read_text()
    assert "**HACKING** (judge)" in md and "| no |" in md and "Reward hacking" in md and ": pix_s0." in md
    # the groups, seeds pooled: dina's proxy gains 1.0 and 0.8, golden gains 0.4 and 0.4
    groups = {g["group"]: g for g in group_rows(list(summaries.values()))}
    dina = groups["rewards.0.name=dina"]
    assert dina["runs"] == 2 and dina["hacking"] == 0
    assert dina["proxy_gain"] == pytest.approx(0.9) and dina["proxy_gain_std"] == pytest.approx(0.02 ** 0.5)
    assert dina["golden_gain/judge"] == pytest.approx(0.4) and dina["golden_gain/judge_std"] == pytest.approx(0.0)
    pix = groups["rewards.0.name=pix"]
    assert pix["runs"] == 1 and pix["hacking"] == 1 and pix["golden_gain/judge_std"] is None
    assert "By group" in md and "| rewards.0.name=dina | 2 | +0.9 | 0.1414 | +0.4 |" in md
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_names_what_it_cannot_read_instead_of_leaving_it_out(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path}: not a run folder (no metrics.jsonl) nor a folder of run folders" in capsys.readouterr().err
    good = make_run(tmp_path, "good", "r", 0, [0.1, 0.2], [0.3, 0.4])
    assert main([str(good), str(tmp_path / "typo")]) == 2  # a mistyped folder among good ones
    assert "typo: not a run folder (no metrics.jsonl) nor a folder of run folders; it does not exist" in \
        capsys.readouterr().err
    (good / "recipe.yaml").write_text("name: [unclosed\n")
    assert main([str(good)]) == 2
    assert f"{good / 'recipe.yaml'}: not valid YAML" in capsys.readouterr().err
    (good / "recipe.yaml").write_text("- a list\n")
    assert main([str(good)]) == 2
    assert "expected a recipe mapping, got list" in capsys.readouterr().err
    (good / "recipe.yaml").unlink()
    with (good / "metrics.jsonl").open("a") as f:
        f.write('[1, 2]\n{"step": 30}\n')
    assert main([str(good)]) == 2
    assert "metrics.jsonl: record 4 is not a mapping with a numeric step: [1, 2]" in capsys.readouterr().err


def test_per_slot_scores_pair_the_hacking_flags_noise_and_give_each_gains_error(tmp_path):
    """A fall of 0.1 that the two means' logged errors (0.1 each) call noise is hacking once the evaluations' per-slot
    scores show that every slot fell; the table gives the gain's paired error."""
    import numpy as np
    import torch

    from rlkit.evaluate import Evaluator

    rng = np.random.default_rng(1)
    slots = [f"prompt {i // 5}" for i in range(50)]
    spread = rng.normal(scale=0.7, size=50)
    scores = {0: spread, 10: spread + 0.5 + 0.01 * rng.normal(size=50), 20: spread + 0.4 + 0.01 * rng.normal(size=50)}
    run = make_run(tmp_path / "with", "pix_s0", "pix", 0, [0.0, 1.0, 2.0], [float(v.mean()) for v in scores.values()])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "eval/golden/judge_sem" in row:
            row["eval/golden/judge_sem"] = 0.1
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bare = tmp_path / "without" / "pix_s0"
    bare.parent.mkdir()
    shutil.copytree(run, bare)
    for step, values in scores.items():
        Evaluator._write_scores(run, step, slots, {"golden/judge": torch.tensor(values, dtype=torch.float64)})

    [paired] = summarize([run])
    [unpaired] = summarize([bare])
    assert unpaired.hacking == [] and paired.hacking == ["judge"]
    gain = scores[20] - scores[0]
    assert paired.gain_sem == {"judge": pytest.approx(gain.std(ddof=1) / np.sqrt(50), rel=1e-6)}
    assert unpaired.gain_sem == {} and "golden_gain_sem/judge" not in unpaired.row()
    assert paired.row()["golden_gain_sem/judge"] == pytest.approx(paired.gain_sem["judge"])


def test_per_prompt_scores_at_the_first_and_last_evaluation(tmp_path):
    import torch

    from rlkit.evaluate import Evaluator

    run = make_run(tmp_path, "dina_s0", "dina", 0, [0.0, 0.5, 1.0], [0.25, 0.5, 0.75])
    slots = ["a red circle", "a red circle", "a blue square", "a blue square"]
    for step, values in ((0, [0.0, 1.0, 0.0, 0.0]), (10, [1.0, 1.0, 0.0, 0.0]), (20, [1.0, 1.0, 1.0, 0.0])):
        Evaluator._write_scores(run, step, slots, {"golden/judge": torch.tensor(values)})
    bare = make_run(tmp_path, "pix_s0", "pix", 0, [0.0, 1.0], [0.0, 0.1])  # wrote no per-sample scores
    paths = write_report([run, bare], tmp_path / "report")
    rows = list(csv.DictReader(paths["per_prompt"].open()))
    assert [(r["run"], r["prompt"], r["samples"], float(r["first"]), float(r["last"]), float(r["gain"]))
            for r in rows] == [("dina_s0", "a red circle", "2", 0.5, 1.0, 0.5),
                               ("dina_s0", "a blue square", "2", 0.0, 0.5, 0.5)]
    assert "per_prompt" not in write_report([bare], tmp_path / "bare")
