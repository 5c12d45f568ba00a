"""Guards: SIGTERM sets a flag (handler restored on close); non-finite steps are skipped, then the run stops."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from rlkit.runtime.guards import NonFiniteError, TrainingGuard


def test_sigterm_sets_the_stop_flag_and_close_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with TrainingGuard() as guard:
        assert not guard.stop_requested and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only sets the flag
        assert guard.stop_requested and guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) is before


def test_nonfinite_steps_are_skipped_and_counted_then_stop(caplog):
    guard = TrainingGuard(max_consecutive_nonfinite=3, install=False)
    assert guard.check(torch.tensor(1.0), step=0)
    with caplog.at_level("WARNING"):
        assert not guard.check({"loss": torch.tensor(0.5), "reward": torch.tensor([1.0, math.nan])}, step=1)
    assert "non-finite reward" in caplog.text
    assert not guard.check(math.inf, step=2)
    assert guard.check(torch.tensor([0.1, 0.2]), step=3)  # a finite step resets the run of failures
    assert guard.consecutive_nonfinite == 0 and guard.skipped_total == 2
    assert not guard.check(torch.tensor(math.nan), step=4)
    assert not guard.check(torch.tensor(math.nan), step=5)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss"):
        guard.check(torch.tensor(-math.inf), step=6)


def test_state_round_trip_and_validation():
    guard = TrainingGuard(install=False)
    guard.check(torch.tensor(math.nan), step=0)
    other = TrainingGuard(install=False)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == {"consecutive_nonfinite": 1, "skipped_total": 1}
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        TrainingGuard(max_consecutive_nonfinite=0, install=False)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_bit_identically(tmp_path):
    """A run killed with SIGTERM saves a checkpoint and exits 0; resuming reaches the uninterrupted weights."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from accelerate.state import AcceleratorState, GradientState

    root = Path(__file__).resolve().parents[1]
    script = root / "tests" / "dist_scripts" / "sigterm_train.py"
    total, delay_s = 8, 0.3
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(total), str(delay_s)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(next(l for l in out.splitlines() if l.startswith("stopped")).split()[1])
    assert 2 <= stopped < total and not (tmp_path / "final.pt").exists()

    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(total)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == f"start {stopped}"

    spec = importlib.util.spec_from_file_location("sigterm_train", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator, model, optimizer = module.setup()
    for step in range(total):
        module.train_step(accelerator, model, optimizer, step)
    want = module.weights(accelerator, model)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    got = torch.load(tmp_path / "final.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
