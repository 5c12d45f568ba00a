"""``rlkit validate RECIPE...``: check recipes without running them."""

from __future__ import annotations

import argparse
import sys

from rlkit.config import ConfigError, load_recipe


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkit validate", description=__doc__)
    parser.add_argument("recipes", nargs="+", help="recipe files")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides applied to each")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.set)
        except ConfigError as exc:
            failed += 1
            print(f"{path}: INVALID\n{exc}", file=sys.stderr)
            continue
        print(f"{path}: ok ({recipe.algorithm}, rewards: {', '.join(r.name for r in recipe.rewards) or '-'})")
    return 2 if failed else 0
