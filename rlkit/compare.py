"""``rlkit compare RUN_DIR ...``: one table and one plot for a set of runs (a sweep folder expands to its runs).

Per run: the proxy reward's gain and every golden reward's gain on the held-out prompts (last evaluation
minus the first, which is the untrained model), wall time, peak memory, the reward calls of training, and
the reward-hacking flag. Runs are grouped by what varied between their recipes; where a group holds several runs
(seeds), a second table gives each group's mean gains and their standard deviation over its runs. The plot shows
proxy and golden curves against steps and against wall time, per group (mean line, shaded min-max over seeds).

Reward hacking is flagged when, after a golden reward's best evaluation, the proxy kept rising while that
golden reward fell: ``proxy(last) > proxy(at golden best) + tol`` and ``golden(last) < golden(best) - tol'``
with ``tol' = max(tol, 2 se(last - best))``: a fall two standard errors of the difference deep, as the demo counts a
gain, so that evaluation noise (and picking the best of several noisy evaluations) is not called hacking. The error
is paired by slot where both evaluations wrote their per-slot scores (:func:`rlkit.evaluate.gain_sem`), else
``sqrt(se(best)^2 + se(last)^2)`` from the logged standard errors of the two means; 0 where either is missing.
The table gives each golden gain's paired standard error (``golden_gain_sem``) where it can, and ``per_prompt.csv``
each run's golden score per held-out prompt at the first and last evaluation.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlkit.config import ALGORITHMS
from rlkit.confload import flatten
from rlkit.evaluate import Scores, paired_scores, paired_sem, read_scores
from rlkit.runtime.tracking import read_metrics

METRICS_FILE = "metrics.jsonl"
DONE_FILE = "DONE.json"  # written by rlkit.sweep when a run finished
PROXY_PREFIX = "eval/proxy/"
GOLDEN_PREFIX = "eval/golden/"
ELAPSED_KEY = "time/elapsed_s"
TRAIN_ELAPSED_KEY = "train/time/elapsed_s"
UPDATE_TIME_KEY = "train/time/update_s"
PEAK_MEMORY_KEYS = ("memory/peak_bytes", "train/memory/peak_bytes")  # if a trainer logs it
IGNORED_RECIPE_KEYS = ("name", "output_dir", "seed")  # never "what varied" (seeds are the spread)
DEFAULT_HACK_TOLERANCE = 0.0
BYTES_PER_MIB = 2**20
SEM_SUFFIX = "_sem"  # the evaluator's standard error of a golden mean, shown next to the gain


@dataclass
class Curve:
    steps: list[int]
    values: list[float]
    elapsed: list[float]
    sem: list[float] = field(default_factory=list)  # the standard error of each value, NaN where not logged

    @property
    def gain(self) -> float:
        return self.values[-1] - self.values[0] if self.values else float("nan")


@dataclass
class RunSummary:
    name: str
    path: Path
    group: str
    seed: int | None
    proxy: dict[str, Curve]
    golden: dict[str, Curve]
    wall_s: float | None
    peak_memory_bytes: int | None
    reward_images: int | None
    update_s: float | None
    # each golden gain's standard error, paired by slot (rlkit.evaluate.gain_sem), where the evaluations wrote scores
    gain_sem: dict[str, float] = field(default_factory=dict)
    # the per-sample scores of the evaluation after a step (None where not written), read once each
    scores: Callable[[int], Scores | None] = field(default=lambda step: None, repr=False)
    hacking: list[str] = field(default_factory=list)  # golden names that fell while the proxy rose

    @property
    def golden_sem(self) -> dict[str, float]:
        """Each golden reward's standard error at the last evaluation, where the evaluator logged it."""
        return {name: c.sem[-1] for name, c in self.golden.items() if c.sem and math.isfinite(c.sem[-1])}

    @property
    def proxy_curve(self) -> Curve | None:
        """The training reward's curve (the first proxy; a run's proxies are its training rewards)."""
        return next(iter(self.proxy.values()), None)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run": self.name, "group": self.group, "seed": self.seed,
                               "proxy": ",".join(self.proxy), "proxy_gain": self.proxy_curve.gain
                               if self.proxy_curve else None}
        for name, c in self.golden.items():
            out[f"golden_gain/{name}"] = c.gain
            if name in self.gain_sem:
                out[f"golden_gain_sem/{name}"] = self.gain_sem[name]
            if name in self.golden_sem:
                out[f"golden_sem/{name}"] = self.golden_sem[name]
        out["wall_s"] = self.wall_s
        out["peak_mem_mib"] = None if self.peak_memory_bytes is None else self.peak_memory_bytes / BYTES_PER_MIB
        out["reward_images"] = self.reward_images
        out["update_s"] = self.update_s
        out["hacking"] = ",".join(self.hacking) if self.hacking else ""
        return out


def _is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file()


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders as given; a folder without metrics (a sweep folder) stands for its run sub-folders."""
    out = []
    for p in map(Path, paths):
        if _is_run_dir(p):
            out.append(p)
            continue
        runs = sorted(c for c in p.iterdir() if c.is_dir() and _is_run_dir(c)) if p.is_dir() else []
        if not runs:
            raise ValueError(f"{p}: not a run folder (no {METRICS_FILE}) nor a folder of run folders"
                             + ("" if p.exists() else "; it does not exist"))
        out += runs
    return out


def _read_recipe(run: Path) -> dict:
    path = run / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if recipe is not None and not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a recipe mapping, got {type(recipe).__name__}")
    return recipe or {}


def curves(rows: list[dict], prefix: str) -> dict[str, Curve]:
    """Evaluation curves of every ``<prefix><name>`` key (sub-keys such as ``/raw`` are left out)."""
    out: dict[str, Curve] = {}
    for row in rows:
        for key, value in row.items():
            name = key[len(prefix):]
            if (not key.startswith(prefix) or "/" in name or name.endswith(SEM_SUFFIX)
                    or not isinstance(value, (int, float))):
                continue
            c = out.setdefault(name, Curve([], [], [], []))
            sem = float(row.get(key + SEM_SUFFIX, math.nan))
            if c.steps and c.steps[-1] == row["step"]:  # a resumed run may evaluate the same step twice
                c.values[-1], c.elapsed[-1] = float(value), float(row.get(ELAPSED_KEY, c.elapsed[-1]))
                c.sem[-1] = sem
                continue
            c.steps.append(int(row["step"]))
            c.values.append(float(value))
            c.elapsed.append(float(row.get(ELAPSED_KEY, math.nan)))
            c.sem.append(sem)
    return out


PairedSem = Callable[[str, int, int], float | None]  # (golden name, first step, last step) -> paired error


def golden_paired_sem(scores: Callable[[int], Scores | None]) -> PairedSem:
    """A run's golden gains' standard errors paired by slot (:func:`rlkit.evaluate.paired_sem`), from ``scores``
    (the run's per-sample scores of an evaluation step)."""
    return lambda name, first, last: paired_sem(scores(first), scores(last), f"golden/{name}")


def fall_noise(golden: Curve, best: int, paired_se: float | None = None) -> float:
    """Two standard errors of the difference between the golden value at ``best`` and the last one: ``paired_se``
    where given, else the logged errors of the two means taken as independent (0 where either was not logged)."""
    if paired_se is not None:
        return 2.0 * paired_se
    if len(golden.sem) != len(golden.values):
        return 0.0
    errors = golden.sem[best], golden.sem[-1]
    return 2.0 * math.hypot(*errors) if all(map(math.isfinite, errors)) else 0.0


def hacked_goldens(proxy: Curve | None, golden: dict[str, Curve], tol: float = DEFAULT_HACK_TOLERANCE,
                   paired: PairedSem | None = None) -> list[str]:
    """Golden rewards that fell from their best while the proxy kept rising after that point; a fall within
    evaluation noise (:func:`fall_noise`, paired by slot where ``paired`` knows the error) does not count."""
    if proxy is None or len(proxy.values) < 2:
        return []
    at_step = dict(zip(proxy.steps, proxy.values))
    out = []
    for name, g in golden.items():
        if len(g.values) < 2:
            continue
        best = max(range(len(g.values)), key=g.values.__getitem__)
        base = at_step.get(g.steps[best])
        if base is None:
            continue
        paired_se = paired(name, g.steps[best], g.steps[-1]) if paired is not None else None
        fall_tol = max(tol, fall_noise(g, best, paired_se))
        if proxy.values[-1] > base + tol and g.values[-1] < g.values[best] - fall_tol:
            out.append(name)
    return out


def own_keys(keys: list[str], algorithm: str | None) -> list[str]:
    """``keys`` without the sections of the algorithms a run does not run (a ReFL run's ``flow_grpo.*`` defaults
    differ from a Flow-GRPO run's settings, but say nothing about the ReFL run)."""
    others = tuple(f"{a}." for a in ALGORITHMS if a != algorithm)
    return [k for k in keys if not k.startswith(others)]


def varied_keys(recipes: list[dict]) -> list[str]:
    """Recipe keys whose values differ between runs (name, output folder and seed left out)."""
    flat = [flatten(r) for r in recipes]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k not in IGNORED_RECIPE_KEYS and len({repr(f.get(k)) for f in flat}) > 1]


def _reward_images(recipe: dict, steps: int) -> int | None:
    """Images the training reward scored: the trainer's batch per update times updates times processes."""
    procs = int(recipe.get("launch", {}).get("num_processes", 1) or 1)
    algo = recipe.get("algorithm")
    if algo == "refl":
        refl = recipe.get("refl", {})
        return steps * int(refl.get("batch_size", 1)) * int(refl.get("grad_accum", 1) or 1) * procs
    if algo == "flow_grpo":
        g = recipe.get("flow_grpo", {})
        per = int(g.get("prompts_per_epoch", 0) or 0) * int(g.get("group_size", 0) or 0)
        updates = max(int(g.get("updates_per_epoch", 1) or 1) * int(g.get("inner_epochs", 1) or 1), 1)
        epochs = math.ceil(steps / updates)  # a partial last epoch scored its rollouts too
        return epochs * per if per else None
    return None


def _read_done(run_dir: Path) -> dict:
    """The sweep's DONE marker; a cluster script's empty one (``touch``) carries no numbers."""
    try:
        done = json.loads((run_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}


def summarize(run_dirs: list[Path], tol: float = DEFAULT_HACK_TOLERANCE) -> list[RunSummary]:
    recipes = [_read_recipe(d) for d in run_dirs]
    varied = varied_keys(recipes)
    out, settings = [], []
    for d, recipe in zip(run_dirs, recipes):
        rows = read_metrics(d)
        done = _read_done(d)
        flat = flatten(recipe)
        labels = {k: v for k, v in done.get("labels", {}).items() if k != "seed"}
        setting = ", ".join(f"{k}={flat.get(k)}" for k in own_keys(varied, recipe.get("algorithm"))) or "all"
        settings.append((setting, ", ".join(labels.values()) if labels else None))
        proxy, golden = curves(rows, PROXY_PREFIX), curves(rows, GOLDEN_PREFIX)
        steps = [int(r["step"]) for r in rows if "step" in r]  # the last update's row (train rows may skip it)
        elapsed = [r[k] for r in rows for k in (ELAPSED_KEY, TRAIN_ELAPSED_KEY) if k in r]
        peak = done.get("peak_rss_bytes")
        for r in rows:
            for k in PEAK_MEMORY_KEYS:
                if k in r:
                    peak = max(peak or 0, int(r[k]))
        updates = [r[UPDATE_TIME_KEY] for r in rows if UPDATE_TIME_KEY in r]
        first_proxy = next(iter(proxy.values()), None)
        scores = functools.cache(functools.partial(read_scores, d))
        paired = golden_paired_sem(scores)
        # the sweep's measurement of its last launch, or the run's own clock where it went on across resumes
        wall = [w for w in (done.get("wall_s"), max(elapsed) if elapsed else None) if w is not None]
        out.append(RunSummary(
            name=d.name, path=d, group="", seed=recipe.get("seed"), proxy=proxy, golden=golden,
            wall_s=max(wall) if wall else None, peak_memory_bytes=peak,
            reward_images=_reward_images(recipe, max(steps) if steps else 0),
            update_s=sum(updates) / len(updates) if updates else None,
            gain_sem={name: se for name, c in golden.items()
                      if len(c.steps) > 1 and (se := paired(name, c.steps[0], c.steps[-1])) is not None},
            scores=scores, hacking=hacked_goldens(first_proxy, golden, tol, paired)))
    names = group_names(settings)
    for summary, (setting, _) in zip(out, settings):
        summary.group = names[setting]
    return out


def group_names(settings: list[tuple[str, str | None]]) -> dict[str, str]:
    """The name of each group of runs, a group being the runs of one setting (what varied between the recipes,
    seed aside): the sweep labels of its runs where they name it alone, else the setting. Runs of two sweeps that
    share a label but not a setting stay apart; a finished and an unfinished run of one setting stay together."""
    labels_of: dict[str, set[str]] = {}
    settings_of: dict[str, set[str]] = {}
    for setting, label in settings:
        labels_of.setdefault(setting, set())
        if label is not None:
            labels_of[setting].add(label)
            settings_of.setdefault(label, set()).add(setting)
    names = {}
    for setting, labels in labels_of.items():
        label = next(iter(labels)) if len(labels) == 1 else None
        names[setting] = label if label is not None and settings_of[label] == {setting} else setting
    return names


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return str(value)


def group_rows(summaries: list[RunSummary]) -> list[dict[str, Any]]:
    """One row per group of runs (what varied, seeds pooled): how many runs, and the mean and standard deviation
    over them of the proxy's gain and of every golden gain; how many runs were flagged as hacking."""
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for s in summaries:
        groups[s.group].append(s)
    out = []
    for group, runs in groups.items():
        row: dict[str, Any] = {"group": group, "runs": len(runs)}
        gains = {"proxy_gain": [r.proxy_curve.gain for r in runs if r.proxy_curve]}
        for name in dict.fromkeys(n for r in runs for n in r.golden):
            gains[f"golden_gain/{name}"] = [r.golden[name].gain for r in runs if name in r.golden]
        for key, values in gains.items():
            values = [v for v in values if math.isfinite(v)]
            row[key] = sum(values) / len(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["hacking"] = sum(bool(r.hacking) for r in runs)
        out.append(row)
    return out


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    return columns


def _cells(row: dict[str, Any], columns: list[str]) -> list[str]:
    """A table row's cells; gains signed, their errors and spreads not."""
    return [_fmt(row.get(c), signed="gain" in c and SEM_SUFFIX not in c and not c.endswith("_std")) for c in columns]


def _markdown_table(columns: list[str], cells: list[list[str]]) -> list[str]:
    def line(items: list[str]) -> str:
        return "| " + " | ".join(items) + " |"

    return [line(columns), "|" + "---|" * len(columns), *map(line, cells)]


def write_table(summaries: list[RunSummary], out_dir: Path) -> tuple[Path, Path]:
    rows = [s.row() for s in summaries]
    columns = _columns(rows)
    csv_path, md_path = out_dir / "compare.csv", out_dir / "compare.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    cells = []
    for r in rows:
        cells.append(_cells(r, columns))
        if "hacking" in columns:
            cells[-1][columns.index("hacking")] = f"**HACKING** ({r['hacking']})" if r.get("hacking") else "no"
    lines = _markdown_table(columns, cells)
    hacked = [s.name for s in summaries if s.hacking]
    groups = group_rows(summaries)
    if len(groups) < len(summaries):  # some group holds several runs (seeds)
        group_columns = _columns(groups)
        lines += ["", "By group: the mean over its runs, and their standard deviation (`_std`); `hacking` counts the "
                  "flagged runs.", "", *_markdown_table(group_columns, [_cells(g, group_columns) for g in groups])]
    lines += ["", "Gains: last held-out evaluation minus the first (the untrained policy). wall_s and peak_mem_mib "
              "come from the sweep's DONE marker (peak RSS sampled while the run ran) or the metrics; "
              "reward_images = images the training reward scored. golden_gain_sem: the gain's standard error, "
              "paired by slot (both evaluations score the same prompts from the same noise); golden_sem: the last "
              "evaluation's mean's.",
              f"Reward hacking (proxy rose after a golden reward's best while it fell): "
              f"{', '.join(hacked) if hacked else 'none'}."]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _group_mean(curves_: list[Curve], x: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over runs at each step they share; x is the step or the mean elapsed time."""
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for c in curves_:
        for s, v, t in zip(c.steps, c.values, c.elapsed):
            by_step[s].append((v, t))
    steps = sorted(s for s, vs in by_step.items() if len(vs) == len(curves_))
    xs, mean, lo, hi = [], [], [], []
    for s in steps:
        vs = [v for v, _ in by_step[s]]
        xs.append(float(s) if x == "step" else sum(t for _, t in by_step[s]) / len(vs))
        mean.append(sum(vs) / len(vs))
        lo.append(min(vs))
        hi.append(max(vs))
    return xs, mean, lo, hi


def write_plot(summaries: list[RunSummary], out_path: Path) -> Path:
    """Each metric against steps and against wall time, one colour per group; the legend, which names what
    varied and can be long, sits below the panels."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("proxy", "training reward")] if any(s.proxy for s in summaries) else []
    metrics += [("golden", n) for n in dict.fromkeys(n for s in summaries for n in s.golden)]
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for s in summaries:
        groups[s.group].append(s)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    legend: dict[str, Any] = {}
    fig, axes = plt.subplots(max(len(metrics), 1), 2, figsize=(11, 3.2 * max(len(metrics), 1)), squeeze=False)
    for row, (kind, name) in enumerate(metrics):
        for col, x in enumerate(("step", "wall")):
            ax = axes[row][col]
            for i, (group, runs) in enumerate(groups.items()):
                if kind == "proxy":
                    cs = [r.proxy_curve for r in runs if r.proxy_curve is not None]
                else:
                    cs = [r.golden[name] for r in runs if name in r.golden]
                if not cs:
                    continue
                xs, mean, lo, hi = _group_mean(cs, x)
                color = colors[i % len(colors)]
                line, = ax.plot(xs, mean, marker="o", color=color)
                if len(cs) > 1:
                    ax.fill_between(xs, lo, hi, alpha=0.2, color=color)
                label = f"{group} (n={len(runs)})" + (" HACKING" if any(r.hacking for r in runs) else "")
                legend.setdefault(label, line)
            ax.set_title(f"{kind}: {name}")
            ax.set_xlabel("step" if x == "step" else "wall time (s)")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    if legend:
        fig.legend(list(legend.values()), [textwrap.fill(label, 130) for label in legend], loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_path


def per_prompt_rows(summaries: list[RunSummary]) -> list[dict[str, Any]]:
    """Each run's golden scores per held-out prompt (the mean over its samples) at the first and the last
    evaluation, read from the evaluations' per-sample scores; runs that did not write them are left out."""
    rows = []
    for s in summaries:
        for name, c in s.golden.items():
            if len(c.steps) < 2:
                continue
            paired = paired_scores(s.scores(c.steps[0]), s.scores(c.steps[-1]), f"golden/{name}")
            if paired is None:
                continue
            prompts, first, last = paired
            slots = defaultdict(list)
            for i, prompt in enumerate(prompts):
                slots[prompt].append(i)
            for prompt, index in slots.items():
                before, after = first[index].mean().item(), last[index].mean().item()
                rows.append({"run": s.name, "golden": name, "prompt": prompt, "samples": len(index),
                             "first": round(before, 6), "last": round(after, 6), "gain": round(after - before, 6)})
    return rows


def write_report(run_dirs: list[str | Path], out_dir: str | Path,
                 tol: float = DEFAULT_HACK_TOLERANCE) -> dict[str, Path]:
    """Writes ``compare.md``, ``compare.csv``, ``compare.json``, ``curves.png`` and, where the runs wrote per-sample
    evaluation scores, ``per_prompt.csv`` (:func:`per_prompt_rows`) into ``out_dir``."""
    dirs = expand_run_dirs(list(run_dirs))
    if not dirs:
        raise ValueError(f"no run folders (with {METRICS_FILE}) among {[str(d) for d in run_dirs]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(dirs, tol)
    md, csv_path = write_table(summaries, out_dir)
    js = out_dir / "compare.json"
    js.write_text(json.dumps([s.row() for s in summaries], indent=1, default=str))
    paths = {"markdown": md, "csv": csv_path, "json": js, "plot": write_plot(summaries, out_dir / "curves.png")}
    prompts = per_prompt_rows(summaries)
    if prompts:
        paths["per_prompt"] = out_dir / "per_prompt.csv"
        with paths["per_prompt"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(prompts[0]))
            writer.writeheader()
            writer.writerows(prompts)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkit compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or sweep folders holding run folders")
    parser.add_argument("--out", default=None, help="report folder (default: <first folder>/report)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_HACK_TOLERANCE,
                        help="reward changes below this do not count as rising or falling")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
    try:
        paths = write_report(args.runs, out, args.tolerance)
    except ValueError as exc:
        print(f"rlkit compare: {exc}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print("\n".join(str(p) for p in paths.values()))
    return 0
