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


def test_saved_activations_are_a_peak_over_passes_and_kept_alive_by_nothing():
    """Five forward-backward passes (a training epoch) keep what one pass keeps, not five times it; the meter holds
    no reference to what it counted."""
    import gc
    import weakref

    x = torch.randn(64, 64, requires_grad=True)
    with SavedActivations() as one:
        x.sin().exp().sum().backward()
    kept = []
    with SavedActivations() as five:
        for _ in range(5):
            y = x.sin().exp()
            kept.append(weakref.ref(y))  # exp saves its output
            y.sum().backward()
            del y
    gc.collect()
    assert one.bytes == 2 * x.numel() * x.element_size() and five.bytes == one.bytes
    assert all(ref() is None for ref in kept)


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


def test_the_rewards_shared_blocks_are_counted_without_the_policys_adapter(bench_512):
    """A separate copy of DiNa-LRM's blocks carries their base weights, not the policy LoRA that sits on them."""
    from rewards.dina_lrm import DiNaLRM, DiNaLRMConfig
    from rlkit.bench import _meta_transformer

    dina = {c.reward: c for c in bench_512.reward_calls}["dina-lrm"]
    with torch.device("meta"):
        model = DiNaLRM.build(DiNaLRMConfig(), _meta_transformer(torch.bfloat16))  # no policy adapter on it
    lora = sum(p.numel() for p in model.lora_parameters())
    assert dina.params - dina.own_params == sum(p.numel() for p in model.tapped_backbone.parameters()) - lora


def test_plan_costs_count_what_the_shipped_recipes_run(bench_512):
    """Call counts by hand from the SD3.5-M recipes: Flow-GRPO (flow_grpo_sd35.yaml) trains 9 of its 10 steps (not
    the grid's last) at CFG 4.5 with a KL reference forward; -Fast 3 steps at CFG 1; DiNa-LRM reads the generator's
    77 + 256 text tokens; the generator carries the policy LoRA."""
    from rlkit.bench import FAST_RECIPE, FLOW_GRPO_RECIPE, grpo_recipes
    from rlkit.confload import shipped_recipe
    from rlkit.config import load_recipe

    flow, fast = (load_recipe(shipped_recipe(name)).flow_grpo for name in (FLOW_GRPO_RECIPE, FAST_RECIPE))
    assert grpo_recipes()["flow_grpo"] == flow and grpo_recipes()["fast"].window_size == fast.window_size
    step = bench_512.generator[0]
    plans = {p.plan: p for p in bench_512.plans if p.reward == "dina-lrm" and p.backbone == "shared"}
    fwd, bwd = step["forward_flops"], step["backward_flops"]
    assert (flow.num_steps, flow.window_size, flow.guidance_scale, flow.inner_epochs) == (10, 10, 4.5, 1)
    assert plans["grpo_flow_grpo"].update_flops == pytest.approx(9 * 2 * (2 * fwd + bwd))
    assert (fast.window_size, fast.guidance_scale, fast.inner_epochs) == (3, 1.0, 1) and fast.kl_beta > 0
    assert plans["grpo_fast"].update_flops == pytest.approx(3 * (2 * fwd + bwd))
    # both CFG branches run as one batch with gradient: twice one call's activations
    assert plans["grpo_flow_grpo"].peak_bytes - plans["grpo_fast"].peak_bytes == pytest.approx(
        step["activation_bytes"])

    from rewards.dina_lrm.flops import CLIP_TOKENS
    from rlkit.bench import _meta_transformer, _sd3_inputs

    refl = load_recipe(shipped_recipe("refl_sd35.yaml"))
    tokens = CLIP_TOKENS + refl.model.max_sequence_length
    assert tokens == 333
    base = _meta_transformer(torch.bfloat16)
    _, text = _sd3_inputs(base, 512, tokens, torch.bfloat16)
    assert text.encoder_hidden_states.shape[1] == 333
    dina = [c for c in bench_512.reward_calls if c.reward == "dina-lrm"][0]
    assert 1.4e12 < dina.forward_flops < 1.5e12  # 1.34e12 when sized with DiNa-LRM's own 77 + 128 tokens
    policy_lora = step["params"] - sum(p.numel() for p in base.parameters())
    assert refl.lora.enabled and 1e6 < policy_lora < 0.05 * step["params"]  # the base and the policy's adapter


def test_the_paper_figure_is_printed_at_its_own_resolution_only(bench_512):
    from rlkit.bench import format_table

    line = [x for x in format_table(bench_512).splitlines() if x.startswith("  512px:")][0]
    assert "| -51.4%" not in line and "peak_memory" in line and line.count("| -") == 4


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

    calls = []
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: calls.append((a, k)) or bench_512)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    assert calls == [(((512,),), {"measure": True, "device": "cpu", "repeats": 1, "grpo": False})]
    text = capsys.readouterr().out
    assert "decode+hpsv3" in text and "paper Figure 4" in text and "Cost model" in text
    data = json.loads(out.read_text())
    assert {"reward_calls", "plans", "figure4", "paper_figure4", "cost_model"} <= set(data)
    assert data["paper_figure4"]["peak_memory"] == pytest.approx(-0.514)


def test_a_measured_step_is_timed_without_the_activation_meter(monkeypatch):
    import contextlib

    import rlkit.bench as bench

    active = []
    metered = []

    @contextlib.contextmanager
    def meter():
        active.append(True)
        yield type("Saved", (), {"bytes": 123})()
        active.pop()

    monkeypatch.setattr(bench, "SavedActivations", meter)
    seconds, _, saved = bench._measure(lambda: metered.append(bool(active)), "cpu")
    assert metered == [True, False] and saved == 123 and seconds >= 0  # counted first, then timed bare
    metered.clear()
    assert bench._measure(lambda: metered.append(bool(active)), "cpu", activations=False)[2] == 0
    assert metered == [False]


def test_flash_activations_of_a_transformer_are_the_same_on_meta_and_on_cpu():
    """A fused kernel keeps q, k and v until the backward; on meta tensors the math kernel runs and may free them as
    soon as it returns, so the meter holds them until the block ends (it had counted 123,680 bytes for 150,816)."""
    from rlkit.models.tiny import TinySD3Config, build_tiny_sd3_components

    cfg = TinySD3Config()
    transformer = build_tiny_sd3_components(cfg, seed=0)["transformer"].requires_grad_(False)
    meta = build_tiny_sd3_components(cfg, seed=0)["transformer"].to("meta").requires_grad_(False)
    sizes = {}
    for name, model in (("cpu", transformer), ("meta", meta)):
        c = model.config
        with torch.device(name):
            x = torch.zeros(1, c.in_channels, c.sample_size, c.sample_size, requires_grad=True)
            text = torch.zeros(1, 5, c.joint_attention_dim)
            pooled = torch.zeros(1, c.pooled_projection_dim)
            t = torch.full((1,), 500.0)

        def call(model=model, x=x, text=text, pooled=pooled, t=t):
            return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                         return_dict=False)[0]

        sizes[name] = pass_cost(call, [x], (model,), attention="flash").activation_bytes
    assert sizes["meta"] == sizes["cpu"] > 0
