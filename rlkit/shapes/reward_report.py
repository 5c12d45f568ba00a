"""``rlkit shapes rewards``: how well each reward of the Shapes world agrees with the annotators.

On the held-out preference pairs (other samples and other annotator draws than the training pairs), side
by side in one run:

- the annotators' own consistency: how often a second, independent labelling of the same pairs agrees
  with the first (the ceiling any reward can reach against one noisy labelling);
- the DiNa-LRM as configured (re-noised at its training level), at each noise level (chosen and
  rejected share the noise) and with its test-time noise ensemble;
- optionally a second DiNa-LRM (``--compare``), e.g. one trained with a fixed Thurstone variance
  instead of the noise-calibrated one;
- the pixel-space CLIP reward, which decodes both latents through the VAE;
- the analytic golden judge (all attributes right or not: many ties, so read its "ties as half" column);
- the same rewards on drawn pairs of held-out scenes (``, drawn``: a picture of the prompt against one with
  a wrong shape, colour or position, see :func:`rlkit.shapes.preferences.drawn_pairs`): what each reward
  reads in clean pictures, beside what it reads in the base generator's samples.

Every row comes from :func:`rlkit.eval_reward.evaluate_pairwise`, so the numbers equal those of
``rlkit eval-reward`` for the same seed.

A second table checks each reward for shortcuts to the demo's realism guards (:func:`shortcut_rows`): within
groups of samples of one prompt, how each reward ranks them by the annotators' utility, by the area of the
prompt's blob and by high-frequency energy, beside how the annotators' utility itself ranks them by those two. A
reward that follows blob area more than the annotators do pays a policy for growing its shapes; one that ranks
high-frequency energy lower than they do pays it for softer, lower-contrast pictures. Measured on a sharper Shapes
world (2026-11-29): a DiNa-LRM that ranks it at -0.085 read at u = 0.7 and at -0.046 read at u = 0.1; three
Flow-GRPO-Fast runs (50 updates) with it kept 0.86-0.98x of the base's high-frequency energy at u = 0.7 and
0.92-1.05x at u = 0.1.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlkit.eval_reward import EvalReport, PairwiseResult, evaluate_pairwise, reward_mode
from rlkit.shapes.judges import ASSETS_DIR, high_frequency_energy, utility_of
from rlkit.shapes.preferences import GENERATED_GROUP, SampleGroup, drawn_pairs, sample_groups

LEVELS = (0.1, 0.4, 0.7, 0.9)
ENSEMBLE = (0.2, 0.5, 0.7)
DRAWN_EVAL_PAIRS = 256
DRAWN_EVAL_SEED = 99  # the trainer's drawn pairs use seed 0 and training scenes
SHORTCUT_SAMPLES = 1024  # 32 groups of 32 samples of one prompt for the shortcut check
SHORTCUT_SEED = 9  # other samples than the trainer's generated pairs (seed 0)


def annotator_agreement(path: str | Path, limit: int | None = None) -> PairwiseResult:
    """Agreement of the two labellings stored with each pair (``label`` and ``label_repeat``) as a row."""
    import datasets
    import torch

    from rlkit.eval_reward import summarize

    data = datasets.Dataset.from_parquet(str(path))
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    first, second = torch.tensor(data["label"]), torch.tensor(data["label_repeat"])
    # +1 agree, -1 disagree, 0 when the second labelling calls a tie (counted as half by the report)
    return summarize("second labelling", torch.where(second == 0.5, 0.0, (first == second).float() * 2 - 1))


def reward_rows(folder: str | Path = ASSETS_DIR, pairs_file: str | Path | None = None,
                compare: dict[str, str | Path] | None = None, limit: int | None = None, seed: int = 0,
                progress: bool = True, shortcut_samples: int = 0,
                ) -> tuple[list[tuple[str, PairwiseResult]], list["ShortcutRow"]]:
    """``(reward, row)`` for every reward of a Shapes assets ``folder`` on its held-out pairs, and with
    ``shortcut_samples`` the shortcut check of every reward (:func:`shortcut_rows`; none when 0). The generator and
    the rewards are loaded once for both."""
    import rewards
    from rlkit.data import LoadOptions, load_pairs
    from rlkit.shapes.pretrain import load_generator

    folder = Path(folder)
    pairs_file = Path(pairs_file or folder / "preferences" / "eval.parquet")
    pairs = load_pairs(str(pairs_file), LoadOptions(format="latents", limit=limit,
                                                    columns={"chosen": "latents_a", "rejected": "latents_b"}))
    generator = load_generator(folder / "generator")
    rows: list[tuple[str, PairwiseResult]] = [("annotators", annotator_agreement(pairs_file, limit))]

    def add(name: str, report: EvalReport) -> None:
        rows.extend((name, r) for r in report.results)

    dinas = {name: rewards.build("dina-lrm", pretrained=str(path), base_model=str(folder / "generator"))
             for name, path in {"dina-lrm": folder / "dina_lrm", **(compare or {})}.items()}
    pixel_rewards = {"shapes-clip": rewards.build("shapes-clip", path=str(folder / "clip")),
                     "shapes-golden": rewards.build("shapes-golden")}
    # then drawn pairs of held-out scenes (one attribute wrong): what each reward reads in clean pictures
    drawn = drawn_pairs(generator, min(limit or DRAWN_EVAL_PAIRS, DRAWN_EVAL_PAIRS), DRAWN_EVAL_SEED,
                        split="heldout")
    for suffix, data, ensemble in (("", pairs, ENSEMBLE), (DRAWN_SUFFIX, drawn, ())):
        for name, reward in dinas.items():
            add(name + suffix, evaluate_pairwise(reward, data, levels=LEVELS, ensemble=ensemble, seed=seed,
                                                 progress=progress, name=name))
        for name, reward in pixel_rewards.items():
            add(name + suffix, evaluate_pairwise(reward, data, decode=generator.decode, seed=seed, progress=progress,
                                                 name=name))
    shortcuts = shortcut_rows(generator, {**dinas, **pixel_rewards}, shortcut_samples) if shortcut_samples else []
    return rows, shortcuts


def rank_correlation(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN when either side is constant."""
    def ranks(v: Tensor) -> Tensor:
        v = v.double().flatten()
        position = torch.empty_like(v)
        position[v.argsort()] = torch.arange(len(v), dtype=v.dtype)
        values, inverse = torch.unique(v, return_inverse=True)
        total = torch.zeros(len(values), dtype=v.dtype).index_add_(0, inverse, position)
        count = torch.zeros(len(values), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(v))
        return (total / count)[inverse]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = rx.norm() * ry.norm()
    return float(rx @ ry / denominator) if denominator > 0 else float("nan")


@dataclass
class ShortcutRow:
    reward: str
    setting: str
    utility: float  # mean within-group rank correlation of the scores with the annotators' utility
    area: float  # ... with the area of the prompt's blob (the foreground-area guard's shortcut)
    high_frequency: float  # ... with high-frequency energy (the other guard's)
    groups: int  # groups where every correlation is defined


@torch.no_grad()
def shortcut_rows(generator, rewards: dict, num_samples: int = SHORTCUT_SAMPLES, seed: int = SHORTCUT_SEED,
                  levels: tuple[float, ...] = LEVELS, group_size: int = GENERATED_GROUP) -> list[ShortcutRow]:
    """Within-prompt rank correlations of each reward with the annotators' utility, blob area and high-frequency
    energy.

    ``rewards`` maps names to rewards; a noise-aware latent reward gets one row per noise level (every sample
    noised with its own eps, read as a state at that level), any other reward one row on the decoded pictures.
    The first row is the annotators' own utility: its correlations with area and high-frequency energy are the
    preferences their labels carry. Groups where a side is constant (all samples equally right, say) are left out.
    """
    from rewards.base import MemoDecode, RewardInput

    groups = list(sample_groups(generator, num_samples, seed, group_size))
    utilities = [utility_of(g.reading) for g in groups]
    # one decode per group, shared by the energies and every reward that reads the clean pictures
    decoded = [MemoDecode(generator.decode) for _ in groups]
    energies = [high_frequency_energy(decode(g.latents)).cpu() for decode, g in zip(decoded, groups)]
    eps_rng = torch.Generator().manual_seed(seed)
    eps = [torch.randn(g.latents.shape, generator=eps_rng) for g in groups]

    def row(name: str, setting: str, scores: list[Tensor]) -> ShortcutRow:
        per_group = [(rank_correlation(s, u), rank_correlation(s, g.reading.area), rank_correlation(s, e))
                     for s, u, g, e in zip(scores, utilities, groups, energies)]
        per_group = [c for c in per_group if not any(math.isnan(v) for v in c)]
        mean = [sum(column) / len(per_group) for column in zip(*per_group)] or [math.nan] * 3  # nan: unmeasured
        return ShortcutRow(name, setting, *mean, groups=len(per_group))

    def read(reward, group: SampleGroup, latents: Tensor, sigmas: Tensor | None, decode: MemoDecode) -> Tensor:
        out = reward(RewardInput(prompts=[group.prompt] * len(latents), latents=latents, sigmas=sigmas,
                                 decode=decode, generator=torch.Generator().manual_seed(seed)))
        return out.scores.detach().float().cpu()

    rows = [row("annotators", "utility", utilities)]
    for name, reward in rewards.items():
        reward.eval()
        if not (reward.noise_aware and reward.space == "latent"):
            rows.append(row(name, "clean", [read(reward, g, g.latents, None, decode)
                                            for g, decode in zip(groups, decoded)]))
            continue
        with reward_mode(reward, "state"):
            for u in levels:
                noised = [(1 - u) * g.latents + u * noise for g, noise in zip(groups, eps)]
                rows.append(row(name, f"u={u:.2f}", [read(reward, g, x, torch.full((len(x),), u),
                                                          MemoDecode(generator.decode))
                                                     for g, x in zip(groups, noised)]))
    return rows


def shortcut_markdown(rows: list[ShortcutRow]) -> str:
    lines = ["| reward | setting | groups | rank corr. with utility | with blob area | with high-frequency energy |",
             "|---|---|---:|---:|---:|---:|"]
    def cell(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:+.3f}"

    lines += [f"| {r.reward} | {r.setting} | {r.groups} | "
              f"{cell(r.utility)} | {cell(r.area)} | {cell(r.high_frequency)} |" for r in rows]
    return "\n".join(lines)


def to_markdown(rows: list[tuple[str, PairwiseResult]]) -> str:
    lines = ["| reward | setting | pairs | accuracy | 95% CI | ties as half |", "|---|---|---:|---:|---|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r.setting} | {r.pairs} | {r.accuracy:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
                     f"{r.accuracy_ties_half:.3f} |")
    return "\n".join(lines)


DRAWN_SUFFIX = ", drawn"  # rows on drawn pairs of held-out scenes (see reward_rows)


@dataclass
class AccuracySeries:
    """One reward's rows on one kind of pairs, as :func:`plot_accuracy` draws them (accuracies count ties as half)."""

    levels: list[tuple[float, float, float, float]]  # (noise level u, accuracy, 95% low, 95% high) per level row
    lines: list[tuple[str, float]]  # (setting, accuracy) of every other row: as configured, ensemble, clean


def accuracy_series(rows: list[tuple[str, PairwiseResult]], drawn: bool) -> dict[str, AccuracySeries]:
    """:func:`reward_rows`' rows on the annotators' held-out pairs (``drawn`` False) or on drawn pairs, per reward.

    A level row's interval is the accuracy's, moved with it when ties count as half (so it always holds the point).
    """
    out: dict[str, AccuracySeries] = {}
    for name, r in rows:
        if name.endswith(DRAWN_SUFFIX) != drawn:
            continue
        series = out.setdefault(name.removesuffix(DRAWN_SUFFIX), AccuracySeries([], []))
        acc = r.accuracy_ties_half
        if r.setting.startswith("u="):
            shift = acc - r.accuracy
            series.levels.append((float(r.setting[2:]), acc, r.ci_low + shift, r.ci_high + shift))
        else:
            series.lines.append((r.setting, acc))
    return out


def plot_accuracy(rows: list[tuple[str, PairwiseResult]], path: str | Path) -> Path:
    """``path`` (PNG): :func:`accuracy_series` on the annotators' held-out pairs (left) and on drawn pairs (right).

    Noise-aware rewards are drawn against the noise level ``u`` they read, with 95% intervals; their other rows
    (as configured, dashed; the ensemble, dotted) and every other reward are horizontal lines. The annotators'
    second labelling, the ceiling, is black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    names = list(dict.fromkeys(name.removesuffix(DRAWN_SUFFIX) for name, _ in rows))
    colours = {name: "black" if name == "annotators" else f"C{i % 10}" for i, name in enumerate(names)}
    for ax, drawn in zip(axes, (False, True)):
        for name, series in accuracy_series(rows, drawn).items():
            if series.levels:
                u, acc, low, high = zip(*series.levels)
                err = [[a - lo for a, lo in zip(acc, low)], [hi - a for a, hi in zip(acc, high)]]
                ax.errorbar(u, acc, yerr=err, marker="o", capsize=3, color=colours[name], label=f"{name} (per level)")
            for setting, acc in series.lines:
                style = ":" if setting.startswith("ensemble") else ("--" if series.levels else "-")
                ax.axhline(acc, color=colours[name], linestyle=style, label=f"{name}: {setting}")
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set(title="drawn pairs of held-out scenes (one attribute wrong)" if drawn else
               "held-out pairs of generated samples, the annotators' labels",
               xlabel="noise level u the reward reads", xlim=(0, 1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("pairwise accuracy (ties as half)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_dict(rows: list[tuple[str, PairwiseResult]]) -> dict[str, dict[str, float]]:
    """``{"reward / setting": {"accuracy": ..., "ties_half": ..., "pairs": ...}}`` for a build report."""
    return {f"{name} / {r.setting}": {"accuracy": round(r.accuracy, 4), "ties_half": round(r.accuracy_ties_half, 4),
                                      "pairs": r.pairs} for name, r in rows}


def shortcuts_to_dict(rows: list[ShortcutRow]) -> dict[str, dict[str, float | None]]:
    """``{"shortcuts / reward / setting": {"utility": ..., "area": ..., "high_frequency": ..., "groups": ...}}`` for
    a build report."""
    def value(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)  # null: no group measured it

    return {f"shortcuts / {r.reward} / {r.setting}": {"utility": value(r.utility), "area": value(r.area),
                                                     "high_frequency": value(r.high_frequency), "groups": r.groups}
            for r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkit shapes rewards", description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default=str(ASSETS_DIR), help="a Shapes assets folder (default: shipped)")
    parser.add_argument("--pairs", help="preference pairs (default: FOLDER/preferences/eval.parquet)")
    parser.add_argument("--compare", nargs="*", default=[], metavar="NAME=PATH",
                        help="further DiNa-LRM checkpoints on the same generator, e.g. fixed-variance=runs/x/final")
    parser.add_argument("--limit", type=int, help="first N pairs only")
    parser.add_argument("--shortcut-samples", type=int, default=SHORTCUT_SAMPLES, metavar="N",
                        help=f"base-generator samples for the shortcut check, in groups of one prompt (0: skip; "
                             f"default {SHORTCUT_SAMPLES})")
    parser.add_argument("--json", help="also write the rows here (the shortcut check under 'shortcuts')")
    parser.add_argument("--plot", metavar="PNG", help="also plot every reward's accuracy against the noise level here")
    args = parser.parse_args(argv)
    if args.shortcut_samples < 0:
        parser.error(f"--shortcut-samples must be >= 0, got {args.shortcut_samples}")
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--compare expects NAME=PATH, got {item!r}")
        compare[name] = path
    rows, shortcuts = reward_rows(args.folder, args.pairs, compare, args.limit, shortcut_samples=args.shortcut_samples)
    print(to_markdown(rows))
    result = to_dict(rows)
    if shortcuts:
        print("\nShortcut check (within-prompt groups of base-generator samples):\n" + shortcut_markdown(shortcuts))
        result["shortcuts"] = [asdict(r) for r in shortcuts]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        print(f"plot: {plot_accuracy(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
