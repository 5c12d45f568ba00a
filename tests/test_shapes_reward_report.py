"""The reward report's shortcut check: within-prompt rank correlations with utility, blob area and high-frequency
energy."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from rewards.base import Reward, RewardInput, RewardOutput
from rlkit.shapes import reward_report
from rlkit.shapes.judges import high_frequency_energy, read_scenes, utility_of


@pytest.mark.parametrize("x, y", [
    ([3.0, 1.0, 2.0, 5.0, 4.0], [30.0, 10.0, 25.0, 40.0, 41.0]),
    ([1.0, 1.0, 2.0, 2.0, 3.0, 0.5], [4.0, 2.0, 2.0, 7.0, 1.0, 1.0]),  # ties on both sides
    (torch.randn(40, generator=torch.Generator().manual_seed(0)).tolist(),
     torch.randn(40, generator=torch.Generator().manual_seed(1)).tolist()),
])
def test_rank_correlation_equals_scipys_spearman(x, y):
    expected = spearmanr(x, y).statistic
    assert reward_report.rank_correlation(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, abs=1e-9)


def test_rank_correlation_is_nan_for_a_constant_side():
    assert math.isnan(reward_report.rank_correlation(torch.ones(5), torch.arange(5.0)))


class _AreaReward(Reward):
    """Scores the area of the blob the golden judge reads in the decoded picture: a pure size detector."""

    space = "pixel"
    noise_aware = False
    differentiable = False

    def forward(self, batch: RewardInput) -> RewardOutput:
        return RewardOutput(scores=read_scenes(batch.pixels(), batch.prompts).area)


class _EnergyReward(_AreaReward):
    """Scores the decoded picture's high-frequency energy: a pure sharpness (or dither) detector."""

    def forward(self, batch: RewardInput) -> RewardOutput:
        return RewardOutput(scores=high_frequency_energy(batch.pixels()))


def test_shortcut_check_separates_size_and_sharpness_detectors_from_the_annotators():
    import rewards
    from rlkit.shapes.pretrain import load_generator

    generator = load_generator()
    dina = rewards.build("dina-lrm", pretrained=str(reward_report.ASSETS_DIR / "dina_lrm"),
                         base_model=str(reward_report.ASSETS_DIR / "generator"))
    detectors = {"size": _AreaReward(), "sharpness": _EnergyReward(), "dina-lrm": dina}
    rows = reward_report.shortcut_rows(generator, detectors, num_samples=24, seed=2, levels=(0.1, 0.7), group_size=12)
    by_setting = {(r.reward, r.setting): r for r in rows}
    assert list(by_setting) == [("annotators", "utility"), ("size", "clean"), ("sharpness", "clean"),
                                ("dina-lrm", "u=0.10"), ("dina-lrm", "u=0.70")]
    annotators, size = by_setting["annotators", "utility"], by_setting["size", "clean"]
    sharpness = by_setting["sharpness", "clean"]
    assert annotators.groups == 2 and annotators.utility == pytest.approx(1.0)
    # each detector follows its own statistic exactly, and far more closely than the annotators' utility does
    assert size.area > 0.9 and size.area > annotators.area + 0.3
    assert sharpness.high_frequency == pytest.approx(1.0) and sharpness.high_frequency > annotators.high_frequency + 0.3
    for row in rows:
        assert all(-1 <= v <= 1 for v in (row.utility, row.area, row.high_frequency))
    # the annotators' row is the mean over groups of the correlations of utility with area and energy, as read
    groups = list(reward_report.sample_groups(generator, 24, 2, group_size=12))
    utilities = [utility_of(g.reading) for g in groups]
    area = sum(reward_report.rank_correlation(u, g.reading.area) for u, g in zip(utilities, groups)) / 2
    energy = sum(reward_report.rank_correlation(u, high_frequency_energy(generator.decode(g.latents)))
                 for u, g in zip(utilities, groups)) / 2
    assert annotators.area == pytest.approx(area) and annotators.high_frequency == pytest.approx(energy)
    markdown = reward_report.shortcut_markdown(rows)
    assert "| dina-lrm | u=0.70 | 2 |" in markdown and "with high-frequency energy" in markdown


def test_cli_prints_both_tables_and_writes_the_shortcut_check_to_json(tmp_path, capsys):
    import json

    out = tmp_path / "rewards.json"
    plot = tmp_path / "accuracy.png"
    assert reward_report.main(["--limit", "8", "--shortcut-samples", "8", "--json", str(out), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| annotators | second labelling |" in printed and "with high-frequency energy" in printed
    result = json.loads(out.read_text())
    assert result["dina-lrm / u=0.10"]["pairs"] == 8
    shortcuts = {(r["reward"], r["setting"]): r for r in result["shortcuts"]}
    assert shortcuts["annotators", "utility"]["groups"] == 1 and ("dina-lrm", "u=0.70") in shortcuts
    assert set(shortcuts["dina-lrm", "u=0.70"]) == {"reward", "setting", "utility", "area", "high_frequency", "groups"}


def test_accuracy_series_split_level_rows_from_the_rest_and_drawn_pairs_from_the_annotators(tmp_path):
    from rlkit.eval_reward import summarize

    def row(setting, margins):
        return summarize(setting, torch.tensor(margins, dtype=torch.float32))

    rows = [("annotators", row("second labelling", [1, 1, -1, 0])),
            ("dina-lrm", row("reward", [1, 1, 1, -1])), ("dina-lrm", row("u=0.10", [1, 1, 1, 1])),
            ("dina-lrm", row("u=0.90", [1, -1, 0, -1])), ("dina-lrm", row("ensemble(0.2,0.5)", [1, 1, -1, -1])),
            ("shapes-clip", row("reward", [1, -1, -1, -1])), ("dina-lrm, drawn", row("u=0.10", [1, 1, 1, -1]))]
    annotated = reward_report.accuracy_series(rows, drawn=False)
    assert list(annotated) == ["annotators", "dina-lrm", "shapes-clip"]
    assert annotated["annotators"].lines == [("second labelling", 0.625)]  # a tie counts as half
    dina = annotated["dina-lrm"]
    assert [level[:2] for level in dina.levels] == [(0.1, 1.0), (0.9, 0.375)]
    assert all(low <= acc <= high for _, acc, low, high in dina.levels)
    assert dina.lines == [("reward", 0.75), ("ensemble(0.2,0.5)", 0.5)]
    drawn = reward_report.accuracy_series(rows, drawn=True)
    assert list(drawn) == ["dina-lrm"] and drawn["dina-lrm"].levels[0][:2] == (0.1, 0.75)
    assert reward_report.plot_accuracy(rows, tmp_path / "a.png").stat().st_size > 10_000


def test_cli_refuses_a_negative_shortcut_sample_count():
    with pytest.raises(SystemExit):
        reward_report.main(["--shortcut-samples", "-1"])
