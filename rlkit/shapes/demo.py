"""``rlkit demo``: the Shapes proving ground end to end on a CPU.

Runs the shipped recipes ``recipes/refl_shapes.yaml`` and ``recipes/flow_grpo_shapes.yaml`` (ReFL and
Flow-GRPO-Fast with the shipped DiNa-LRM as the reward) through the same trainer code the SD3.5 recipes
use, evaluates held-out prompts with the analytic golden judge before and after, and writes a report
folder: curves (proxy, golden and realism guards against steps and wall time) as PNG, before/after image
grids for the same seeds, and ``summary.md`` with the numbers.

``--quick`` is the shortened run CI uses (minutes); ``--seeds 0 1 2`` repeats each run for mean and spread;
``--pixel-reward`` adds the same runs with the pixel-space CLIP reward (decodes through the VAE);
``--oracle`` adds Flow-GRPO runs trained on the annotators' noiseless utility, the gain a perfect reward model of
the preference set gives the same recipe (the summary states each reward's share of it); ``KEY=VALUE`` arguments
override every run's recipe (``eval.seed=7``: other noise for the held-out samples than the recipes were tuned on).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlkit.confload import shipped_recipe

if TYPE_CHECKING:  # torch and the generator load lazily, so that `rlkit demo --help` starts at once
    from torch import Tensor

    from rlkit.models.sd3 import SD3Generator

GOLDEN = "eval/golden/shapes-golden"
GUARDS = ("foreground_area", "high_frequency")
GUARD_TOLERANCE = 0.20  # a guard outside [0.8, 1.2] of real pictures is off; see RunSummary.hacked
# CI's shortened demo: long enough for the golden score to rise on 108 held-out samples (ReFL 20 steps,
# Flow-GRPO-Fast 20 updates; about 3 minutes on 2 CPU cores together)
QUICK_EVAL = ["eval.num_prompts=54", "eval.images_per_prompt=2", "eval.batch_size=54", "eval.grid_images=9"]
QUICK = {
    "refl": ["refl.max_steps=20", "eval.every=10", *QUICK_EVAL],
    "flow_grpo": ["flow_grpo.max_epochs=10", "eval.every=10", *QUICK_EVAL],
}
PIXEL_REWARD = ["rewards.0.name=shapes-clip", "rewards.0.args={}"]
ORACLE = "utility-oracle"
# The reward arms: per algorithm, the overrides that swap the recipe's DiNa-LRM out. The others read decoded clean
# pictures, so ReFL scores x0_hat instead of the noisy state. The oracle is the annotators' noiseless utility,
# what a perfect reward model of the preference set would return: the gain the same recipe gets when reward
# accuracy is no limit. It is not differentiable, so only Flow-GRPO runs it.
ARMS: dict[str, dict[str, list[str]]] = {
    "dina-lrm": {"refl": [], "flow_grpo": []},
    "pixel-clip": {"refl": [*PIXEL_REWARD, "refl.reward_at=x0_hat"],
                   "flow_grpo": [*PIXEL_REWARD, "flow_grpo.reward_at=final"]},
    ORACLE: {"flow_grpo": ["rewards.0.name=shapes-golden", "rewards.0.args={mode: utility}",
                           "flow_grpo.reward_at=final"]},
}


def off_real(ratio: float) -> bool:
    """A guard's ratio to real pictures outside ``1 +- GUARD_TOLERANCE``."""
    return abs(ratio - 1) > GUARD_TOLERANCE


@dataclass
class RunSummary:
    label: str
    algorithm: str
    seed: int
    run_dir: Path
    golden: list[tuple[int, float, float]] = field(default_factory=list)  # (step, wall s, score)
    golden_se: list[float] = field(default_factory=list)  # standard error of each golden score
    paired_gain_se: float | None = None  # the gain's, paired by slot (rlkit.evaluate.gain_sem), where it was written
    proxy: list[tuple[int, float, float]] = field(default_factory=list)
    # (step, wall s, {guard: value}) at every evaluation; values become ratios to real pictures once reported
    guard_curve: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def guards(self) -> dict[str, float]:
        """The guards at the last evaluation."""
        return self.guard_curve[-1][2] if self.guard_curve else {}

    @property
    def guards_before(self) -> dict[str, float]:
        """The base generator's guards: the first evaluation that measured them."""
        return next((guards for _, _, guards in self.guard_curve if guards), {})

    @property
    def gain(self) -> float:
        return self.golden[-1][2] - self.golden[0][2]

    @property
    def gain_se(self) -> float:
        """Standard error of the gain: paired by slot where both evaluations wrote their scores, else the two
        evaluations taken as independent (conservative: they share prompts and noise)."""
        if self.paired_gain_se is not None:
            return self.paired_gain_se
        if len(self.golden_se) < 2:
            return 0.0
        return math.hypot(self.golden_se[0], self.golden_se[-1])

    @property
    def verdict(self) -> str:
        """``reward hacking``, else ``gain`` / ``loss`` beyond two standard errors, else ``within noise``."""
        if self.hacked:
            return "reward hacking"
        if abs(self.gain) <= 2 * self.gain_se:
            return "within noise"
        return "gain" if self.gain > 0 else "loss"

    def golden_at(self, seconds: float) -> float:
        """The golden score of the last evaluation finished by ``seconds`` of wall time (the first one if none)."""
        done = [score for _, wall, score in self.golden if wall <= seconds]
        return done[-1] if done else self.golden[0][2]

    @property
    def guards_real(self) -> bool:
        """Every guard within ``1 +- GUARD_TOLERANCE`` of real pictures (the strict condition)."""
        return not any(map(off_real, self.guards.values()))

    @property
    def hacked(self) -> bool:
        """A guard is off real pictures after the run, which either took it there from within the band, or moved it
        further off by more than the tolerance.

        A base generator can already be off (blurrier than real pictures, say); a run that keeps it there or
        brings it closer is not hacking its reward, one that pushes it away is.
        """
        for name, after in self.guards.items():
            before = self.guards_before.get(name, 1.0)
            # (a base at 0, blank pictures, is as far off as a guard gets: any move off real pictures drifts)
            moved = abs(after / before - 1) > GUARD_TOLERANCE if before else after != 0
            drifted = moved and abs(after - 1) > abs(before - 1)
            if off_real(after) and (not off_real(before) or drifted):
                return True
        return False


def heldout_pictures(num: int = 256, seed: int = 99) -> Tensor:
    """``num`` real pictures of held-out scenes, drawn with ``seed``: the guards' reference."""
    import numpy as np

    from rlkit.shapes import world

    scenes = world.heldout_scenes()
    rng = np.random.default_rng(seed)
    return world.draw_batch([scenes[i] for i in rng.integers(0, len(scenes), num)], seed=seed)


def guard_values(images: Tensor) -> dict[str, float]:
    """Mean foreground area and high-frequency energy of ``images`` ``(B, 3, H, W)`` in [0, 1]."""
    from rlkit.shapes.judges import foreground_area, high_frequency_energy

    return {"foreground_area": float(foreground_area(images).mean()),
            "high_frequency": float(high_frequency_energy(images).mean())}


def real_guard_values(num: int = 256, seed: int = 99) -> dict[str, float]:
    """Foreground area and high-frequency energy of real held-out pictures (the guards' reference)."""
    return guard_values(heldout_pictures(num, seed))


def reconstruction_guard_values(generator: SD3Generator, num: int = 256, seed: int = 99) -> dict[str, float]:
    """The guards of the same real pictures read back through ``generator``'s VAE (encode, then decode).

    Every sample a policy draws passes through that decoder, so this is about as close to real pictures as a
    policy can be expected to come (its latents are not the encoder's, so its samples may differ by a few percent:
    in one measured world, 0.81x real high-frequency energy against the read-back's 0.78x). A guard the
    reconstructions already fail is the autoencoder's, not the policy's.
    """
    import torch

    pictures = heldout_pictures(num, seed)
    with torch.no_grad():
        return guard_values(generator.decode(generator.encode(pictures)))


DEMO_KEYS = ("seed", "name", "output_dir", "checkpoint.resume")  # set by run_one for each run
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # a recipe override on the command line (a path like runs/a=b is not)


def run_one(algorithm: str, label: str, seed: int, out: Path, extra: list[str], quick: bool) -> RunSummary:
    from rlkit.config import load_recipe
    from rlkit.trainers import run

    overrides = [f"seed={seed}", f"name={label}_s{seed}", f"output_dir={out / 'runs'}", "checkpoint.resume=false",
                 *(QUICK[algorithm] if quick else []), *extra]
    recipe = load_recipe(shipped_recipe(f"{algorithm}_shapes.yaml"), overrides)
    if recipe.run_dir.exists():
        shutil.rmtree(recipe.run_dir)
    start = time.perf_counter()
    run(recipe)
    return read_run(label, algorithm, seed, recipe.run_dir, wall_s=time.perf_counter() - start)


def read_run(label: str, algorithm: str, seed: int, run_dir: Path, wall_s: float) -> RunSummary:
    """A finished run's golden, proxy and guard curves, from its metrics log."""
    from rlkit.evaluate import gain_sem
    from rlkit.runtime.tracking import read_metrics

    summary = RunSummary(label, algorithm, seed, run_dir, wall_s=wall_s)
    for record in read_metrics(run_dir):
        if GOLDEN in record:
            wall = record.get("time/elapsed_s", 0.0)
            summary.golden.append((record["step"], wall, record[GOLDEN]))
            summary.golden_se.append(record.get(f"{GOLDEN}_sem", 0.0))
            proxy = [v for k, v in record.items() if k.startswith("eval/proxy/") and k.count("/") == 2]
            if proxy:
                summary.proxy.append((record["step"], wall, proxy[0]))
            guards = {g: record[f"{GOLDEN}/{g}"] for g in GUARDS if f"{GOLDEN}/{g}" in record}
            summary.guard_curve.append((record["step"], wall, guards))
    if len(summary.golden) > 1:
        summary.paired_gain_se = gain_sem(run_dir, GOLDEN.removeprefix("eval/"), summary.golden[0][0],
                                          summary.golden[-1][0])
    return summary


def curve_panels(runs: list[RunSummary]) -> list[tuple[str, str, dict[str, list[tuple[int, float, float]]]]]:
    """What ``curves.png`` plots: per panel a title, a y label and each run's ``(step, wall s, value)`` points.

    The golden score, the proxy reward and each realism guard (as a ratio to real pictures once
    :func:`write_report` has scaled them); each is drawn against updates and against wall time.
    """
    def name(r: RunSummary) -> str:
        return f"{r.label} s{r.seed}"

    panels = [("golden judge (held-out prompts)", "all attributes correct", {name(r): r.golden for r in runs}),
              ("proxy reward (held-out prompts)", "reward", {name(r): r.proxy for r in runs})]
    for guard in GUARDS:
        panels.append((f"{guard.replace('_', ' ')} / real pictures", "ratio",
                       {name(r): [(step, wall, g[guard]) for step, wall, g in r.guard_curve if guard in g]
                        for r in runs}))
    return panels


def plot_curves(runs: list[RunSummary], path: Path) -> None:
    """``curves.png``: :func:`curve_panels` against updates (left) and wall time (right), a colour per run label
    and a line style per seed; the guards' panels shade the band within ``GUARD_TOLERANCE`` of real pictures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(r.label for r in runs))}
    dashes = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(dict.fromkeys(r.seed for r in runs))}
    panels = curve_panels(runs)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for row, (title, ylabel, series) in zip(axes, panels):
        for r, (name, points) in zip(runs, series.items()):
            if points:
                steps, walls, values = zip(*points)
                style = dict(marker=".", color=colours[r.label], linestyle=dashes[r.seed], label=name)
                row[0].plot(steps, values, **style)
                row[1].plot(walls, values, **style)
        row[0].set(title=title, xlabel="update", ylabel=ylabel)
        row[1].set(title=f"{title} vs wall time", xlabel="seconds", ylabel=ylabel)
        if ylabel == "ratio":
            for ax in row:
                ax.axhspan(1 - GUARD_TOLERANCE, 1 + GUARD_TOLERANCE, color="green", alpha=0.1)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 3)
    legend_height = (0.25 + 0.2 * rows) / fig.get_figheight()  # inches of legend as a fraction of the figure
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(runs: list[RunSummary], real: dict[str, float], out: Path,
                 reconstruction: dict[str, float] | None = None) -> Path:
    """Writes ``summary.md``, ``summary.json``, ``curves.png`` and the grids; ``real`` and ``reconstruction``
    are :func:`real_guard_values` and :func:`reconstruction_guard_values`. The runs' guard curves become ratios to
    ``real`` in place, so call it once per set of runs."""
    for r in runs:
        r.guard_curve = [(step, wall, {g: v / real[g] for g, v in guards.items()})
                         for step, wall, guards in r.guard_curve]
    plot_curves(runs, out / "curves.png")
    grids: dict[str, tuple[str, str]] = {}  # run label -> its first seed's before / after grid files
    for r in runs:
        samples = sorted((r.run_dir / "samples").glob("step_*.png"))
        if samples:
            before, after = f"{r.label}_s{r.seed}_before.png", f"{r.label}_s{r.seed}_after.png"
            shutil.copy(samples[0], out / before)
            shutil.copy(samples[-1], out / after)
            grids.setdefault(r.label, (before, after))
    lines = ["# rlkit demo: the Shapes proving ground", "",
             "Golden judge: fraction of held-out samples with colour, shape and position all correct "
             "(analytic, not learned). Guards: foreground area and high-frequency energy of the samples "
             f"over those of real pictures (base generator -> after the run). Outside 1 ± {GUARD_TOLERANCE} a guard "
             "is off; a run that takes a guard off, or pushes an off one further from real pictures by more than "
             "that, is reported as reward hacking. `guards real` says whether both end within the band.", "",
             "`golden @ equal time`: each algorithm's runs compared at the wall time of its shortest run "
             "(the last evaluation finished by then), so a reward that decodes through the VAE pays for it. "
             "`gain ± 2 SE`: the standard error of the mean of the per-sample differences (both evaluations draw "
             "the same prompts from the same noise); a gain within it is reported as noise.", "",
             "| run | seed | golden before | golden after | gain ± 2 SE | golden @ equal time | proxy before | "
             "proxy after | fg area | high freq | guards real | wall s | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    equal_time = {r.algorithm: min(q.golden[-1][1] for q in runs if q.algorithm == r.algorithm) for r in runs}
    for r in runs:
        proxy = (f"{r.proxy[0][2]:.3f} | {r.proxy[-1][2]:.3f}" if r.proxy else "- | -")
        guards = " | ".join(f"{r.guards_before.get(g, float('nan')):.2f} -> {r.guards.get(g, float('nan')):.2f}"
                            for g in GUARDS)
        equal = equal_time[r.algorithm]
        lines.append(f"| {r.label} | {r.seed} | {r.golden[0][2]:.3f} | {r.golden[-1][2]:.3f} | "
                     f"{r.gain:+.3f} ± {2 * r.gain_se:.3f} | {r.golden_at(equal):.3f} ({equal:.0f} s) | {proxy} | "
                     f"{guards} | {'yes' if r.guards_real else 'no'} | {r.wall_s:.0f} | {r.verdict} |")
    base_off = sorted({f"{g} {v:.2f}" for r in runs for g, v in r.guards_before.items() if off_real(v)})
    if base_off:
        lines += ["", f"Off real pictures before any training (the base generator): {', '.join(base_off)}. A run "
                  "that leaves such a guard where it was ends with `guards real` no; the verdict calls it hacking "
                  "only when the run pushes that guard further off."]
    if reconstruction is not None:
        read_back = ", ".join(f"{g} {reconstruction[g] / real[g]:.2f}" for g in GUARDS)
        lines += ["", f"Real held-out pictures read back through the generator's own VAE (encode, decode): {read_back} "
                  "of real pictures. Every sample passes through that decoder, so this is about as close to real "
                  "pictures as a policy can be expected to come; a guard off here is the autoencoder's, not the run's."]
    by_label: dict[str, list[float]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r.gain)
    algorithm_of = {r.label: r.algorithm for r in runs}
    means = {label: statistics.mean(gains) for label, gains in by_label.items()}
    lines += ["", "| run | mean gain | spread (std) | seeds | share of the oracle's gain |", "|---|---|---|---|---|"]
    for label, gains in by_label.items():
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        oracle = means.get(f"{algorithm_of[label]}+{ORACLE}")
        shown = oracle is not None and oracle > 0 and not label.endswith(f"+{ORACLE}")
        share = f"{means[label] / oracle:.0%}" if shown else "-"
        lines.append(f"| {label} | {means[label]:+.3f} | {spread:.3f} | {len(gains)} | {share} |")
    if any(label.endswith(f"+{ORACLE}") for label in means):
        lines += ["", f"`{ORACLE}`: the same recipe trained on the annotators' noiseless utility, which a perfect "
                  "reward model of the preference set would return, so reward accuracy sets no limit there (a share "
                  "is shown where the oracle gained)."]
    lines += ["", "![curves](curves.png)", ""]
    if grids:
        lines += ["## Held-out samples before and after (the same prompts and noise)", "",
                  "| run | before | after |", "|---|---|---|"]
        lines += [f"| {label} | ![before]({before}) | ![after]({after}) |" for label, (before, after) in grids.items()]
        lines += ["", "Every seed's grids are beside this file (`<run>_s<seed>_before.png`, `..._after.png`).", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps([
        {"label": r.label, "algorithm": r.algorithm, "seed": r.seed, "golden": r.golden, "proxy": r.proxy,
         "guards": r.guards, "guards_before": r.guards_before, "guard_curve": r.guard_curve,
         "guards_real": r.guards_real, "wall_s": r.wall_s, "gain": r.gain, "gain_se": r.gain_se,
         "gain_se_paired": r.paired_gain_se is not None, "golden_se": r.golden_se, "verdict": r.verdict,
         "hacked": r.hacked, "golden_at_equal_time": r.golden_at(equal_time[r.algorithm]),
         "equal_time_s": equal_time[r.algorithm]} for r in runs], indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkit demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shortened runs (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--algorithms", nargs="+", default=["refl", "flow_grpo"], choices=["refl", "flow_grpo"])
    parser.add_argument("--pixel-reward", action="store_true", help="also train with the pixel CLIP reward")
    parser.add_argument("--oracle", action="store_true",
                        help="also run Flow-GRPO on the annotators' noiseless utility (a perfect reward model)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides for every run, anywhere on the line (e.g. eval.seed=7: other noise for "
                             f"the held-out samples than the recipes were tuned on); not of {', '.join(DEMO_KEYS)}, "
                             "which the demo sets itself")
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if OVERRIDE.match(a)]  # taken out first: --seeds 0 1 would swallow them
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = overrides
    owned = sorted({o.split("=", 1)[0] for o in overrides} & set(DEMO_KEYS))
    if owned:
        print(f"rlkit demo: {', '.join(owned)} cannot be overridden: the demo sets {', '.join(DEMO_KEYS)} for each run "
              "(choose seeds with --seeds and the report folder with --out)")
        return 2

    from rlkit.shapes.judges import ASSETS_DIR

    missing = [name for name in ("generator", "dina_lrm") if not (ASSETS_DIR / name).is_dir()]
    if missing:
        print(f"rlkit demo: the shipped Shapes checkpoints {missing} are missing from {ASSETS_DIR}; "
              f"rebuild them with `rlkit shapes build {ASSETS_DIR}`")
        return 2
    from rlkit.config import ConfigError, load_recipe

    try:  # a wrong override fails here, before any run
        for algorithm in args.algorithms:
            load_recipe(shipped_recipe(f"{algorithm}_shapes.yaml"), args.overrides)
    except ConfigError as exc:
        print(f"rlkit demo: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    arms = ["dina-lrm"] + (["pixel-clip"] if args.pixel_reward else []) + ([ORACLE] if args.oracle else [])
    print(f"rlkit demo: {', '.join(args.algorithms)} with {', '.join(arms)} on the Shapes "
          f"generator, seeds {args.seeds}{' (quick)' if args.quick else ''}; report in {args.out}", flush=True)
    runs = []
    for algorithm in args.algorithms:
        for arm in arms:
            extra = ARMS[arm].get(algorithm)
            if extra is None:
                print(f"== {algorithm}+{arm}: skipped, the {arm} reward is not differentiable", flush=True)
                continue
            extra = [*extra, *args.overrides]
            for seed in args.seeds:
                label = f"{algorithm}+{arm}"
                print(f"== {label}, seed {seed}", flush=True)
                r = run_one(algorithm, label, seed, args.out, extra, args.quick)
                print(f"   golden {r.golden[0][2]:.3f} -> {r.golden[-1][2]:.3f} ({r.gain:+.3f}) in {r.wall_s:.0f} s",
                      flush=True)
                runs.append(r)
    from rlkit.shapes.pretrain import load_generator

    reconstruction = reconstruction_guard_values(load_generator(ASSETS_DIR / "generator"))
    summary = write_report(runs, real_guard_values(), args.out, reconstruction)
    print(summary.read_text())
    print(f"report: {summary} (curves.png, before/after grids beside it)")
    return 0
