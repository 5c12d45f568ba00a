"""Pairwise-accuracy harness: exact counts on constructed sets, shared noise, CIs, JSON/Markdown, CLI."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

import rewards
from rewards.base import Reward, RewardInput, RewardOutput
from rlkit.data import PreferencePair
from rlkit.eval_reward import (
    CLEAN_ROW,
    ROW_SEED_STRIDE,
    bootstrap_interval,
    evaluate_pairwise,
    main,
    summarize,
    wilson_interval,
)

SHAPE = (2, 3, 3)


class SumReward(Reward):
    """score = scale * sum(latents) + jitter * N(0, 1) drawn from the batch's generator."""

    space = "latent"
    noise_aware = True
    differentiable = True

    def __init__(self, scale: float = 1.0, jitter: float = 0.0):
        super().__init__()
        self.scale, self.jitter = scale, jitter
        self.calls: list[RewardInput] = []

    def forward(self, batch: RewardInput) -> RewardOutput:
        self.calls.append(batch)
        scores = self.scale * batch.latents.flatten(1).sum(1)
        if self.jitter:
            scores = scores + self.jitter * torch.randn(scores.shape, generator=batch.generator)
        return RewardOutput(scores=scores)


class BrightnessReward(Reward):
    """Pixel reward: mean brightness of the images (decoded from latents when needed)."""

    space = "pixel"
    noise_aware = False

    def forward(self, batch: RewardInput) -> RewardOutput:
        return RewardOutput(scores=batch.pixels().mean(dim=(1, 2, 3)))


def latent_pair(c: float, r: float, prompt: str = "p", row: int = 0, label: float = 1.0) -> PreferencePair:
    return PreferencePair(prompt, torch.full(SHAPE, c), torch.full(SHAPE, r), "latent", label, "mem", row)


def constructed_set() -> list[PreferencePair]:
    """6 wins, 2 ties, 2 losses (by sum of latents), in a mixed order, plus one data tie."""
    values = [(1, 0), (2, 0), (0, 0), (0, 1), (3, 1), (5, 4), (1, 1), (0, 2), (9, 8), (4, -4)]
    pairs = [latent_pair(c, r, row=i) for i, (c, r) in enumerate(values)]
    pairs.append(latent_pair(7, 0, row=10, label=0.5))
    return pairs


def test_exact_wins_ties_losses_and_accuracies_on_a_constructed_set():
    report = evaluate_pairwise(SumReward(), constructed_set(), batch_size=3, progress=False)
    row = report.row(CLEAN_ROW)
    assert (row.pairs, row.wins, row.ties, row.losses) == (10, 6, 2, 2)
    assert row.accuracy == pytest.approx(0.6)
    assert row.accuracy_ties_half == pytest.approx(0.7)
    assert row.accuracy_no_ties == pytest.approx(0.75)
    assert report.skipped_label_ties == 1
    # Wilson 95% interval of 6/10, textbook value
    assert (row.ci_low, row.ci_high) == (pytest.approx(0.3127, abs=1e-4), pytest.approx(0.8318, abs=1e-4))
    assert row.mean_margin == pytest.approx(18 * (1 + 2 + 0 - 1 + 2 + 1 + 0 - 2 + 1 + 8) / 10)


def test_tie_tolerance_turns_small_margins_into_ties():
    pairs = [latent_pair(1.0, 0.99, row=0), latent_pair(1.0, 0.0, row=1), latent_pair(0.0, 1.0, row=2)]
    strict = evaluate_pairwise(SumReward(), pairs, progress=False).row(CLEAN_ROW)
    loose = evaluate_pairwise(SumReward(), pairs, tie_tol=0.5, progress=False).row(CLEAN_ROW)
    assert (strict.wins, strict.ties, strict.losses) == (2, 0, 1)
    assert (loose.wins, loose.ties, loose.losses) == (1, 1, 1)


def test_wilson_interval_against_hand_values_and_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(50, 100, confidence=0.9)
    assert lo == pytest.approx(1 - hi) and hi - lo == pytest.approx(0.1631, abs=1e-3)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    outcomes = torch.tensor([1.0] * 70 + [0.0] * 30)
    a = bootstrap_interval(outcomes, seed=3)
    assert a == bootstrap_interval(outcomes, seed=3)
    lo, hi = a
    assert lo < 0.7 < hi
    w_lo, w_hi = wilson_interval(70, 100)
    assert abs((hi - lo) - (w_hi - w_lo)) < 0.03  # both about +-0.09 at n = 100
    row = summarize("x", torch.tensor([1.0] * 70 + [-1.0] * 30), ci="bootstrap", seed=3)
    assert (row.ci_low, row.ci_high) == a


def test_stochastic_reward_gets_the_same_generator_state_for_chosen_and_rejected():
    # jitter dwarfs the margins; it cancels only if both sides draw the same numbers
    pairs = [latent_pair(0.1, 0.0, row=i) for i in range(40)]
    report = evaluate_pairwise(SumReward(jitter=100.0), pairs, batch_size=7, progress=False)
    assert report.row(CLEAN_ROW).accuracy == 1.0


def test_noise_levels_share_eps_within_a_pair_and_pass_sigma():
    reward = SumReward()
    pairs = [latent_pair(0.01, 0.0, row=i) for i in range(16)]
    report = evaluate_pairwise(reward, pairs, levels=[0.3, 0.99], batch_size=4, include_clean=False, progress=False)
    # a linear reward keeps the sign of the clean margin at any level when eps is shared: (1 - u) * margin
    assert [r.setting for r in report.results] == ["u=0.30", "u=0.99"]
    assert all(r.accuracy == 1.0 for r in report.results)
    assert report.row("u=0.99").mean_margin == pytest.approx(0.01 * 0.01 * 18, rel=1e-3)
    chosen_call, rejected_call = reward.calls[0], reward.calls[1]
    assert torch.allclose(chosen_call.sigmas, torch.full((4,), 0.3))
    diff = chosen_call.latents - rejected_call.latents
    assert torch.allclose(diff, torch.full_like(diff, 0.7 * 0.01), atol=1e-6)
    # the noise itself is not zero, and differs between pairs of a batch
    noise = rejected_call.latents / 0.3
    assert noise.std() > 0.5 and not torch.allclose(noise[0], noise[1])


def test_independent_pair_noise_draws_each_side_its_own_and_costs_accuracy(capsys, tmp_path):
    """``pair_noise="independent"`` (the release's benchmark protocol): each side of a pair gets its own eps
    and generator state; the chosen side keeps the shared protocol's draws."""
    pairs = [latent_pair(0.01, 0.0, row=i) for i in range(16)]
    shared, apart = SumReward(jitter=1.0), SumReward(jitter=1.0)
    kwargs = dict(levels=[0.5], batch_size=4, progress=False)
    same = evaluate_pairwise(shared, pairs, **kwargs)
    report = evaluate_pairwise(apart, pairs, pair_noise="independent", **kwargs)
    assert same.row("u=0.50").accuracy == same.row(CLEAN_ROW).accuracy == 1.0
    assert report.row("u=0.50").accuracy < 0.9 and report.row(CLEAN_ROW).accuracy < 0.9  # noise no longer cancels
    assert report.pair_noise == "independent" and "independent noise per pair" in report.to_markdown()
    # call order per group: clean chosen, clean rejected, level chosen, level rejected
    torch.testing.assert_close(apart.calls[2].latents, shared.calls[2].latents)  # the chosen side's eps is kept
    eps_r = apart.calls[3].latents / 0.5  # x_u = (1 - u) x0 + u eps with rejected x0 = 0
    eps_c = (apart.calls[2].latents - 0.5 * 0.01) / 0.5
    assert not torch.allclose(eps_r, eps_c) and eps_r.std() > 0.5
    with pytest.raises(ValueError, match="pair_noise must be one of"):
        evaluate_pairwise(shared, pairs, pair_noise="per-image", progress=False)
    rewards.register("test-eval-sum-noisy")(SumReward)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p", "chosen": torch.full(SHAPE, 0.01).tolist(),
                                        "rejected": torch.zeros(SHAPE).tolist()}) + "\n" for _ in range(8)))
    assert main(["--reward", "test-eval-sum-noisy", "--args", "jitter=1.0", "--data", str(data), "--no-progress",
                 "--device", "cpu", "--pair-noise", "independent"]) == 0
    assert "independent noise per pair" in capsys.readouterr().out


def test_noise_levels_are_reproducible_from_the_seed_and_change_with_it():
    class Nonlinear(SumReward):
        def forward(self, batch):
            return RewardOutput(scores=batch.latents.flatten(1).pow(3).sum(1) * (1 + batch.sigmas))

    pairs = [latent_pair(0.2, 0.1, row=i) for i in range(24)]
    a = evaluate_pairwise(Nonlinear(), pairs, levels=[0.8], include_clean=False, seed=1, progress=False)
    b = evaluate_pairwise(Nonlinear(), pairs, levels=[0.8], include_clean=False, seed=1, progress=False)
    c = evaluate_pairwise(Nonlinear(), pairs, levels=[0.8], include_clean=False, seed=2, progress=False)
    assert a.results[0].mean_margin == b.results[0].mean_margin
    assert a.results[0].mean_margin != c.results[0].mean_margin


def test_noise_draws_do_not_depend_on_the_data_device():
    """eps and the reward's generator come from CPU generators seeded per batch, so a seed gives the same draws
    whatever device holds the data: eps equals a CPU reference draw, and with the data on ``meta`` (a device
    without values, standing in for a GPU) the reward still gets CPU generators in the same states."""

    class Recording(SumReward):
        def forward(self, batch):
            self.calls.append(batch)
            return RewardOutput(scores=torch.zeros(batch.batch_size))  # on CPU: meta data have no values

    pairs = [latent_pair(0.0, 0.0, row=i) for i in range(6)]
    runs = {}
    for device in ("cpu", "meta"):
        runs[device] = Recording()
        evaluate_pairwise(runs[device], pairs, levels=[0.3], batch_size=4, seed=5, progress=False, device=device)
    reference = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(5 + ROW_SEED_STRIDE))
    torch.testing.assert_close(runs["cpu"].calls[2].latents, 0.3 * reference)  # row 1 (u=0.30), batch 0, chosen
    assert runs["meta"].calls[2].latents.device.type == "meta"
    for cpu_call, meta_call in zip(runs["cpu"].calls, runs["meta"].calls, strict=True):
        assert cpu_call.generator.device.type == meta_call.generator.device.type == "cpu"
        assert torch.equal(cpu_call.generator.get_state(), meta_call.generator.get_state())


class ModeReward(SumReward):
    """A reward with DiNa-LRM-style scoring modes: ``renoise`` (adds its own noise at u), ``state``, ``ensemble``."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.options = SimpleNamespace(mode="renoise", u=0.5, levels=(0.2,))
        self.modes: list[str] = []

    def forward(self, batch):
        self.modes.append(self.options.mode)
        x = batch.latents
        if self.options.mode == "state":
            return RewardOutput(scores=x.flatten(1).sum(1))
        levels = [self.options.u] if self.options.mode == "renoise" else list(self.options.levels)
        noise = torch.randn(x.shape, generator=batch.generator)
        score = sum(((1 - u) * x + u * noise).flatten(1).pow(3).sum(1) for u in levels)
        return RewardOutput(scores=score)


def test_level_rows_switch_mode_rewards_to_state_and_the_ensemble_row_shares_noise():
    reward = ModeReward()
    pairs = [latent_pair(0.3, 0.2, row=i) for i in range(12)]
    report = evaluate_pairwise(reward, pairs, levels=[0.4], ensemble=[0.2, 0.5, 0.7], batch_size=4, progress=False)
    assert [r.setting for r in report.results] == ["reward", "u=0.40", "ensemble(0.2,0.5,0.7)"]
    assert reward.options.mode == "renoise" and reward.options.levels == (0.2,)  # restored
    assert reward.modes[:6] == ["renoise", "renoise", "state", "state", "ensemble", "ensemble"]
    # shared noise: the cubic score is monotone in x, so with equal noise the higher latent always wins
    assert all(r.accuracy == 1.0 for r in report.results)
    with pytest.raises(ValueError, match="no scoring modes"):
        evaluate_pairwise(SumReward(), pairs, ensemble=[0.5], progress=False)


def test_pixel_reward_on_images_and_on_latents_through_decode():
    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (value,) * 3).save(buf, format="PNG")
        return buf.getvalue()

    pairs = [PreferencePair("p", png(200), png(50), "image", row=0),
             PreferencePair("p", png(10), png(90), "image", row=1),
             PreferencePair("q", png(7), png(7), "image", row=2)]
    row = evaluate_pairwise(BrightnessReward(), pairs, progress=False).row(CLEAN_ROW)
    assert (row.wins, row.ties, row.losses) == (1, 1, 1)
    decodes = []

    def decode(z):
        decodes.append(z.shape[0])
        return torch.sigmoid(z[:, :1]).expand(-1, 3, -1, -1)

    report = evaluate_pairwise(BrightnessReward(), constructed_set(), decode=decode, progress=False)
    assert (report.row(CLEAN_ROW).wins, report.row(CLEAN_ROW).ties) == (6, 2)
    assert sum(decodes) == 2 * 10
    with pytest.raises(ValueError, match="reads pixels but the data holds latents"):
        evaluate_pairwise(BrightnessReward(), constructed_set(), progress=False)
    with pytest.raises(ValueError, match="cache-latents"):
        evaluate_pairwise(SumReward(), pairs, progress=False)
    with pytest.raises(ValueError, match="not a noise-aware latent reward"):
        evaluate_pairwise(BrightnessReward(), pairs, levels=[0.4], progress=False)


def test_pairs_of_different_shapes_are_scored_in_separate_groups():
    small = [latent_pair(1, 0, row=0), latent_pair(0, 1, row=1)]
    big = PreferencePair("p", torch.ones(2, 5, 5), torch.zeros(2, 5, 5), "latent", file="mem", row=2)
    reward = SumReward()
    row = evaluate_pairwise(reward, small + [big], batch_size=3, progress=False).row(CLEAN_ROW)
    assert (row.wins, row.losses) == (2, 1)
    assert sorted(c.latents.shape[0] for c in reward.calls) == [1, 1, 2, 2]


def test_markdown_and_json_content(tmp_path):
    report = evaluate_pairwise(SumReward(), constructed_set(), levels=[0.5], progress=False, name="sum",
                               data_name="constructed")
    md = report.to_markdown()
    assert "# Pairwise accuracy: `sum` on `constructed`" in md
    assert "| reward | 10 | 6 | 2 | 2 | 60.00 | [31.27, 83.18] | 70.00 | 75.00 |" in md
    assert "| u=0.50 | 10 |" in md and "ties count as wrong" in md and "label ties skipped: 1" in md
    json_path, md_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert md_path.read_text() == md
    assert data["results"][0]["wins"] == 6 and data["results"][0]["accuracy"] == pytest.approx(0.6)
    assert data["results"][1]["setting"] == "u=0.50" and data["skipped_label_ties"] == 1
    assert data["ci"] == "wilson" and "ties count as wrong" in data["convention"]


def test_cli_builds_a_registered_reward_with_args_and_writes_reports(tmp_path, capsys):
    rewards.register("test-eval-sum")(SumReward)
    records = [{"prompt": "p", "chosen": torch.full(SHAPE, float(c)).tolist(),
                "rejected": torch.full(SHAPE, float(r)).tolist()} for c, r in [(1, 0), (0, 1), (2, 0), (3, 3)]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    rc = main(["--reward", "test-eval-sum", "--args", "scale=-1.0", "--data", str(data), "--levels", "0.2,0.6",
               "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    result = json.loads((out / "eval_reward.json").read_text())
    clean = result["results"][0]
    assert (clean["setting"], clean["wins"], clean["ties"], clean["losses"]) == ("reward", 1, 1, 2)  # scale flips
    assert [r["setting"] for r in result["results"]] == ["reward", "u=0.20", "u=0.60"]
    assert result["reward_args"] == {"scale": "-1.0"}
    assert "| reward | 4 | 1 | 1 | 2 | 25.00 |" in capsys.readouterr().out
    assert main(["--reward", "no-such-reward", "--data", str(data), "--no-progress"]) == 2
    assert "unknown reward 'no-such-reward'; known: " in capsys.readouterr().err
    # argument values are checked before the data or any weight loads
    assert main(["--reward", "dina-lrm", "--args", "pretrained=x", "u=abc", "--data", "no-such-file"]) == 2
    assert "--reward dina-lrm --args: args.u: reward 'dina-lrm': expected a number" in capsys.readouterr().err
    # a pkg:// path resolves as in recipes: the error names the file inside the package
    assert main(["--reward", "latent-direction", "--data", "pkg://rlkit/no-such.parquet", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rlkit/no-such.parquet" in err and "pkg://" not in err, err


def test_two_ranks_each_score_every_other_batch_and_get_the_report_of_one_process(run_as_ranks):
    from rlkit.evaluate import Shard

    class Nonlinear(SumReward):  # margins that depend on the noise, the seeds and the batch layout
        def forward(self, batch):
            self.calls.append(batch)
            scores = batch.latents.flatten(1).pow(3).sum(1) * (1 + (0 if batch.sigmas is None else batch.sigmas))
            return RewardOutput(scores=scores + 0.05 * torch.randn(scores.shape, generator=batch.generator))

    # 21 pairs (a data tie is skipped) in 6 batches of 4: batches 0, 2, 4 on rank 0, batches 1, 3, 5 on rank 1
    pairs = [latent_pair(0.2 + 0.01 * i, 0.25 - 0.005 * i, row=i) for i in range(21)]
    pairs.insert(5, latent_pair(0.3, 0.1, row=99, label=0.5))
    options = dict(levels=[0.4, 0.9], batch_size=4, seed=3, progress=False)
    one = evaluate_pairwise(Nonlinear(), pairs, **options)

    def rank_run(rank, gather):
        reward = Nonlinear()
        report = evaluate_pairwise(reward, pairs, shard=Shard(rank, 2, gather), **options)
        return report, sum(call.latents.shape[0] for call in reward.calls) // 2 // 3  # pairs: sides, settings

    results = run_as_ranks(2, rank_run)
    assert {rank: scored for rank, (_, scored) in results.items()} == {0: 12, 1: 9}  # 0-3, 8-11, 16-19; the rest
    for report, _ in results.values():
        assert [(r.setting, r.wins, r.ties, r.losses) for r in report.results] == [
            (r.setting, r.wins, r.ties, r.losses) for r in one.results]
        for mine, theirs in zip(report.results, one.results):
            assert mine.mean_margin == pytest.approx(theirs.mean_margin, rel=1e-6)
    assert one.row(CLEAN_ROW).losses == 4  # pairs 0-3 hold the larger latent on the rejected side
    assert len({r.mean_margin for r in one.results}) == 3  # the rows' noise moves every margin
