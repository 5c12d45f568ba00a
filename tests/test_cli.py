import subprocess
import sys

import yaml

from rlkit.cli import main
from rlkit.config import load_recipe
from rlkit.launch import launch_command


def test_validate_reports_three_mistakes_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "algorithm": "refl",
        "rewards": [{"name": "dina-lrm", "wieght": 1.0}],
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
    good.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [{"name": "dina-lrm"}]}))
    assert main(["validate", str(good)]) == 0
    assert "ok (refl, rewards: dina-lrm)" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_train_builds_accelerate_command_from_launch_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "refl", "rewards": [{"name": "dina-lrm"}],
                                    "launch": {"num_processes": 2, "deepspeed": 3, "mixed_precision": "bf16"}}))
    cmd = launch_command(load_recipe(path), str(path), ["seed=3"])
    joined = " ".join(cmd)
    assert "--num_processes 2" in joined and "--use_deepspeed --zero_stage 3" in joined
    assert "--mixed_precision bf16" in joined and joined.endswith(f"-m rlkit {path} seed=3")


def test_shapes_subcommands_route_and_name_what_they_expect(capsys):
    import pytest

    assert main(["shapes", "frobnicate"]) == 2
    assert "rlkit shapes rewards" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["shapes", "rewards", "--compare", "no-equals-sign"])
    assert exc.value.code == 2 and "NAME=PATH" in capsys.readouterr().err
