"""rlkit bench: the FLOP and activation counters against hand counts, the SD3.5-M cost model against the
paper's direction (DiNa-LRM cheaper than decode + HPSv3), a measured tiny ReFL step, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlkit.flops import SavedActivations, count_flops, pass_cost

B, L, D, H = 2, 16, 32, 4


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


def test_linear_flops_by_hand():
    with torch.device("meta"):
        layer = nn.Linear(64, 32).requires_grad_(False)
        x = torch.empty(8, 64, requires_grad=True)
    cost = pass_cost(lambda: layer(x), [x], (layer,))
    assert cost.forward_flops == 2 * 8 * 64 * 32  # one multiply-add = 2 FLOPs
    assert cost.backward_flops == 2 * 8 * 32 * 64  # dx = dy W: the frozen weight gets no gradient


def test_attention_block_flops_by_hand():
    with torch.device("meta"):
        block = AttentionBlock().requires_grad_(False)
        x = torch.empty(B, L, D, requires_grad=True)
    projections = 2 * B * L * D * 3 * D + 2 * B * L * D * D
    attention = 2 * (2 * B * H * L * L * (D // H))  # QK^T and PV
    cost = pass_cost(lambda: block(x), [x], (block,))
    assert cost.forward_flops == projections + attention
    assert cost.backward_flops == projections + 2 * attention  # dQ, dK, dV, dP: four matmuls
    # real CPU tensors take the fused kernel, which the counter does not see: hence the meta device
    real = AttentionBlock().requires_grad_(False)
    _, cpu = count_flops(lambda: real(torch.randn(B, L, D)))
    assert cpu == projections


def test_saved_activations_by_hand():
    x = torch.randn(3, 5, requires_grad=True)
    w = nn.Parameter(torch.randn(5, 5))
    with SavedActivations() as saved:
        y = x.sin().exp()  # sin keeps x, exp keeps its output
    assert saved.bytes == 2 * x.numel() * x.element_size()
    with SavedActivations() as saved:
        (x @ w).sum()  # keeps x (for dW) and w (a weight, not an activation)
    assert saved.bytes == x.numel() * x.element_size()
    del y


def test_flash_attention_activations_by_hand():
    with torch.device("meta"):
        block = AttentionBlock().requires_grad_(False)
        x = torch.empty(B, L, D, requires_grad=True)
    flash = pass_cost(lambda: block(x), [x], (block,), attention="flash")
    math = pass_cost(lambda: block(x), [x], (block,), attention="math")
    # the qkv output (q, k, v are views of it) and the attention output, fp32, plus one fp32 log-sum-exp per
    # query row and head; the frozen projections keep nothing (autograd saves a matmul input only when the other
    # operand needs a gradient)
    assert flash.activation_bytes == 4 * 4 * B * L * D + 4 * B * H * L
    # the math kernel (what meta tensors run) keeps q, k, v and the L x L probabilities instead
    assert math.activation_bytes == 4 * 3 * B * L * D + 4 * B * H * L * L
    assert (flash.forward_flops, flash.backward_flops) == (math.forward_flops, math.backward_flops)


@pytest.fixture(scope="module")
def bench_512():
    from rlkit.bench import run_bench

    return run_bench((512,), measure=False)


def test_sd35_costs_follow_the_paper_direction(bench_512):
    calls = {c.reward: c for c in bench_512.reward_calls}
    dina, k3, hps, pick = calls["dina-lrm"], calls["dina-lrm-k3"], calls["decode+hpsv3"], calls["decode+pickscore"]
    assert 1.2e9 < dina.params < 1.6e9 and 7.5e9 < hps.params < 8.5e9  # 12 SD3.5-M blocks; Qwen2-VL-7B + VAE
    assert dina.own_params < 0.15 * dina.params  # sharing: only LoRA (rank 64) + head are the reward's own
    for field in ("forward_flops", "backward_flops", "activation_bytes"):
        assert getattr(dina, field) < getattr(hps, field) / 3, field
        assert getattr(k3, field) == pytest.approx(3 * getattr(dina, field), rel=0.05), field
    assert pick.forward_flops < hps.forward_flops
    plans = {(p.plan, p.reward, p.backbone): p for p in bench_512.plans}
    shared, separate = plans[("refl_step", "dina-lrm", "shared")], plans[("refl_step", "dina-lrm", "separate")]
    hps_step = plans[("refl_step", "decode+hpsv3", "-")]
    assert shared.peak_bytes < separate.peak_bytes < hps_step.peak_bytes
    assert separate.peak_bytes - shared.peak_bytes == 2 * (dina.params - dina.own_params)  # bf16 backbone copy
    assert shared.reward_flops < hps_step.reward_flops and shared.update_flops < hps_step.update_flops
    fig = bench_512.figure4["512"]
    assert fig["peak_memory"] < -0.3 and fig["reward_flops"] < -0.5 and fig["update_flops"] < -0.3
    grpo = {p.plan: p.total_flops for p in bench_512.plans if p.reward == "dina-lrm" and p.backbone == "shared"}
    assert grpo["grpo_fast_window_end"] < grpo["grpo_fast"] < grpo["grpo_flow_grpo"]


def test_measured_tiny_refl_step():
    import tempfile
    from pathlib import Path

    from rlkit.bench import measure_refl

    with tempfile.TemporaryDirectory() as tmp:
        rows = {m.variant: m for m in measure_refl("cpu", 1, Path(tmp))}
    assert set(rows) == {"latent-direction", "dina-lrm (shared)", "decode+pickscore"}
    assert all(m.seconds > 0 and m.activation_bytes > 0 for m in rows.values())
    # the pixel reward keeps the VAE decoder's activations for its backward pass; the latent reward does not
    assert rows["latent-direction"].activation_bytes < rows["decode+pickscore"].activation_bytes
    assert rows["decode+pickscore"].ratio_time == 1.0


def test_cli_table_and_json(bench_512, tmp_path, monkeypatch, capsys):
    import rlkit.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: bench_512)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decode+hpsv3" in text and "paper Figure 4" in text and "Cost model" in text
    data = json.loads(out.read_text())
    assert {"reward_calls", "plans", "figure4", "paper_figure4", "cost_model"} <= set(data)
    assert data["paper_figure4"]["peak_memory"] == pytest.approx(-0.514)
