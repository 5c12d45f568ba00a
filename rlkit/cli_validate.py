"""``rlkit validate FILE...``: check recipes, and every run of sweep files, without running them."""

from __future__ import annotations

import argparse
import sys

from rlkit.config import ConfigError, Recipe, load_recipe
from rlkit.sweep import is_sweep_file, load_sweep


def _summary(recipes: list[Recipe]) -> str:
    algorithms = dict.fromkeys(r.algorithm for r in recipes)  # in the order the recipes name them
    rewards = dict.fromkeys(r.name for recipe in recipes for r in recipe.rewards)
    return f"{', '.join(algorithms)}, rewards: {', '.join(rewards) or '-'}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkit validate", description=__doc__)
    parser.add_argument("files", nargs="+", metavar="FILE", help="recipe or sweep files")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to each recipe (to each run's, for a sweep)")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            if is_sweep_file(path):
                sweep = load_sweep(path)
                recipes = sweep.validate(args.set)
                print(f"{path}: ok (sweep of {len(recipes)} runs in {sweep.dir}; {_summary(recipes)})")
            else:
                print(f"{path}: ok ({_summary([load_recipe(path, args.set)])})")
        except ConfigError as exc:
            failed += 1
            print(f"{path}: INVALID\n{exc}", file=sys.stderr)
    return 2 if failed else 0
