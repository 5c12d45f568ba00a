"""Two CPU processes (gloo) under accelerate DDP and DeepSpeed ZeRO-2/3 equal one process on the union of their data;
in bf16, the EMA averages DeepSpeed's fp32 master weights.

Each test launches a script of ``tests/dist_scripts/`` (``zero_equivalence.py``, ``ema_masters.py``) with the shipped
launcher file ``recipes/accelerate/{ddp,zero2,zero3}.yaml`` and checks what every rank wrote.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero_equivalence.py"
WORLD = 2
LAUNCH_TIMEOUT_S = 300
LAUNCHERS = {0: "ddp", 2: "zero2", 3: "zero3"}  # ZeRO stage (0 = plain DDP) -> recipes/accelerate/<name>.yaml
ENGINES = {0: "DistributedDataParallel", 2: "DeepSpeedEngine", 3: "DeepSpeedEngine"}
PARAM_ATOL = 1e-6
NORM_RTOL = 1e-5

pytestmark = pytest.mark.distributed


def _load_script():
    spec = importlib.util.spec_from_file_location("zero_equivalence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def reference(script):
    initial = script.trainable_state(script.Pair())
    return initial, *script.reference_params(WORLD)


def _launch(stage: int, out: Path, script: Path = SCRIPT) -> float:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)  # would make accelerate drop DeepSpeed
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "recipes" / "accelerate" / f"{LAUNCHERS[stage]}.yaml"),
           "--num_processes", str(WORLD), "--main_process_port", str(_free_port()),
           str(script), "--out", str(out), "--stage", str(stage)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"{LAUNCHERS[stage]} 2-process run of {script.name}: {elapsed:.1f} s")
    return elapsed


@pytest.mark.parametrize("stage", list(LAUNCHERS), ids=list(LAUNCHERS.values()))
def test_zero_two_ranks_equal_one_process_on_union(stage, tmp_path, script, reference):
    _launch(stage, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]
    initial, want, ref_norms, want_ema = reference

    # accelerate sees the real process group (not rank 0 of 1 on every process)
    assert [r["process_index"] for r in ranks] == list(range(WORLD))
    assert all(r["num_processes"] == WORLD and r["dist_world_size"] == WORLD for r in ranks)
    assert all(r["backend"] == "gloo" and r["engine"] == ENGINES[stage] for r in ranks)
    assert all(r["frozen_max_diff"] < PARAM_ATOL for r in ranks)  # prepare_frozen keeps the helper's outputs

    # ranks saw different halves of each step's global batch, together all of it
    assert not torch.equal(ranks[0]["seen_x"], ranks[1]["seen_x"])
    for step in range(script.STEPS):
        union = torch.cat([r["seen_x"][step] for r in ranks])
        torch.testing.assert_close(union, script.global_batch(step, script.MICRO_BATCH * WORLD)["x"])

    # the global norm (DeepSpeed's, or DDP's clip_grad_norm_) is that of the union's mean gradient (averaged,
    # not summed), and clipping is active
    assert all(norm > script.GRAD_CLIP for norm in ref_norms)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(ref_norms), rtol=NORM_RTOL, atol=0)

    # weights after the steps equal the single-process run on the union, on every rank
    changed = [name for name in want if not torch.equal(want[name], initial[name])]
    assert len(changed) > 0.75 * len(want)  # the last block's unused context projections may stay put
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    for r in ranks:
        assert r["params"].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(r["params"][name], value, rtol=0, atol=PARAM_ATOL, msg=name)
            # the EMA (sharded per rank under ZeRO-3) swapped in equals the single-process EMA
            torch.testing.assert_close(r["ema_params"][name], want_ema[name], rtol=0, atol=PARAM_ATOL, msg=name)
    assert any(not torch.equal(want_ema[n], want[n]) for n in changed)

    # a checkpoint written by both ranks restores the exact weights after a further step moved them
    for r in ranks:
        assert r["resumed_step"] == script.STEPS and r["resumed_ema_updates"] == script.STEPS
        assert any(not torch.equal(r["moved_params"][n], r["params"][n]) for n in changed)
        assert all(torch.equal(r["restored_params"][n], r["params"][n]) for n in want)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_the_ema_of_a_bf16_run_averages_the_fp32_master_weights(stage, tmp_path):
    """With decay 0 the average is the latest value: DeepSpeed's fp32 master exactly, not the module's bf16 copy
    (which differs from it by up to half a bf16 step); applying the EMA writes its bf16 rounding into the module and
    leaves the module as it was afterwards."""
    _launch(stage, tmp_path, ROOT / "tests" / "dist_scripts" / "ema_masters.py")
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]
    for r in ranks:
        assert r["dtype"] == "torch.bfloat16"
        for average, master, module in zip(r["averages"], r["masters"], r["copies"]):
            assert all(a.dtype == m.dtype == torch.float32 for a, m in zip(average, master))
            assert all(torch.equal(a, m) for a, m in zip(average, master))
            assert max(float((m - c.float()).abs().max()) for m, c in zip(master, module)) > 1e-3
        assert all(torch.equal(i, a.to(torch.bfloat16)) for i, a in zip(r["inside"], r["averages"][-1]))
        assert all(torch.equal(x, y) for x, y in zip(r["after"], r["before"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["averages"][-1], ranks[1]["averages"][-1]))
