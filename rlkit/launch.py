"""``rlkit train RECIPE``: start accelerate as the recipe's ``launch`` section says.

The accelerate/DeepSpeed launcher files live in ``recipes/accelerate/``; this command builds the
equivalent ``accelerate launch`` command line from the recipe, so the process count, ZeRO stage and
precision are set in one place. One process without DeepSpeed runs in this process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from rlkit.config import ConfigError, Recipe, load_recipe


def launch_command(recipe: Recipe, recipe_path: str, overrides: list[str]) -> list[str]:
    """The ``accelerate launch`` command that runs ``recipe_path`` on every rank."""
    launch = recipe.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes),
           "--num_machines", "1", "--mixed_precision", launch.mixed_precision, "--dynamo_backend", "no"]
    if launch.main_process_port:
        cmd += ["--main_process_port", str(launch.main_process_port)]
    if launch.deepspeed:
        cmd += ["--use_deepspeed", "--zero_stage", str(launch.deepspeed)]
    elif launch.num_processes > 1:
        cmd += ["--multi_gpu"]
    return cmd + ["-m", "rlkit", recipe_path, *overrides]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkit train", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if recipe.launch.num_processes == 1 and not recipe.launch.deepspeed and not args.dry_run:
        from rlkit.trainers import run

        run(recipe)
        return 0
    cmd = launch_command(recipe, args.recipe, args.overrides)
    print("launching:", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate would silently drop DeepSpeed
    return subprocess.call(cmd, env=env)
