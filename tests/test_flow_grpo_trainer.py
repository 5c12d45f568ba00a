"""Flow-GRPO / -Fast trainer on a tiny SD3 model with a latent reward (CPU)."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlkit.config import FlowGRPOConfig, load_recipe, recipe_from_dict
from rlkit.grpo import group_advantages, mixed_advantages
from rlkit.trainers.flow_grpo import (
    compute_advantages,
    epoch_cost,
    epoch_layout,
    plan_epoch,
    rollout_epoch,
    train_update,
    trained_positions,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top left", "a blue square at the center", "a green triangle at the bottom",
           "a yellow cross at the right", "a red square at the bottom right", "a blue circle at the top"]
RECIPES = ["flow_grpo_fast_sd35.yaml", "flow_grpo_sd35.yaml", "flow_grpo_fast_sd35_hpsv3.yaml",
           "flow_grpo_fast_sd35_pickscore.yaml", "flow_grpo_shapes.yaml"]


def tiny_recipe(tmp_path: Path, model_dir: Path, flow_grpo: dict | None = None, **top) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    recipe = {
        "algorithm": "flow_grpo",
        "name": "tiny",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "model": {"pretrained": str(model_dir), "resolution": 32, "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8},
        "rewards": [{"name": "latent-direction", "args": {"seed": 1, "scale": 10.0}}],
        "prompts": {"source": str(prompts)},
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "grad_clip": 10.0},
        "flow_grpo": {"num_steps": 6, "sde": "cps", "noise_level": 0.8, "window_size": 2,
                      "window_start_range": [0, 2], "group_size": 4, "prompts_per_epoch": 2, "batch_size": 4,
                      "updates_per_epoch": 1, "clip_range": 1e-2, "max_epochs": 2, **(flow_grpo or {})},
        "eval": {"prompts": str(prompts), "num_prompts": 2, "num_steps": 4, "batch_size": 2, "grid_images": 2},
        "logging": {"backends": ["jsonl"], "progress": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    }
    recipe.update(top)
    return recipe


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inert(transformer, name: str) -> bool:
    """The last SD3 block discards its context stream (``context_pre_only``): its query projection cannot
    change the velocity, so its LoRA gets no gradient."""
    return name.startswith(f"transformer_blocks.{len(transformer.transformer_blocks) - 1}.attn.add_q_proj.")


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- arithmetic and advantages (no model) ---------------------------------------------------------------------
def test_plan_epoch_derives_accumulation_from_world_size_and_names_bad_keys():
    cfg = FlowGRPOConfig(num_steps=10, window_size=3, window_start_range=(0, 4), group_size=18, prompts_per_epoch=48,
                         batch_size=9, updates_per_epoch=2)
    for world, batches in [(1, 96), (2, 48), (8, 12)]:
        plan = plan_epoch(cfg, world)
        assert plan.batches_per_rank == batches and plan.train_steps == 3
        assert plan.grad_accum == batches // 2 * 3 and plan.updates_per_epoch == 2
    with pytest.raises(ValueError, match="over 5 processes"):
        plan_epoch(cfg, 5)
    with pytest.raises(ValueError, match="flow_grpo.updates_per_epoch"):
        plan_epoch(cfg, 32)  # 27 images per process: 3 batches for 2 updates
    with pytest.raises(ValueError, match="flow_grpo.batch_size"):
        plan_epoch(replace(cfg, batch_size=7), 1)
    # full window: every step stochastic, the last one (a sharp Gaussian) not trained
    full = replace(cfg, window_size=10, window_start_range=(0, 0))
    assert trained_positions(full, 0) == list(range(9)) and plan_epoch(full, 8).grad_accum == 6 * 9
    assert trained_positions(replace(full, sde="sde", train_last_step=True), 0) == list(range(10))


def test_window_rules_in_config():
    from rlkit.config import ConfigError

    base = {"algorithm": "flow_grpo", "rewards": [{"name": "latent-direction"}]}
    with pytest.raises(ConfigError, match="window_start_range"):
        recipe_from_dict({**base, "flow_grpo": {"num_steps": 10, "window_size": 3, "window_start_range": [5, 7]}})
    with pytest.raises(ConfigError, match="train_last_step"):
        recipe_from_dict({**base, "flow_grpo": {"sde": "cps", "train_last_step": True, "window_size": 10,
                                                "window_start_range": [0, 0]}})
    for level in (0.0, -0.1):  # no noise: every log-prob would be 0 and every ratio 1, a run that trains nothing
        with pytest.raises(ConfigError, match=r"flow_grpo\.noise_level: must be > 0"):
            recipe_from_dict({**base, "flow_grpo": {"noise_level": level}})


def test_epoch_layout_repeats_each_prompt_group_size_times_and_shuffles_across_ranks():
    cfg = FlowGRPOConfig(group_size=4, prompts_per_epoch=3)
    prompt_idx, groups = epoch_layout(5, cfg, seed=0, epoch=2)
    assert torch.equal(torch.bincount(groups), torch.full((3,), 4))
    for g in range(3):  # one prompt per group, three different prompts
        assert prompt_idx[groups == g].unique().numel() == 1
    assert prompt_idx.unique().numel() == 3
    again = epoch_layout(5, cfg, seed=0, epoch=2)
    assert torch.equal(again[0], prompt_idx) and torch.equal(again[1], groups)
    halves = groups[:6], groups[6:]
    assert set(halves[0].tolist()) & set(halves[1].tolist()), "a group spans the two ranks' halves"


def test_advantage_mix_and_statistics():
    cfg = FlowGRPOConfig(std="group", adv_clip=5.0)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    a = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    b = torch.tensor([5.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    adv, stats = compute_advantages({"reward": a + 0.2 * b, "a": a, "b": b}, groups, cfg, {"a": 1.0, "b": 0.2})
    torch.testing.assert_close(adv, mixed_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.2}, groups, std="group"))
    assert stats["zero_std_fraction"] == 0.0  # group 1 ties on `a` but not on `b`
    adv, stats = compute_advantages({"reward": a}, groups, cfg, None)
    torch.testing.assert_close(adv, group_advantages(a, groups, std="group"))
    assert stats["zero_std_fraction"] == pytest.approx(1 / 3) and adv[2:4].eq(0).all()
    assert stats["reward/mean"] == pytest.approx(2.0)
    assert stats["reward/std"] == pytest.approx(a.std(correction=0).item())


# -- rollout cost and window_end ------------------------------------------------------------------------------
def test_window_end_reward_skips_the_remaining_steps(tiny_sd3_dir, monkeypatch):
    """Transformer calls: Flow-GRPO rolls out and trains every step, Fast trains the window only, Fast with
    ``reward_at: window_end`` also stops the rollout at the window's end."""
    import rewards
    from rlkit.models.sd3 import SD3Generator

    torch.set_num_threads(1)
    decodes = []
    monkeypatch.setattr(SD3Generator, "decode", lambda self, z: decodes.append(z.shape[0]))
    reward = rewards.build("latent-direction", seed=1)
    cfg = FlowGRPOConfig(num_steps=6, window_size=2, window_start_range=(1, 1), group_size=2, prompts_per_epoch=2,
                         batch_size=2, updates_per_epoch=1, clip_range=1e-2)
    costs = {}
    for name, variant in {"flow_grpo": replace(cfg, window_size=6, window_start_range=(0, 0)), "fast": cfg,
                          "fast_window_end": replace(cfg, reward_at="window_end")}.items():
        gen = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
        costs[name] = epoch_cost(gen, reward, variant, PROMPTS, resolution=32)
    batches = 2
    assert costs["flow_grpo"].rollout_calls == batches * 6 and costs["flow_grpo"].update_calls == batches * 5
    assert costs["fast"].rollout_calls == batches * 6 and costs["fast"].update_calls == batches * 2
    assert costs["fast_window_end"].rollout_calls == batches * 3  # window [1, 3): steps 0, 1, 2 only
    assert costs["fast_window_end"].update_calls == batches * 2
    assert decodes == [], "a latent reward never decodes"
    print({k: (round(c.rollout_s, 3), round(c.update_s, 3)) for k, c in costs.items()})

    class PixelReward(torch.nn.Module):
        noise_aware = False

    from rlkit.trainers.flow_grpo import check_reward

    with pytest.raises(ValueError, match="not noise-aware"):
        check_reward(PixelReward(), replace(cfg, reward_at="window_end"))


def test_advantage_mix_normalises_each_reward_and_decodes_once_per_batch(tiny_generator, monkeypatch):
    """``reward_mix: advantage`` with a latent and a pixel reward: each reward's advantages are normalised on
    their own and weighted; the pixel reward decodes each batch once, the latent reward alone never decodes."""
    from rlkit.config import RewardSpec
    from rlkit.models.lora import add_lora
    from rlkit.models.sd3 import SD3Generator
    from rlkit.trainers.common import build_reward
    from rlkit.trainers.flow_grpo import LocalRun

    torch.set_num_threads(1)
    decodes = []
    original = SD3Generator.decode
    monkeypatch.setattr(SD3Generator, "decode", lambda self, z: decodes.append(z.shape[0]) or original(self, z))
    gen = tiny_generator
    gen.transformer.requires_grad_(False)
    add_lora(gen.transformer, "policy", 4, 8.0, init="gaussian")
    cfg = FlowGRPOConfig(num_steps=4, window_size=1, window_start_range=(0, 1), group_size=2, prompts_per_epoch=2,
                         batch_size=2, updates_per_epoch=1, std="group", reward_mix="advantage")
    plan = plan_epoch(cfg, 1)

    def epoch(specs: list[RewardSpec]):
        reward = build_reward(specs, gen)
        run = LocalRun(gen=gen, model=gen.transformer, reward=reward, prompts=PROMPTS,
                       optimizer=torch.optim.SGD([p for p in gen.transformer.parameters() if p.requires_grad], lr=0.0),
                       grad_accum=plan.grad_accum)
        return rollout_epoch(run, cfg, plan, 0, 0, 32)

    latent = RewardSpec("latent-direction", 1.0, {"seed": 1})
    alone = epoch([latent])
    assert decodes == []
    mixed = epoch([latent, RewardSpec("shapes-golden", 0.2, {"mode": "fraction"})])
    assert decodes == [cfg.batch_size] * plan.batches_per_rank, "one decode per batch, shared by the pixel reward"
    groups = epoch_layout(len(PROMPTS), cfg, 0, 0)[1]
    scores = {k: v for k, v in mixed.all_scores.items() if k != "reward"}
    assert set(scores) == {"latent-direction", "shapes-golden"}
    torch.testing.assert_close(scores["latent-direction"], alone.all_rewards)
    expected = mixed_advantages(scores, {"latent-direction": 1.0, "shapes-golden": 0.2}, groups, std="group")
    torch.testing.assert_close(mixed.all_advantages, expected)


def test_cfg_training_recomputes_the_rollout_log_probs_exactly(tiny_generator):
    """Flow-GRPO with CFG (doubled batch) and flow-SDE on every step: the training forward reproduces the
    rollout's log-probs bit for bit and its gradient reaches the LoRA. By default (as upstream trains) it flows
    through the conditional branch alone; ``cfg_uncond_grad`` adds the unconditional one, which changes the update
    but not the conditional branch's share of it."""
    from dataclasses import replace

    from rewards.base import TextConditioning
    from rlkit.models.lora import add_lora
    from rlkit.rollout import step_log_probs
    from rlkit.trainers.common import reference_context
    from rlkit.trainers.flow_grpo import LocalRun, step_loss
    import rewards

    torch.set_num_threads(1)
    gen = tiny_generator
    gen.transformer.requires_grad_(False)
    add_lora(gen.transformer, "policy", 4, 8.0, init="random")
    cfg = FlowGRPOConfig(num_steps=4, sde="sde", noise_level=0.7, window_size=4, window_start_range=(0, 0),
                         group_size=2, prompts_per_epoch=1, batch_size=2, updates_per_epoch=1, guidance_scale=3.0,
                         kl_beta=0.5)
    assert not cfg.cfg_uncond_grad
    plan = plan_epoch(cfg, 1)
    params = [p for p in gen.transformer.parameters() if p.requires_grad]
    run = LocalRun(gen=gen, model=gen.transformer, reward=rewards.build("latent-direction", seed=1), prompts=PROMPTS,
                   optimizer=torch.optim.SGD(params, lr=0.0), grad_accum=plan.grad_accum)
    data = rollout_epoch(run, cfg, plan, 0, 0, 32)
    ro = data.batches[0]
    assert ro.negative_text is not None and trained_positions(cfg, 0) == [0, 1, 2]
    # the prompt embeddings as leaves, to see which CFG branch the gradient went through
    ro.text, ro.negative_text = (TextConditioning(t.encoder_hidden_states.clone().requires_grad_(),
                                                  t.pooled_projections.clone().requires_grad_())
                                 for t in (ro.text, ro.negative_text))
    grads = {}
    for both in (False, True):
        setting = replace(cfg, cfg_uncond_grad=both)
        for t in (ro.text, ro.negative_text, *params):
            for leaf in ((t,) if isinstance(t, torch.Tensor) else (t.encoder_hidden_states, t.pooled_projections)):
                leaf.grad = None
        for j in trained_positions(cfg, 0):
            out = step_log_probs(gen, ro, j, transformer=gen.transformer)
            assert torch.equal(out.log_prob.detach(), ro.log_probs[:, j])
            loss, stats = step_loss(gen, gen.transformer, ro, j, data.advantages[0], data.keep[0], data.informative,
                                    setting, reference_context(run))
            assert stats["ratio_dev_max"] == 0.0 and stats["kl"] > 0  # a random LoRA moves the policy off the base
            loss.backward()
        missing = [n for n, p in gen.transformer.named_parameters()
                   if p.requires_grad and not inert(gen.transformer, n) and (p.grad is None or p.grad.abs().sum() == 0)]
        assert not missing, missing
        grads[both] = (ro.text.encoder_hidden_states.grad.clone(), ro.negative_text.encoder_hidden_states.grad,
                       torch.cat([p.grad.flatten() for p in params]))
    (cond_only, uncond_only, lora_only), (cond_both, uncond_both, lora_both) = grads[False], grads[True]
    assert uncond_only.abs().sum() == 0 and uncond_both.abs().sum() > 0  # one doubled forward: zeros, not None
    torch.testing.assert_close(cond_only, cond_both, rtol=1e-5, atol=1e-9)
    assert (lora_only - lora_both).norm() > 0.01 * lora_both.norm()


# -- the trainer on one process -------------------------------------------------------------------------------
def _assert_kl_term_in_the_loss(run, ro, adv, data, cfg) -> None:
    """step_loss at kl_beta 0 and 0.5, same batch: the losses differ by 0.5 * KL / informative, and the
    gradients differ."""
    from rlkit.trainers.common import reference_context
    from rlkit.trainers.flow_grpo import step_loss

    params = [p for p in run.model.parameters() if p.requires_grad]
    j = trained_positions(cfg, int(ro.step_indices[0, 0]))[0]
    results = {}
    for beta in (0.0, 0.5):
        loss, stats = step_loss(run.gen, run.model, ro, j, adv, data.keep[0], data.informative,
                                replace(cfg, kl_beta=beta), reference_context(run))
        results[beta] = loss.detach(), torch.autograd.grad(loss, params, allow_unused=True), stats
    (loss0, grads0, _), (loss1, grads1, stats1) = results[0.0], results[0.5]
    assert data.keep[0].bool().all()  # every image informative: the kept mean is the logged mean
    assert stats1["kl"] > 0
    assert (loss1 - loss0).item() == pytest.approx(0.5 * stats1["kl"].item() / data.informative, rel=1e-3)
    moved = [(a - b).norm().item() for a, b in zip(grads1, grads0) if a is not None and b is not None]
    assert max(moved) > 0, "kl_beta > 0 changed no gradient"


def test_on_policy_ratio_is_one_and_kl_is_zero_then_positive(tmp_path, tiny_sd3_dir):
    """One batch per update: the recomputed log-probs equal the rollout's bit for bit (ratio exactly 1, the
    clipped loss equals the unclipped one), also after the policy has moved; the KL to the LoRA-disabled
    reference is exactly 0 before the first update and positive after it."""
    from rlkit.rollout import step_log_probs
    from rlkit.trainers.flow_grpo import LocalRun  # noqa: F401  (the trainer path below uses PolicyRun)
    from rlkit.trainers.loop import PolicyRun

    torch.set_num_threads(1)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, {"prompts_per_epoch": 1, "kl_beta": 0.1}))
    cfg = recipe.flow_grpo
    plan = plan_epoch(cfg, 1)
    assert plan.batches_per_rank == 1 and plan.grad_accum == 2
    run = PolicyRun.setup(recipe, total_updates=2, micro_batch=cfg.batch_size, grad_accum=plan.grad_accum)
    initial = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    kls = []
    for epoch in range(2):
        data = rollout_epoch(run, cfg, plan, epoch, recipe.seed, 32)
        ro, adv = data.batches[0], data.advantages[0]
        assert adv.abs().sum() > 0
        with torch.no_grad():
            for j in trained_positions(cfg, int(ro.step_indices[0, 0])):
                out = step_log_probs(run.gen, ro, j, transformer=run.model)
                assert torch.equal(out.log_prob, ro.log_probs[:, j]), "recomputed log-probs differ from the rollout's"
        if epoch == 1:  # the policy is off the reference: kl_beta * KL is in the loss and in its gradient
            _assert_kl_term_in_the_loss(run, ro, adv, data, cfg)
        stats = train_update(run, cfg, plan, data, epoch, 0, recipe.seed)
        assert stats["ratio_dev_max"] == 0.0 and stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == 1.0
        # ratio 1: the clipped surrogate is -mean(A), the unclipped one
        assert stats["policy_loss"] == pytest.approx(-adv.mean().item(), abs=1e-7)
        kls.append(stats["kl"])
        run.end_update(stats)
    assert kls[0] == 0.0 and kls[1] > 0.0, kls
    unchanged = [n for n, p in run.model.named_parameters()
                 if p.requires_grad and not inert(run.model, n) and torch.equal(p, initial[n])]
    assert not unchanged, unchanged  # lora_B moves in the first update, lora_A (B was 0) in the second


def test_dina_lrm_sharing_the_policy_blocks_at_window_end(tmp_path, tiny_sd3_dir):
    """The release's set-up on the tiny model: DiNa-LRM is a second adapter on the policy's own blocks and scores
    the window-end state at its own sigma (``mode: state``); the reward's adapter switch leaves the policy intact
    (ratio exactly 1, KL 0 to the LoRA-disabled model before the first update) and only the policy LoRA trains."""
    from rewards.dina_lrm import DiNaLRMConfig
    from rewards.dina_lrm.reward import DiNaLRMReward
    from rewards.base import RewardInput
    from rlkit.trainers.loop import PolicyRun

    torch.set_num_threads(1)
    rm = DiNaLRMReward(config=DiNaLRMConfig(num_transformer_layers=3, visual_head_idx=(1, 2, 3), text_head_idx=(2, 3),
                                            lora_r=4, lora_alpha=8, lora_init="random", num_attn_heads=4,
                                            num_queries=2, max_sequence_length=16), base_model=str(tiny_sd3_dir))
    rm.raw_scores(RewardInput(prompts=PROMPTS[:1], latents=torch.zeros(1, 4, 8, 8),
                              generator=torch.Generator().manual_seed(0)))  # materialises the backbone
    with torch.no_grad():  # the head's zero-initialised layers random, so the score varies with the latents
        for p in rm.model.reward_head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    folder = rm.save_pretrained(tmp_path / "rm")
    spec = tiny_recipe(tmp_path, tiny_sd3_dir, {"prompts_per_epoch": 1, "kl_beta": 0.1, "reward_at": "window_end"},
                       rewards=[{"name": "dina-lrm", "args": {"pretrained": str(folder), "mode": "state",
                                                              "share_backbone": "always"}}])
    recipe = recipe_from_dict(spec)
    cfg = recipe.flow_grpo
    plan = plan_epoch(cfg, 1)
    run = PolicyRun.setup(recipe, total_updates=1, micro_batch=cfg.batch_size, grad_accum=plan.grad_accum)
    assert run.reward.is_shared
    rm_weights = {n: p.detach().clone() for n, p in run.model.named_parameters() if ".rm_lora." in n}
    assert rm_weights and not any(p.requires_grad for n, p in run.model.named_parameters() if ".rm_lora." in n)
    data = rollout_epoch(run, cfg, plan, 0, recipe.seed, 32)
    # the rollout stopped at the window end
    assert data.batches[0].stopped_at == data.batches[0].step_indices[0, -1] + 1
    assert data.all_rewards.std() > 0
    stats = train_update(run, cfg, plan, data, 0, 0, recipe.seed)
    assert stats["ratio_dev_max"] == 0.0 and stats["kl"] == 0.0
    run.end_update(stats)
    moved = {n for n, p in run.model.named_parameters() if ".policy." in n and "lora_B" in n and p.abs().sum() > 0}
    assert moved and all(torch.equal(p, rm_weights[n]) for n, p in run.model.named_parameters() if n in rm_weights)


@pytest.mark.slow
def test_reward_rises_over_cpu_epochs(tmp_path, tiny_sd3_dir):
    from rlkit.trainers import flow_grpo

    torch.set_num_threads(1)
    epochs = 12
    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, {"max_epochs": epochs, "prompts_per_epoch": 4,
                                                                   "batch_size": 8, "updates_per_epoch": 2},
                                          optim={"lr": 3e-2, "weight_decay": 0.0, "grad_clip": 10.0}))
    flow_grpo.train(recipe)
    log = [r for r in read_log(recipe.run_dir) if "train/reward/mean" in r]
    curve = [r["train/reward/mean"] for r in log[::2]]  # two updates per epoch log the same rollout
    assert len(curve) == epochs
    print("Flow-GRPO-Fast reward curve:", " ".join(f"{x:.3f}" for x in curve))
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.1, f"reward did not rise: {first:.3f} -> {last:.3f}"
    assert (recipe.run_dir / "export").is_dir()


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_equals_the_uninterrupted_run(tmp_path, tiny_sd3_dir):
    from safetensors.torch import load_file

    from rlkit.trainers import flow_grpo

    torch.set_num_threads(1)
    (tmp_path / "a").mkdir()
    full = recipe_from_dict(tiny_recipe(tmp_path / "a", tiny_sd3_dir, {"max_epochs": 2, "kl_beta": 0.1}))
    flow_grpo.train(full)
    (tmp_path / "b").mkdir()
    flow_grpo.train(recipe_from_dict(tiny_recipe(tmp_path / "b", tiny_sd3_dir, {"max_epochs": 1, "kl_beta": 0.1})))
    resumed = recipe_from_dict(tiny_recipe(tmp_path / "b", tiny_sd3_dir, {"max_epochs": 2, "kl_beta": 0.1}))
    flow_grpo.train(resumed)
    assert any(r.get("resumed_from") == 1.0 for r in read_log(resumed.run_dir))
    a = load_file(full.run_dir / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed.run_dir / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_stop_inside_an_epoch_waits_for_its_end(tmp_path, tiny_sd3_dir, monkeypatch):
    """SIGTERM after the first of an epoch's two updates: the run trains the second and checkpoints there, so a
    resume starts a fresh epoch (inside one it would draw the epoch's rollouts again from the updated policy).
    A recipe that would checkpoint inside an epoch is refused."""
    from rlkit.config import ConfigError
    from rlkit.runtime.guards import TrainingGuard
    from rlkit.trainers import flow_grpo

    spec = tiny_recipe(tmp_path, tiny_sd3_dir, {"updates_per_epoch": 2, "max_epochs": 2})
    with pytest.raises(ConfigError, match=r"checkpoint.every: must be a multiple of the 2 updates"):
        recipe_from_dict(spec, ["checkpoint.every=3"])
    recipe = recipe_from_dict(spec)
    monkeypatch.setattr(TrainingGuard, "should_stop", lambda self: True)  # a signal arrived before step 1 ended
    with pytest.raises(SystemExit, match="stopped by signal after step 2"):
        flow_grpo.train(recipe)
    assert [p.name for p in (recipe.run_dir / "checkpoints").iterdir()] == ["step_000002"]
    assert [r["step"] for r in read_log(recipe.run_dir) if "train/loss" in r] == [1, 2]


# -- recipes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_load_and_split_over_processes(name):
    path = REPO / "recipes" / name
    text = path.read_text()
    assert text.startswith("#") and "Launch" in text.split("algorithm:")[0]
    recipe = load_recipe(path)
    assert recipe.algorithm == "flow_grpo"
    worlds = (1, 2) if "shapes" in name else (1, 2, 4, 8)
    for world in worlds:
        plan_epoch(recipe.flow_grpo, world)
    listed = re.search(r"GPU counts .* work:\n# ([\d, ]+) \(", text)
    if listed:  # the comment's counts are exactly those that split
        counts = [int(n) for n in listed.group(1).split(",")]

        def splits(world: int) -> bool:
            try:
                return bool(recipe.flow_grpo.split(world))
            except ValueError:
                return False

        assert counts == [w for w in range(1, counts[-1] + 1) if splits(w)]
    if "fast" in name:
        assert recipe.flow_grpo.window_size == 3 and recipe.flow_grpo.guidance_scale == 1.0
    if "fast_sd35" in name:  # the release's window: sde_window_range (0, num_steps // 2) holds the whole window
        assert recipe.flow_grpo.window_start_range[1] + recipe.flow_grpo.window_size <= recipe.flow_grpo.num_steps // 2
        assert recipe.flow_grpo.prompts_per_epoch * recipe.flow_grpo.group_size == 1152  # 64 prompts x 18
        assert recipe.eval.guidance_scale == 4.5  # the release evaluates with CFG, its policy samples without


# -- two processes, ZeRO-2 ------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])
def test_groups_spanning_ranks_get_the_advantages_of_one_process(tmp_path, tiny_sd3_dir, stage):
    """2 CPU processes under ZeRO-2 (gloo): each image's reward and advantage equal those of one process,
    although every group has images on both ranks; the update equals the one-process update."""
    from rlkit.models.sd3 import SD3Generator
    from rlkit.trainers.flow_grpo import LocalRun
    from rlkit.trainers.common import build_optimizer, build_reward

    spec = tiny_recipe(tmp_path, tiny_sd3_dir, {"prompts_per_epoch": 2, "batch_size": 2, "kl_beta": 0.1,
                                                "std": "group"},
                       launch={"num_processes": 2, "deepspeed": stage})
    # Adam's eps above every gradient (<= 2e-4 here): the first update is then about lr * g / eps, so it shows a
    # gradient summed instead of averaged; at the default 1e-8 it is lr * sign(g), which cannot, and which turns
    # the rounding of a near-zero gradient into a visible difference
    spec["optim"]["eps"] = 1e-3
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(spec))
    out = tmp_path / "dist.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / f"recipes/accelerate/zero{stage}.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()),
           str(REPO / "tests/dist_scripts/flow_grpo_ranks.py"), str(recipe_file), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    dist = torch.load(out)

    recipe = recipe_from_dict(spec)
    cfg = recipe.flow_grpo
    plan = plan_epoch(cfg, 1)
    groups = epoch_layout(len(PROMPTS), cfg, recipe.seed, 0)[1]
    assert (groups[:4].unsqueeze(1) == groups[4:].unsqueeze(0)).any(), "some group has images on both ranks"
    gen = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    from rlkit.models.lora import add_lora

    gen.transformer.requires_grad_(False)
    add_lora(gen.transformer, "policy", 4, 8.0, init="gaussian")
    with torch.no_grad():  # the distributed run's initial LoRA (lora_A is random, lora_B zero)
        for name, param in gen.transformer.named_parameters():
            if name in dist["before"]:
                param.copy_(dist["before"][name])
    run = LocalRun(gen=gen, model=gen.transformer, reward=build_reward(recipe.rewards, gen), prompts=PROMPTS,
                   optimizer=torch.optim.SGD([p for p in gen.transformer.parameters() if p.requires_grad], lr=0.0),
                   grad_accum=plan.grad_accum)
    single = rollout_epoch(run, cfg, plan, 0, recipe.seed, 32)
    torch.testing.assert_close(dist["rewards"], single.all_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist["advantages"], single.all_advantages, rtol=1e-4, atol=1e-4)
    assert single.all_advantages.abs().sum() > 0
    assert dist["steps"] == 1 and dist["kl"] == 0.0
    assert all(inert(gen.transformer, n) for n in dist["unchanged_lora_B"])
    # the same update on one process (AdamW as the recipe says): ZeRO-2's rank average equals the mean over batches
    params = dict((n, p) for n, p in gen.transformer.named_parameters() if p.requires_grad)
    run.optimizer, _ = build_optimizer(list(params.values()), recipe.optim, 1)  # the trainer's AdamW, warmup 0
    run.end_update(train_update(run, cfg, plan, single, 0, 0, recipe.seed))
    moved = [n for n in dist["after"] if "lora_B" in n]
    assert max(dist["after"][n].abs().max().item() for n in moved) > 1e-5
    for name in moved:  # lora_B starts at 0: its value is the update
        torch.testing.assert_close(dist["after"][name], params[name].detach(), rtol=1e-3, atol=1e-8)
