"""The ``rlkit`` command.

    rlkit RECIPE.yaml [key=value ...]       run the recipe's algorithm in this process (what
                                            ``accelerate launch -m rlkit RECIPE`` calls on every rank)
    rlkit train RECIPE.yaml [key=value ...] start accelerate as the recipe's launch section says
    rlkit validate FILE.yaml ...            check recipes and sweeps (every run) without running them
    rlkit demo [--quick]                    the Shapes proving ground end to end
    rlkit eval-reward ...                   pairwise accuracy of any reward on a preference set
    rlkit cache-latents ...                 encode a preference set once with the generator's VAE
    rlkit shapes build ...                  rebuild the Shapes world's checkpoints from scratch
    rlkit shapes rewards [FOLDER]           the Shapes rewards' accuracy against the annotators, guard shortcuts
    rlkit sweep SWEEP.yaml                  run or export a reward-ablation sweep
    rlkit compare RUN_DIR ...               compare runs: table + curves
    rlkit bench                             cost benchmark (FLOPs, memory, wall time)
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# subcommand -> module with a main(argv) -> int
SUBCOMMANDS = {
    "train": "rlkit.launch",
    "validate": "rlkit.cli_validate",
    "demo": "rlkit.shapes.demo",
    "eval-reward": "rlkit.eval_reward",
    "cache-latents": "rlkit.cache_latents",
    "shapes": "rlkit.shapes.build",
    "shapes rewards": "rlkit.shapes.reward_report",
    "sweep": "rlkit.sweep",
    "compare": "rlkit.compare",
    "bench": "rlkit.bench",
}


def run_recipe(argv: list[str]) -> int:
    """``rlkit RECIPE [overrides]``: load, validate and run in this process."""
    from rlkit.config import ConfigError, load_recipe

    path, overrides = argv[0], argv[1:]
    try:
        recipe = load_recipe(path, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from rlkit.runtime.accelerator import close_process_group
    from rlkit.trainers import run

    try:
        run(recipe)
    except SystemExit:  # a stop every rank took at the same step (a signal), after saving: leave as cleanly
        close_process_group()
        raise
    close_process_group()  # not after an error: a rank that failed alone would wait at its barrier
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 1
    head = argv[0]
    if head == "shapes":
        if argv[1:2] not in (["build"], ["rewards"]):
            print("usage: rlkit shapes build [OUT_DIR] [--fast] [--evaluate] [--stages ...]\n"
                  "       rlkit shapes rewards [FOLDER] [--compare NAME=PATH ...]", file=sys.stderr)
            return 2
        if argv[1] == "rewards":
            head = "shapes rewards"
        argv = argv[1:]
    if head in SUBCOMMANDS:
        try:
            module = importlib.import_module(SUBCOMMANDS[head])
        except ModuleNotFoundError as exc:
            print(f"rlkit {head}: not available in this build ({exc.name} is missing)", file=sys.stderr)
            return 2
        return int(module.main(argv[1:]) or 0)
    if head.endswith((".yaml", ".yml")) or Path(head).is_file():
        return run_recipe(argv)
    print(f"rlkit: unknown command {head!r}; commands: {', '.join(SUBCOMMANDS)} or a recipe path", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
