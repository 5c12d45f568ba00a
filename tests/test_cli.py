import subprocess
import sys

import pytest
import yaml

from rlkit.cli import main
from rlkit.config import load_recipe
from rlkit.launch import launch_command, write_launcher_config

DINA = {"name": "dina-lrm", "args": {"pretrained": "some/dina-lrm-checkpoint"}}  # validated, never loaded


def test_validate_reports_three_mistakes_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "algorithm": "refl",
        "rewards": [{**DINA, "wieght": 1.0}],
        "optim": {"lr": "fast"},
        "launch": {"deepspeed": 1},
    }))
    proc = subprocess.run([sys.executable, "-m", "rlkit", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "3 problem(s)" in proc.stderr
    for key in ("rewards.0.wieght", "optim.lr", "launch.deepspeed"):
        assert f"{bad}: {key}" in proc.stderr
    assert "did you mean 'weight'" in proc.stderr


def test_validate_ok_and_unknown_command(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [DINA]}))
    assert main(["validate", str(good)]) == 0
    assert "ok (refl, rewards: dina-lrm)" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_validate_checks_every_run_of_a_sweep_file(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [DINA]}))
    sweep = {"base": "base.yaml", "name": "ablation", "output_dir": str(tmp_path / "runs"), "seeds": [0, 1],
             "axes": [{"name": "reward", "options": [{"label": "dina", "overrides": []},
                                                     {"label": "pick", "overrides": ["rewards=[{name: pickscore}]"]}]}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["validate", str(path)]) == 0
    assert f"{path}: ok (sweep of 4 runs in {tmp_path / 'runs' / 'ablation'}; refl, rewards: dina-lrm, pickscore)" \
        in capsys.readouterr().out
    # an override that breaks one option's runs names each of them
    sweep["axes"][0]["options"][1]["overrides"].append("refl.max_stepz=3")
    path.write_text(yaml.safe_dump(sweep))
    assert main(["validate", str(path), str(tmp_path / "base.yaml"), "--set", "seed=1"]) == 2
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'base.yaml'}: ok (refl, rewards: dina-lrm)" in out and f"{path}: INVALID" in err
    assert "2 problem(s)" in err and "did you mean 'max_steps'" in err
    for run in ("pick__seed0", "pick__seed1"):  # the sweep's own override, not the base recipe
        assert f"{path} [{run}]: refl.max_stepz" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_train_builds_accelerate_command_from_launch_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [DINA],
                                    "launch": {"num_processes": 2, "deepspeed": 3, "mixed_precision": "bf16"}}))
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'runs'}"])
    config = write_launcher_config(recipe)
    cmd = launch_command(recipe, str(path), ["seed=3"], config)
    joined = " ".join(cmd)
    assert "--num_processes 2" in joined and "--use_deepspeed --zero_stage 3" in joined
    assert f"--config_file {config}" in joined  # in place of the user's default accelerate config
    assert "--mixed_precision bf16" in joined and joined.endswith(f"-m rlkit {path} seed=3")
    written = yaml.safe_load(config.read_text())
    assert written["distributed_type"] == "DEEPSPEED" and written["deepspeed_config"]["zero_stage"] == 3
    assert "gradient_accumulation_steps" not in written["deepspeed_config"]  # the recipe sets it, not the launcher


def test_train_dry_run_prints_the_command_wherever_the_flag_stands(tmp_path, capsys):
    from rlkit.launch import main as train_main

    for argv in ([], ["--dry-run"]):  # the recipe is what is missing; overrides are optional
        with pytest.raises(SystemExit):
            train_main(argv)
        assert capsys.readouterr().err.rstrip().endswith("the following arguments are required: recipe")

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [DINA],
                                    "launch": {"num_processes": 2}}))
    for argv in ([str(path), "--dry-run", f"output_dir={tmp_path}", "seed=3"],
                 [str(path), f"output_dir={tmp_path}", "seed=3", "--dry-run"]):
        assert train_main(argv) == 0
        command, *config = capsys.readouterr().out.splitlines()
        assert command.startswith("launching:") and command.endswith(f"-m rlkit {path} output_dir={tmp_path} seed=3")
        assert f"--config_file {tmp_path / 'refl' / 'accelerate_config.yaml'} " in command
        assert config[0].endswith("accelerate_config.yaml (written when the run starts):")
        assert yaml.safe_load("\n".join(config[1:]))["num_processes"] == 2  # the file's content, shown
    assert list(tmp_path.iterdir()) == [path]  # a dry run writes nothing


def test_rlkit_train_gives_the_ranks_the_recipes_grace_to_checkpoint_after_a_stop(tmp_path, monkeypatch):
    """torchrun kills ranks 30 s after passing on a SIGTERM unless told otherwise; a checkpoint takes longer."""
    import rlkit.launch

    seen = {}
    monkeypatch.setattr(rlkit.launch, "run_forwarding_signals", lambda cmd, env: seen.update(env) or 0)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [DINA],
                                    "launch": {"num_processes": 2, "stop_grace_s": 900}}))
    assert rlkit.launch.main([str(path), f"output_dir={tmp_path}"]) == 0
    assert seen["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "900" and "ACCELERATE_USE_CPU" not in seen


def test_a_signal_to_rlkit_train_reaches_the_ranks():
    """SIGTERM to the launcher is passed on to accelerate (and so to the ranks, which checkpoint and exit)."""
    import os
    import signal
    import sys
    import threading

    from rlkit.launch import run_forwarding_signals

    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
             "print('ready', flush=True); time.sleep(60)")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert run_forwarding_signals([sys.executable, "-c", child], dict(os.environ)) == 7
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's own handler is back


def test_shapes_subcommands_route_and_name_what_they_expect(capsys):
    import pytest

    assert main(["shapes", "frobnicate"]) == 2
    assert "rlkit shapes rewards" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["shapes", "rewards", "--compare", "no-equals-sign"])
    assert exc.value.code == 2 and "NAME=PATH" in capsys.readouterr().err


def test_a_recipe_run_tears_its_process_group_down_before_the_interpreter_does(tmp_path, monkeypatch):
    """Left to the interpreter's exit, gloo's threads may abort a rank whose run succeeded (SIGABRT)."""
    import torch.distributed as dist

    import rlkit.trainers

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [DINA]}))
    seen = []

    def stopped(r):
        seen.append(dist.is_initialized())
        raise SystemExit("stopped by signal after step 2")

    for n, fake in enumerate((lambda r: seen.append(dist.is_initialized()), stopped)):
        monkeypatch.setattr(rlkit.trainers, "run", fake)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{n}'}", rank=0, world_size=1)
        try:
            if fake is stopped:  # a stop that every rank took together (a signal) leaves as cleanly
                with pytest.raises(SystemExit, match="stopped by signal"):
                    main([str(recipe)])
            else:
                assert main([str(recipe)]) == 0
            assert seen == [True] * (n + 1) and not dist.is_initialized()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
