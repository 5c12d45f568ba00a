"""ReFL on 2 CPU processes under accelerate + DeepSpeed ZeRO-2/3 equals 1 process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlkit.config import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))  # tests.dist_scripts.nan_reward, named by a recipe
from test_refl_trainer import read_log, tiny_recipe  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
# Adam's eps above every gradient (<= 0.033 in these runs): an update is then about lr * m / eps, so the weights show a
# gradient summed over ranks instead of averaged; at the default 1e-8 it is about lr * sign(m), which shows neither
# that nor anything but the rounding of near-zero gradients
ADAM_EPS = 0.1
TOL = dict(rtol=1e-3, atol=1e-7)  # float32 resolution of weights of about 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(recipe_path: Path, stage: int, overrides: list[str]) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "recipes" / "accelerate" / f"zero{stage}.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "rlkit", str(recipe_path), "launch.num_processes=2", f"launch.deepspeed={stage}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("stage,kl_beta", [(2, 0.0), (3, 0.5)])  # ZeRO-3 with the trust region on
def test_two_ranks_equal_one_process_on_the_same_global_batch(stage, kl_beta, tmp_path, tiny_sd3_dir):
    from rlkit.trainers import refl

    one = recipe_from_dict(tiny_recipe(tmp_path / "one", tiny_sd3_dir, max_steps=2, batch_size=2, kl_beta=kl_beta),
                           ["checkpoint.every=0", f"optim.eps={ADAM_EPS}"])
    refl.train(one)

    data = tiny_recipe(tmp_path / "two", tiny_sd3_dir, max_steps=2, batch_size=1, kl_beta=kl_beta)
    data["checkpoint"]["every"], data["optim"]["eps"] = 0, ADAM_EPS
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    launch_two(path, stage, [])
    two = recipe_from_dict(data)

    a = load_file(one.run_dir / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(two.run_dir / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL)
    # each rank evaluated half the held-out samples; gathered, they score as one process's
    evals = [[{k: v for k, v in r.items() if k.startswith("eval/")} for r in read_log(run.run_dir)
              if any(k.startswith("eval/") for k in r)] for run in (one, two)]
    assert len(evals[0]) == len(evals[1]) == 2 and "eval/proxy/latent-direction" in evals[0][0]
    assert evals[1][0] == pytest.approx(evals[0][0], rel=1e-5, abs=1e-6)  # before training: the same weights
    assert evals[1][1] == pytest.approx(evals[0][1], rel=1e-3, abs=1e-4)
    # rank 0 logged the mean over both ranks' samples, as the single process did over its two
    for key in ("train/loss", "train/reward", "train/grad_norm"):  # DeepSpeed's own norm of the clipped step
        r1 = [r[key] for r in read_log(one.run_dir) if key in r]
        r2 = [r[key] for r in read_log(two.run_dir) if key in r]
        assert len(r1) == len(r2) == 2
        assert r2 == pytest.approx(r1, rel=1e-4, abs=1e-6), key
    if kl_beta:  # the second update starts off the base (LoRA B moved), so the drift term is live there
        kl = [r["train/kl"] for r in read_log(two.run_dir) if "train/kl" in r]
        assert kl[0] == 0.0 and kl[1] > 0


def test_shared_backbone_dina_lrm_runs_under_zero3(tmp_path, tiny_sd3_dir):
    """The reward's blocks are the policy's own (a second adapter; ``share_backbone: always`` never falls back to
    a copy), also when ZeRO-3 partitions them: two ranks log what one process logs on the same global batch."""
    from rewards.dina_lrm.config import DiNaLRMConfig
    from rewards.dina_lrm.reward import DiNaLRMReward
    from rlkit.models.sd3 import SD3Generator
    from rlkit.trainers import refl

    config = DiNaLRMConfig(num_transformer_layers=3, visual_head_idx=(1, 2, 3), text_head_idx=(2, 3), lora_r=4,
                           lora_alpha=8.0, num_queries=2, num_attn_heads=2, max_sequence_length=16)
    reward = DiNaLRMReward(config=config, base_model=str(tiny_sd3_dir))
    gen = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    gen.transformer.requires_grad_(False)
    reward.attach_generator(gen)
    reward.save_pretrained(tmp_path / "rm")

    # the state at its own sigma (no re-noising draw, which each rank would make from its own stream)
    scored = [{"name": "dina-lrm", "args": {"pretrained": str(tmp_path / "rm"), "mode": "state",
                                            "share_backbone": "always"}}]
    logs = {}
    for name, batch_size in (("one", 2), ("two", 1)):
        data = tiny_recipe(tmp_path / name, tiny_sd3_dir, max_steps=2, batch_size=batch_size, reward_at="state")
        data["rewards"], data["checkpoint"]["every"], data["optim"]["eps"] = scored, 0, ADAM_EPS
        if name == "one":
            refl.train(recipe_from_dict(data))
        else:
            path = tmp_path / "dina.yaml"
            path.write_text(yaml.safe_dump(data))
            launch_two(path, 3, [])
        logs[name] = [r for r in read_log(recipe_from_dict(data).run_dir) if "train/loss" in r]
    assert len(logs["one"]) == len(logs["two"]) == 2
    for r1, r2 in zip(logs["one"], logs["two"]):
        for key in ("train/loss", "train/reward"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key


def test_logged_stats_are_the_mean_over_ranks_and_max_keys_their_largest():
    from rlkit.trainers.common import over_ranks

    class TwoRanks:  # rank 0's view of a gather with a rank 1 that holds ``other``
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other: dict[str, float]):
            self.other = other

        def gather(self, local: torch.Tensor) -> torch.Tensor:
            return torch.cat([local, torch.tensor([[self.other[k] for k in sorted(self.other)]], dtype=local.dtype)])

    mine = {"loss": 1.0, "ratio_dev_max": 0.5, "reward": 0.25}
    combined = over_ranks(TwoRanks({"reward": 0.75, "loss": 3.0, "ratio_dev_max": 0.125}), mine)
    assert combined == {"loss": 2.0, "ratio_dev_max": 0.5, "reward": 0.5}
    single = type("OneRank", (), {"num_processes": 1})()
    assert over_ranks(single, mine) == mine and over_ranks(single, mine) is not mine


@pytest.mark.parametrize("nan_at", [0, 1])  # the update's first micro-batch, or its accumulation boundary
def test_a_skipped_update_under_zero2_leaves_nothing_behind(nan_at, tmp_path, tiny_sd3_dir):
    """A non-finite loss in one micro-batch of a 2-micro-batch update: the update is skipped on every rank, and
    neither steps the optimiser on part of its gradients nor passes them on to the next update (DeepSpeed steps
    inside the boundary's backward and keeps its own gradient sums); the result equals one process's."""
    from rlkit.trainers import refl

    reward = [{"name": "tests.dist_scripts.nan_reward:NaNAt", "args": {"seed": 1, "scale": 10.0, "nan_at": nan_at}}]
    runs = {}
    for name, batch in (("one", 2), ("two", 1)):
        data = tiny_recipe(tmp_path / name, tiny_sd3_dir, max_steps=3, batch_size=batch, grad_accum=2)
        data["rewards"], data["checkpoint"]["every"], data["optim"]["eps"] = reward, 0, ADAM_EPS
        runs[name] = recipe_from_dict(data)
        if name == "one":
            refl.train(runs[name])
        else:
            path = tmp_path / "two.yaml"
            path.write_text(yaml.safe_dump(data))
            launch_two(path, 2, [])
    logs = {name: [r for r in read_log(run.run_dir) if "train/loss" in r] for name, run in runs.items()}
    assert [r.get("train/skipped") for r in logs["two"]] == [1.0, None, None] == [r.get("train/skipped")
                                                                                 for r in logs["one"]]
    assert [r["train/loss"] for r in logs["two"][1:]] == pytest.approx([r["train/loss"] for r in logs["one"][1:]],
                                                                       rel=1e-5)
    a, b = (load_file(run.run_dir / "export" / "pytorch_lora_weights.safetensors") for run in runs.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL)
