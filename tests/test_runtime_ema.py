"""EMA of trainable weights: hand-computed values, update_every, swap/applied, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlkit.runtime.ema import EMA

DECAY = 0.9


def _param(*values: float, dtype=torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=dtype))


def test_ema_equals_hand_computed_value_and_respects_update_every():
    p = _param(0.0, 10.0)
    ema = EMA([p], decay=DECAY, update_every=2)
    trajectory = [1.0, 2.0, 3.0, 4.0]
    done = []
    for value in trajectory:
        with torch.no_grad():
            p.fill_(value)
        done.append(ema.update())
    assert done == [False, True, False, True]
    # updates at values 2 and 4: s1 = .9*[0,10] + .1*2 ; s2 = .9*s1 + .1*4
    s1 = DECAY * torch.tensor([0.0, 10.0]) + (1 - DECAY) * 2.0
    s2 = DECAY * s1 + (1 - DECAY) * 4.0
    torch.testing.assert_close(ema.shadow[0], s2)
    assert ema.num_updates == 2 and not torch.equal(ema.shadow[0], torch.tensor([0.0, 10.0]))


def test_applied_swaps_in_ema_weights_and_restores_after_exception():
    p = _param(1.0, 2.0, dtype=torch.bfloat16)
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update()  # shadow = [2, 2.5]
    assert ema.shadow[0].dtype == torch.float32
    with ema.applied():
        assert p.tolist() == [2.0, 2.5]
    assert p.tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError):
        with ema.applied():
            raise RuntimeError("eval failed")
    assert p.tolist() == [3.0, 3.0]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([2.0, 2.5]))


def test_applying_bf16_weights_leaves_the_float32_average_exact():
    """The swap back used to store the rounded copy it had written into the parameter as the average."""
    p = _param(1.0, 2.0, dtype=torch.bfloat16)
    ema = EMA([p], decay=0.5)
    ema.shadow[0].copy_(torch.tensor([1.0 + 2**-12, 2.0 - 2**-11]))  # finer than bf16's 2^-7 steps near 1
    average = ema.shadow[0].clone()
    for _ in range(3):
        with ema.applied():
            assert p.tolist() == [1.0, 2.0]  # what bf16 holds of the average
    assert torch.equal(ema.shadow[0], average) and p.tolist() == [1.0, 2.0]


def test_ema_tracks_a_training_run_and_state_round_trips():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model.parameters(), decay=DECAY)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    for shadow, live, init in zip(ema.shadow, model.parameters(), start):
        assert not torch.equal(shadow, init) and not torch.equal(shadow, live.detach())
    other = EMA(model.parameters(), decay=DECAY)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.shadow, ema.shadow):
        assert torch.equal(a, b)
    assert other.num_updates == 5
    with pytest.raises(ValueError, match="tensors saved"):
        EMA([nn.Parameter(torch.zeros(1))], decay=DECAY).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(model.parameters(), decay=1.5)
