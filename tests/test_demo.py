"""The README's main job: ``rlkit demo --quick`` on the shipped Shapes checkpoints (CI's shortened demo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlkit.shapes.demo import main
from rlkit.shapes.judges import ASSETS_DIR

pytestmark = pytest.mark.slow


def test_quick_demo_trains_both_algorithms_and_writes_the_report(tmp_path, capsys):
    assert (ASSETS_DIR / "generator").is_dir() and (ASSETS_DIR / "dina_lrm").is_dir(), "shipped assets"
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "refl+dina-lrm" in out and "flow_grpo+dina-lrm" in out
    for name in ("summary.md", "summary.json", "curves.png", "refl+dina-lrm_s0_before.png",
                 "refl+dina-lrm_s0_after.png", "flow_grpo+dina-lrm_s0_after.png"):
        assert (tmp_path / name).is_file(), name
    runs = json.loads((tmp_path / "summary.json").read_text())
    assert [r["algorithm"] for r in runs] == ["refl", "flow_grpo"]
    for r in runs:
        steps = [g[0] for g in r["golden"]]
        assert steps[0] == 0 and steps[-1] > 0 and len(steps) >= 3  # evaluated before, during and after
        assert all(0.0 <= g[2] <= 1.0 for g in r["golden"])
        assert all(math.isfinite(v) and v > 0 for v in r["guards"].values())
        assert len(r["proxy"]) == len(r["golden"])
        # the guards at every evaluation, as ratios to real pictures: the last one is the final verdict's
        assert [g[:2] for g in r["guard_curve"]] == [g[:2] for g in r["golden"]]
        assert r["guard_curve"][0][2] == r["guards_before"] and r["guard_curve"][-1][2] == r["guards"]
        # training optimised the proxy (DiNa-LRM on held-out prompts), and the golden judge, which shares
        # none of its blind spots, agrees on the same 108 held-out samples (seeded, so before and after are paired)
        assert r["proxy"][-1][2] > r["proxy"][0][2]
        golden = [g[2] for g in r["golden"]]
        assert golden[-1] > golden[0], f"{r['label']}: golden {golden}"
        # the gain's error is paired by sample, below that of two independent evaluations of the same size
        assert r["gain_se_paired"] and 0 < r["gain_se"] < math.hypot(r["golden_se"][0], r["golden_se"][-1])
    summary = (tmp_path / "summary.md").read_text()
    assert "read back through the generator's own VAE" in summary
    grids = "| refl+dina-lrm | ![before](refl+dina-lrm_s0_before.png) | ![after](refl+dina-lrm_s0_after.png) |"
    assert grids in summary


def test_demo_without_checkpoints_says_how_to_rebuild(tmp_path, monkeypatch, capsys):
    import rlkit.shapes.judges as judges

    monkeypatch.setattr(judges, "ASSETS_DIR", tmp_path)
    assert main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert f"rlkit shapes build {tmp_path}`" in capsys.readouterr().out


def test_recipe_overrides_reach_every_run_after_the_demos_own_and_a_wrong_one_stops_it_first(tmp_path, monkeypatch,
                                                                                             capsys):
    import rlkit.shapes.demo as demo

    monkeypatch.setattr(demo, "run_one", lambda *a: pytest.fail("a run started despite a wrong override"))
    assert main(["--out", str(tmp_path), "eval.sed=7"]) == 2
    assert "eval.sed: unknown key; did you mean 'seed'?" in capsys.readouterr().out
    seen = []

    class Stop(Exception):
        pass

    def record(algorithm, label, seed, out, extra, quick):
        seen.append((label, extra))
        if len(seen) == 3:
            raise Stop
        return demo.RunSummary(label, algorithm, seed, out, golden=[(0, 0.0, 0.3), (10, 1.0, 0.4)])

    monkeypatch.setattr(demo, "run_one", record)
    with pytest.raises(Stop):  # overrides anywhere, even after --seeds, which takes several values
        main(["--out", str(tmp_path), "eval.seed=7", "--pixel-reward", "--seeds", "0", "optim.lr=1e-4"])
    assert seen == [("refl+dina-lrm", ["eval.seed=7", "optim.lr=1e-4"]),
                    ("refl+pixel-clip", [*demo.ARMS["pixel-clip"]["refl"], "eval.seed=7", "optim.lr=1e-4"]),
                    ("flow_grpo+dina-lrm", ["eval.seed=7", "optim.lr=1e-4"])]
    monkeypatch.setattr(demo, "run_one", lambda *a: pytest.fail("a run started despite an override of the demo's own"))
    assert main(["--seeds", "0", "1", "seed=3", "name=mine"]) == 2  # every run would share one seed and one folder
    assert "name, seed cannot be overridden" in capsys.readouterr().out


@pytest.mark.parametrize("before, after, hacked, real", [
    (1.00, 1.10, False, True),  # within the band
    (1.00, 1.50, True, False),  # a realistic base pushed off
    (0.30, 0.30, False, False),  # a base already off, kept where it was: not the run's doing
    (0.30, 0.70, False, False),  # brought closer to real pictures
    (0.30, 0.20, True, False),  # pushed further off by more than the tolerance
    (1.30, 1.40, False, False),  # further off, but by less than the tolerance
    (0.95, 0.78, True, False),  # from inside the band to outside it, by less than the tolerance
    (1.10, 1.30, True, False),
    (0.00, 0.00, False, False),  # a blank base, kept blank
    (0.00, 0.60, False, False),  # a blank base brought closer
    (0.00, 2.50, True, False),  # a blank base pushed further off (no division by its 0)
])
def test_a_guard_is_reward_hacking_only_when_the_run_pushes_it_off(before, after, hacked, real):
    from rlkit.shapes.demo import RunSummary

    r = RunSummary("refl", "refl", 0, Path("."),
                   guard_curve=[(0, 0.0, {"high_frequency": before, "foreground_area": 1.0}),
                                (10, 5.0, {"high_frequency": after, "foreground_area": 1.0})])
    assert r.hacked is hacked and r.guards_real is real


def test_runs_are_compared_at_the_wall_time_of_the_shortest(tmp_path):
    from rlkit.shapes.demo import RunSummary, write_report

    latent = RunSummary("refl+dina-lrm", "refl", 0, tmp_path / "a",
                        golden=[(0, 0.0, 0.2), (10, 50.0, 0.4), (20, 100.0, 0.5)])
    pixel = RunSummary("refl+pixel-clip", "refl", 0, tmp_path / "b", golden=[(0, 0.0, 0.2), (10, 80.0, 0.3)])
    assert latent.golden_at(80.0) == 0.4 and latent.golden_at(10.0) == 0.2 and pixel.golden_at(80.0) == 0.3
    write_report([latent, pixel], {"foreground_area": 1.0, "high_frequency": 1.0}, tmp_path)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["golden_at_equal_time"], r["equal_time_s"]) for r in rows] == [(0.4, 80.0), (0.3, 80.0)]
    assert "0.400 (80 s)" in (tmp_path / "summary.md").read_text()


def test_the_curves_plot_golden_proxy_and_every_guard_at_every_evaluation(tmp_path):
    from rlkit.runtime.tracking import METRICS_FILE
    from rlkit.shapes.demo import GOLDEN, curve_panels, read_run, write_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"step": 0, "time/elapsed_s": 1.0, GOLDEN: 0.3, f"{GOLDEN}/foreground_area": 0.05,
                f"{GOLDEN}/high_frequency": 0.002, "eval/proxy/dina-lrm": 1.5},
               {"step": 5, "train/loss": 0.1},  # a training record: no evaluation
               {"step": 10, "time/elapsed_s": 30.0, GOLDEN: 0.5, f"{GOLDEN}/foreground_area": 0.09,
                f"{GOLDEN}/high_frequency": 0.003, "eval/proxy/dina-lrm": 2.5}]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    run = read_run("refl+dina-lrm", "refl", 0, run_dir, wall_s=31.0)
    assert run.golden == [(0, 1.0, 0.3), (10, 30.0, 0.5)] and run.proxy == [(0, 1.0, 1.5), (10, 30.0, 2.5)]
    assert [(step, wall) for step, wall, _ in run.guard_curve] == [(0, 1.0), (10, 30.0)]
    write_report([run], {"foreground_area": 0.1, "high_frequency": 0.004}, tmp_path)  # scales guards to ratios
    panels = {title: series["refl+dina-lrm s0"] for title, _, series in curve_panels([run])}
    assert list(panels) == ["golden judge (held-out prompts)", "proxy reward (held-out prompts)",
                            "foreground area / real pictures", "high frequency / real pictures"]
    assert panels["foreground area / real pictures"] == [(0, 1.0, pytest.approx(0.5)), (10, 30.0, pytest.approx(0.9))]
    assert panels["high frequency / real pictures"] == [(0, 1.0, pytest.approx(0.5)), (10, 30.0, pytest.approx(0.75))]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_the_summary_names_the_guards_the_base_generator_already_fails(tmp_path):
    from rlkit.shapes.demo import RunSummary, write_report

    def run(seed, area_after):
        return RunSummary("refl+dina-lrm", "refl", seed, tmp_path / str(seed), golden=[(0, 0.0, 0.3), (10, 5.0, 0.5)],
                          guard_curve=[(0, 0.0, {"foreground_area": 0.096, "high_frequency": 0.0016}),
                                       (10, 5.0, {"foreground_area": area_after, "high_frequency": 0.0016})])

    text = write_report([run(0, 0.11), run(1, 0.15)], {"foreground_area": 0.1, "high_frequency": 0.01},
                        tmp_path).read_text()
    assert "before any training (the base generator): high_frequency 0.16." in text  # the area starts at 0.96
    assert "| 0.96 -> 1.10 | 0.16 -> 0.16 | no |" in text
    assert "| 0.96 -> 1.50 | 0.16 -> 0.16 | no |" in text
    in_band = write_report([run(0, 0.11)], {"foreground_area": 0.1, "high_frequency": 0.0016}, tmp_path)
    assert "before any training" not in in_band.read_text()


class _Autoencoder:
    """A stand-in generator whose VAE is ``decode(encode(x)) = read_back(x)``."""

    def __init__(self, read_back):
        self.read_back = read_back

    def encode(self, images):
        return images * 2 - 1

    def decode(self, latents):
        return self.read_back(latents / 2 + 0.5)


def test_the_vae_read_back_passes_the_reference_pictures_through_the_generators_autoencoder():
    import torch.nn.functional as F

    from rlkit.shapes.demo import guard_values, heldout_pictures, real_guard_values, reconstruction_guard_values

    real = real_guard_values(num=64)
    assert reconstruction_guard_values(_Autoencoder(lambda x: x), num=64) == pytest.approx(real, rel=1e-6)

    def blur(x):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    blurred = reconstruction_guard_values(_Autoencoder(blur), num=64)
    assert blurred == pytest.approx(guard_values(blur(heldout_pictures(num=64))), rel=1e-6)
    assert blurred["high_frequency"] < 0.3 * real["high_frequency"]  # a 3x3 box blur removes most edge energy
    assert blurred["foreground_area"] == pytest.approx(real["foreground_area"], rel=0.1)  # the contour stays


def test_the_shipped_vae_reads_real_pictures_back_inside_both_guards():
    """The shipped decoder is refined with the high-frequency energy term (DecoderTrainConfig.hf_weight): its
    reconstructions of real held-out pictures hold 0.95x their high-frequency energy and their area (the earlier
    decoder's held 0.16x, which no policy could leave)."""
    from rlkit.shapes.demo import real_guard_values, reconstruction_guard_values
    from rlkit.shapes.pretrain import load_generator

    real = real_guard_values()
    read_back = reconstruction_guard_values(load_generator(ASSETS_DIR / "generator"))
    assert 0.85 < read_back["high_frequency"] / real["high_frequency"] < 1.1
    assert 0.9 < read_back["foreground_area"] / real["foreground_area"] < 1.1


def test_the_summary_gives_the_guards_of_real_pictures_read_back_through_the_vae(tmp_path):
    from rlkit.shapes.demo import RunSummary, write_report

    run = RunSummary("refl+dina-lrm", "refl", 0, tmp_path / "r", golden=[(0, 0.0, 0.3), (10, 5.0, 0.5)],
                     guard_curve=[(0, 0.0, {"foreground_area": 0.1, "high_frequency": 0.0016}),
                                  (10, 5.0, {"foreground_area": 0.1, "high_frequency": 0.0016})])
    real = {"foreground_area": 0.1, "high_frequency": 0.01}
    text = write_report([run], real, tmp_path, {"foreground_area": 0.098, "high_frequency": 0.0017}).read_text()
    assert "through the generator's own VAE (encode, decode): foreground_area 0.98, high_frequency 0.17 of" in text
    assert "own VAE" not in write_report([run], real, tmp_path).read_text()


@pytest.mark.parametrize("gain, se, verdict", [
    (0.20, 0.03, "gain"),  # beyond two standard errors of the difference
    (0.05, 0.03, "within noise"),
    (-0.05, 0.03, "within noise"),
    (-0.20, 0.03, "loss"),
])
def test_a_gain_counts_only_beyond_two_standard_errors(gain, se, verdict):
    from rlkit.shapes.demo import RunSummary

    r = RunSummary("refl", "refl", 0, Path("."), golden=[(0, 0.0, 0.3), (10, 5.0, 0.3 + gain)], golden_se=[se, se],
                   guard_curve=[(0, 0.0, {"high_frequency": 1.0}), (10, 5.0, {"high_frequency": 1.0})])
    assert r.gain_se == pytest.approx(se * math.sqrt(2))
    assert r.verdict == verdict


def test_the_oracle_arm_trains_flow_grpo_on_the_annotators_utility():
    import rewards
    from rlkit.config import load_recipe
    from rlkit.confload import shipped_recipe
    from rlkit.shapes.demo import ARMS, ORACLE
    from rlkit.shapes.judges import GoldenJudgeReward

    assert set(ARMS[ORACLE]) == {"flow_grpo"}  # not differentiable: no ReFL arm
    recipe = load_recipe(shipped_recipe("flow_grpo_shapes.yaml"), ARMS[ORACLE]["flow_grpo"])
    (spec,) = recipe.rewards
    reward = rewards.build(spec.name, **spec.args)
    assert isinstance(reward, GoldenJudgeReward) and reward.mode == "utility"
    assert recipe.flow_grpo.reward_at == "final"


@pytest.mark.parametrize("oracle_gains, share, oracle_row", [((0.2, 0.1), "50%", "+0.150 | 0.071 | 2 | - |"),
                                                             ((-0.02, 0.01), "-", "-0.005 | 0.021 | 2 | - |")])
def test_the_summary_states_each_rewards_share_of_the_oracles_gain(tmp_path, oracle_gains, share, oracle_row):
    from rlkit.shapes.demo import ORACLE, RunSummary, write_report

    def run(label, seed, gain):
        return RunSummary(label, "flow_grpo", seed, tmp_path / f"{label}{seed}",
                          golden=[(0, 0.0, 0.3), (10, 50.0, 0.3 + gain)])

    runs = [run("flow_grpo+dina-lrm", 0, 0.1), run("flow_grpo+dina-lrm", 1, 0.05),
            *(run(f"flow_grpo+{ORACLE}", seed, gain) for seed, gain in enumerate(oracle_gains))]
    text = write_report(runs, {"foreground_area": 1.0, "high_frequency": 1.0}, tmp_path).read_text()
    assert f"| flow_grpo+dina-lrm | +0.075 | 0.035 | 2 | {share} |" in text
    assert f"| flow_grpo+{ORACLE} | {oracle_row}" in text  # no share of itself
    assert f"`{ORACLE}`" in text


def test_the_gains_error_is_paired_by_slot_where_the_run_wrote_its_scores(tmp_path):
    """read_run takes the gain's error from the per-slot scores of the first and last evaluations; without them, the
    two means' errors as independent."""
    import torch

    from rlkit.evaluate import Evaluator
    from rlkit.shapes.demo import GOLDEN, read_run

    rows = [{"step": 0, GOLDEN: 0.3, f"{GOLDEN}_sem": 0.03}, {"step": 10, GOLDEN: 0.4, f"{GOLDEN}_sem": 0.03}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    unpaired = read_run("refl", "refl", 0, tmp_path, wall_s=1.0)
    assert unpaired.paired_gain_se is None and unpaired.gain_se == pytest.approx(0.03 * math.sqrt(2))
    before = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    after = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # one slot of five turned correct
    for step, values in ((0, before), (10, after)):
        Evaluator._write_scores(tmp_path, step, ["a"] * 5, {GOLDEN.removeprefix("eval/"): values})
    paired = read_run("refl", "refl", 0, tmp_path, wall_s=1.0)
    assert paired.gain_se == pytest.approx((after - before).std().item() / math.sqrt(5))  # sqrt(0.2 / 5)
    assert paired.gain_se == pytest.approx(0.2)
