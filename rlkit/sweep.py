"""``rlkit sweep SWEEP.yaml``: a base recipe plus a grid of overrides, expanded into named runs.

A sweep file (validated like a recipe; overrides use the command line's ``key=value`` syntax)::

    base: ../refl_sd35.yaml          # relative to the sweep file
    name: reward_ablation_sd35       # the sweep folder is <output_dir>/<name>
    output_dir: runs/sweeps
    overrides: [refl.max_steps=100]  # applied to every run
    axes:                            # Cartesian product; each option has a readable label
      - name: reward
        options:
          - {label: dina, overrides: []}
          - {label: hpsv3, overrides: ["rewards=[{name: hpsv3}]"]}
    seeds: [0, 1]                    # one more axis, labelled seed<N>

Each run is named ``<label>__<label>__seed<N>``, gets ``name=`` and ``output_dir=<sweep folder>``, and
keeps its resolved recipe in ``<run_dir>/recipe.yaml`` (written by the trainer). Modes:

    rlkit sweep SWEEP.yaml                 run locally, one after another; a run with a DONE marker is
                                           skipped, an unfinished one resumes from its checkpoint; then
                                           ``rlkit compare`` writes the table and the plot
    rlkit sweep SWEEP.yaml --emit accelerate   write <sweep>/launch.sh (one ``accelerate launch`` a line)
    rlkit sweep SWEEP.yaml --emit slurm        write <sweep>/sweep.sbatch (a SLURM array, one task a run)
    rlkit sweep SWEEP.yaml --list              print the expanded runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rlkit import confload
from rlkit.compare import DONE_FILE
from rlkit.config import ConfigError, Recipe, load_recipe

RUN_NAME_SEP = "__"
Problems = Iterator[tuple[str, str]]


@dataclass
class SweepOption:
    label: str
    overrides: list[str] = field(default_factory=list)

    def check(self) -> Problems:
        if not self.label or any(c in self.label for c in "/ \t") or RUN_NAME_SEP in self.label:
            yield "label", (f"must be a non-empty name without '/', spaces or {RUN_NAME_SEP!r} (which joins the "
                            f"labels of a run's name), got {self.label!r}")
        for i, text in enumerate(self.overrides):
            if "=" not in text:
                yield f"overrides.{i}", f"overrides are written key=value, got {text!r}"


@dataclass
class SweepAxis:
    name: str
    options: list[SweepOption] = field(default_factory=list)

    def check(self) -> Problems:
        if not self.options:
            yield "options", "an axis needs at least one option"
        labels = [o.label for o in self.options]
        if len(set(labels)) != len(labels):
            yield "options", f"labels must be distinct, got {labels}"


@dataclass
class SlurmConfig:
    partition: str = ""
    gpus_per_task: int = 8
    cpus_per_task: int = 32
    time: str = "24:00:00"
    max_parallel: int = 0  # %N throttle of the array; 0 = none

    def check(self) -> Problems:
        if self.gpus_per_task < 0 or self.cpus_per_task < 1:
            yield "gpus_per_task", "gpus_per_task must be >= 0 and cpus_per_task >= 1"
        if self.max_parallel < 0:
            yield "max_parallel", f"must be >= 0, got {self.max_parallel}"


@dataclass
class SweepConfig:
    base: str
    name: str = ""
    output_dir: str = "runs/sweeps"
    overrides: list[str] = field(default_factory=list)
    axes: list[SweepAxis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> Problems:
        if not self.base:
            yield "base", "a sweep needs a base recipe"
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            yield "axes", f"axis names must be distinct, got {names}"
        if len(set(self.seeds)) != len(self.seeds):
            yield "seeds", f"seeds must be distinct, got {self.seeds}"
        for i, text in enumerate(self.overrides):
            if "=" not in text:
                yield f"overrides.{i}", f"overrides are written key=value, got {text!r}"


@dataclass
class SweepRun:
    name: str
    labels: dict[str, str]  # axis name -> option label (what varied)
    overrides: list[str]  # everything on top of the base recipe, name/output_dir/seed included


@dataclass
class Sweep:
    config: SweepConfig
    file: Path

    @property
    def base_path(self) -> Path:
        base = Path(self.config.base)
        return base if base.is_absolute() else (self.file.parent / base)

    @property
    def name(self) -> str:
        return self.config.name or self.file.stem

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir) / self.name

    def runs(self) -> list[SweepRun]:
        axes = [(a.name, a.options) for a in self.config.axes]
        if self.config.seeds:
            axes.append(("seed", [SweepOption(f"seed{s}", [f"seed={s}"]) for s in self.config.seeds]))
        out = []
        for combo in itertools.product(*(opts for _, opts in axes)):
            name = RUN_NAME_SEP.join(o.label for o in combo) or self.name
            overrides = list(self.config.overrides)
            for option in combo:
                overrides += option.overrides
            # quoted: an override's value is read as YAML, where a label like 0.10, 010 or no is not that string
            overrides += [f"name={json.dumps(name)}", f"output_dir={json.dumps(str(self.dir))}"]
            out.append(SweepRun(name, {a: o.label for (a, _), o in zip(axes, combo)}, overrides))
        return out

    def recipe(self, run: SweepRun, extra: list[str] | tuple[str, ...] = ()) -> Recipe:
        return load_recipe(self.base_path, [*run.overrides, *extra])

    def validate(self, extra: list[str] | tuple[str, ...] = ()) -> list[Recipe]:
        """Every run's recipe (``extra`` overrides on top of each), or a ConfigError naming each broken run."""
        recipes, problems = [], []
        for run in self.runs():
            try:
                recipes.append(self.recipe(run, extra))
            except ConfigError as exc:
                # a key the run's overrides set is the sweep file's problem; any other is the base recipe's
                problems += [confload.ConfigProblem(
                    f"{self.file} [{run.name}]" if p.file.endswith(confload.OVERRIDDEN)
                    else f"{self.file} [{run.name}: {p.file}]", p.key, p.message) for p in exc.problems]
        if problems:
            raise ConfigError(problems)
        return recipes


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file names a ``base`` recipe, which no recipe does."""
    return "base" in confload.read_yaml(path)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Reads and validates a sweep file (``overrides`` edit the sweep file itself, e.g. ``seeds=[0]``)."""
    data = confload.read_yaml(path)
    sweep = Sweep(confload.build(SweepConfig, data, file=str(path), overrides=overrides), Path(path))
    if not sweep.base_path.is_file():
        raise ConfigError([confload.ConfigProblem(str(path), "base", f"no such recipe: {sweep.base_path}")])
    return sweep


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE_FILE).is_file()


def run_local(sweep: Sweep, isolate: bool = False, log=print) -> list[Path]:
    """Runs every unfinished run in turn; returns the run folders. ``isolate`` = one subprocess per run (no state
    shared between runs; in-process is faster for tiny runs).

    ``peak_rss_bytes`` in each ``DONE.json``: in-process, the highest RSS of this process while the run ran, which
    counts the interpreter, the imports and whatever earlier runs left; in a subprocess, what
    :func:`_run_subprocess` says. Neither sums the ranks of a multi-process run: the trainers log their own peaks.
    """
    from rlkit.flops import PeakRSS

    dirs = []
    for run in sweep.runs():
        recipe = sweep.recipe(run)
        run_dir = recipe.run_dir
        dirs.append(run_dir)
        if is_done(run_dir):
            log(f"[sweep] {run.name}: done, skipped")
            continue
        log(f"[sweep] {run.name}: running")
        started = time.perf_counter()
        if isolate or recipe.launch.num_processes > 1 or recipe.launch.deepspeed:  # `rlkit train` starts the ranks
            peak = _run_subprocess(sweep.base_path, run.overrides)
        else:
            from rlkit.trainers import run as train

            with PeakRSS() as rss:
                train(recipe)
            peak = rss.peak_bytes
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = {"name": run.name, "labels": run.labels, "overrides": run.overrides,
                  "wall_s": time.perf_counter() - started, "peak_rss_bytes": peak,
                  "isolated": isolate, "finished": time.time()}
        (run_dir / DONE_FILE).write_text(json.dumps(marker, indent=1))
    return dirs


def _run_subprocess(base: Path, overrides: list[str]) -> int:
    """``rlkit train BASE overrides`` in a child (accelerate's ranks when the recipe's ``launch`` asks for them);
    returns ``ru_maxrss`` (bytes) of the child and the processes it waited for: the largest peak of any one of
    them (one rank of several), and never less than this process's RSS when it forked the child."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "rlkit", "train", str(base), *overrides])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"run failed with exit code {proc.returncode}: {base} {' '.join(overrides)}")
    return int(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024))


def accelerate_commands(sweep: Sweep) -> list[str]:
    """One ``accelerate launch`` line a run, from each recipe's ``launch`` section."""
    from rlkit.launch import launch_command, write_launcher_config

    lines = []
    for run in sweep.runs():
        recipe = sweep.recipe(run)
        cmd = launch_command(recipe, str(sweep.base_path), run.overrides, write_launcher_config(recipe))
        if cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]:
            cmd = ["accelerate", "launch", *cmd[3:]]
        lines.append(shlex.join(cmd))
    return lines


def write_launch_script(sweep: Sweep) -> Path:
    sweep.dir.mkdir(parents=True, exist_ok=True)
    out = sweep.dir / "launch.sh"
    body = ["#!/usr/bin/env bash", f"# sweep {sweep.name}: {len(sweep.runs())} runs, one after another", "set -e"]
    for run, line in zip(sweep.runs(), accelerate_commands(sweep)):
        done = shlex.quote(str(sweep.dir / run.name / DONE_FILE))
        # an if, not `[ ] || { cmd && touch; }`: set -e does not stop a failing command inside && or || lists
        body += [f"if [ ! -f {done} ]; then", f"  {line}", f"  touch {done}", "fi"]
    body.append(f"rlkit compare {shlex.quote(str(sweep.dir))}")
    out.write_text("\n".join(body) + "\n")
    out.chmod(0o755)
    return out


def write_slurm_script(sweep: Sweep) -> Path:
    sweep.dir.mkdir(parents=True, exist_ok=True)
    cfg = sweep.config.slurm
    runs = sweep.runs()
    throttle = f"%{cfg.max_parallel}" if cfg.max_parallel else ""
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={sweep.name}", f"#SBATCH --array=0-{len(runs) - 1}{throttle}",
             f"#SBATCH --gpus-per-task={cfg.gpus_per_task}", f"#SBATCH --cpus-per-task={cfg.cpus_per_task}",
             f"#SBATCH --time={cfg.time}", f"#SBATCH --output={sweep.dir}/slurm-%A_%a.out"]
    if cfg.partition:
        lines.append(f"#SBATCH --partition={cfg.partition}")
    lines += [f"# after the array: rlkit compare {shlex.quote(str(sweep.dir))}", "set -e", "COMMANDS=("]
    lines += [f"  {shlex.quote(c)}" for c in accelerate_commands(sweep)]
    lines += [")", "NAMES=(" + " ".join(shlex.quote(r.name) for r in runs) + ")",
              f'DONE={shlex.quote(str(sweep.dir))}/${{NAMES[$SLURM_ARRAY_TASK_ID]}}/{DONE_FILE}',
              '[ -f "$DONE" ] && exit 0', 'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', 'touch "$DONE"']
    out = sweep.dir / "sweep.sbatch"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkit sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value edits of the sweep file (e.g. seeds=[0])")
    parser.add_argument("--emit", choices=["accelerate", "slurm"], help="write a launch script instead of running")
    parser.add_argument("--list", action="store_true", help="print the expanded runs and exit")
    parser.add_argument("--isolate", action="store_true", help="run each run in its own python process")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison report at the end")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.overrides)
        sweep.validate()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.list:
        for run in sweep.runs():
            print(f"{run.name}\t{' '.join(shlex.quote(o) for o in run.overrides)}")
        return 0
    if args.emit:
        out = write_launch_script(sweep) if args.emit == "accelerate" else write_slurm_script(sweep)
        print(out)
        return 0
    dirs = run_local(sweep, isolate=args.isolate)
    if not args.no_compare:
        from rlkit.compare import write_report

        paths = write_report(dirs, sweep.dir / "report")
        print("\n".join(str(p) for p in paths.values()))
    return 0
