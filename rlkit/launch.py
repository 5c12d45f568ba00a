"""``rlkit train RECIPE``: start accelerate as the recipe's ``launch`` section says.

The accelerate/DeepSpeed launcher files live in ``recipes/accelerate/``; this command builds the
equivalent ``accelerate launch`` command line from the recipe, so the process count, ZeRO stage and
precision are set in one place. One process without DeepSpeed runs in this process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from rlkit.config import ConfigError, Recipe, load_recipe

LAUNCHER_CONFIG = "accelerate_config.yaml"


def launcher_config(recipe: Recipe) -> dict:
    """The accelerate config file of the recipe's ``launch`` section. Passed as ``--config_file``, it stands in for
    the user's default config (``accelerate config``), whose values would otherwise be merged in: its
    DeepSpeed settings turn DeepSpeed on in a run without it, and its accumulation steps override the recipe's."""
    launch = recipe.launch
    config = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0,
              "num_processes": launch.num_processes, "mixed_precision": launch.mixed_precision, "use_cpu": False,
              "distributed_type": "DEEPSPEED" if launch.deepspeed else ("MULTI_GPU" if launch.num_processes > 1
                                                                         else "NO")}
    if launch.deepspeed:
        config["deepspeed_config"] = {"zero_stage": launch.deepspeed, "offload_optimizer_device": "none",
                                      "offload_param_device": "none", "zero3_init_flag": False}
    return config


def write_launcher_config(recipe: Recipe) -> Path:
    """:func:`launcher_config` as ``accelerate_config.yaml`` in the run folder."""
    import yaml

    from rlkit.runtime.checkpoint import write_text_atomic

    return write_text_atomic(recipe.run_dir / LAUNCHER_CONFIG, yaml.safe_dump(launcher_config(recipe)))


def launch_command(recipe: Recipe, recipe_path: str, overrides: list[str], config_file: str | Path) -> list[str]:
    """The ``accelerate launch`` command that runs ``recipe_path`` on every rank, with ``config_file`` (written
    by :func:`write_launcher_config`) in place of the user's default accelerate config."""
    launch = recipe.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", str(launch.num_processes), "--num_machines", "1",
           "--mixed_precision", launch.mixed_precision, "--dynamo_backend", "no"]
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
    if not any(not a.startswith("-") for a in argv):  # (intermixed parsing would also call the overrides required)
        parser.error("the following arguments are required: recipe")
    args = parser.parse_intermixed_args(argv)  # --dry-run before the overrides too
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if recipe.launch.num_processes == 1 and not recipe.launch.deepspeed and not args.dry_run:
        from rlkit.trainers import run

        run(recipe)
        return 0
    if args.dry_run:  # writes nothing, not even the run folder: shows the launcher file the run would write
        import yaml

        config = recipe.run_dir / LAUNCHER_CONFIG
        print("launching:", shlex.join(launch_command(recipe, args.recipe, args.overrides, config)))
        print(f"with {config} (written when the run starts):\n{yaml.safe_dump(launcher_config(recipe))}", end="")
        return 0
    cmd = launch_command(recipe, args.recipe, args.overrides, write_launcher_config(recipe))
    print("launching:", shlex.join(cmd), flush=True)
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate would silently drop DeepSpeed
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(recipe.launch.stop_grace_s)  # SIGTERM -> checkpoint -> exit
    return run_forwarding_signals(cmd, env)


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Runs ``cmd`` and passes SIGTERM / SIGINT on to it (a scheduler stopping ``rlkit train`` stops the ranks,
    which checkpoint and exit, instead of leaving them running as orphans); returns its exit status."""
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
