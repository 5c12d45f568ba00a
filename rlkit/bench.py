"""``rlkit bench``: what a reward costs, side by side, in one run.

1. Per reward call at SD3.5-Medium shapes (models built on the meta device: no weights, no compute): parameters,
   forward FLOPs, backward FLOPs (gradient w.r.t. the reward's input only: a frozen reward in ReFL), and the
   activation memory autograd keeps for that backward (bf16; attention sized as a fused kernel keeps it).
   Rewards: DiNa-LRM (one noise level, and the K = 3 noise ensemble), VAE decode + PickScore (CLIP ViT-H/14)
   and VAE decode + HPSv3 (Qwen2-VL-7B).
   Attention is counted (on meta tensors it runs as two batched matmuls; CPU's fused kernel would count 0).
2. Per ReFL step and per Flow-GRPO / -Fast epoch image at SD3.5-M shapes, with each reward, DiNa-LRM sharing the
   policy's blocks or loading its own copy: FLOPs and an estimated peak memory, from the per-call costs times
   the call counts of the shipped SD3.5-M recipes (the model is printed with the table), and, at 1024 px, the
   ratios the paper's Figure 4 reports for HPSv3 -> DiNa-LRM.
3. Measured on this machine with tiny models: wall time and peak RSS of one ReFL step with a latent reward,
   DiNa-LRM on the generator's blocks, and a decode + pixel reward; Flow-GRPO vs -Fast vs -Fast + window_end
   epochs at equal settings but the window. ``--device cuda`` measures the same steps on a GPU (time and
   torch.cuda.max_memory_allocated).

    rlkit bench [--quick] [--resolutions 512 1024] [--json out.json] [--device cpu|cuda] [--no-measure]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlkit.confload import shipped_recipe
from rlkit.flops import PassCost, PeakRSS, SavedActivations, pass_cost

BF16_BYTES = 2
TERA = 1e12
GIB = 2**30
MIB = 2**20
CFG_BRANCHES = 2  # classifier-free guidance runs the transformer on the prompt and on the empty prompt
PAPER_FIGURE4 = {"peak_memory": -0.514, "reward_flops": -0.711, "update_flops": -0.464}  # HPSv3 -> DiNa-LRM
PAPER_FIGURE4_RESOLUTION = 1024  # the paper's Figure 4: a ReFL step at 1024^2, batch 1
REFL_RECIPE = "refl_sd35.yaml"
FLOW_GRPO_RECIPE = "flow_grpo_sd35.yaml"
FAST_RECIPE = "flow_grpo_fast_sd35.yaml"
DINA_ENSEMBLE_LEVELS = (0.2, 0.5, 0.7)
DINA_SIGMA = 0.4
QUICK_RESOLUTIONS = (512,)
FULL_RESOLUTIONS = (512, 1024)
MEASURE_REPEATS = 3
QUICK_REPEATS = 1


# ---------------------------------------------------------------------------------------------------------------
# 1. per reward call, meta device
@dataclass
class RewardCallCost:
    reward: str
    resolution: int
    params: int  # every weight the call runs
    own_params: int  # weights the reward adds next to the generator (shared DiNa-LRM: LoRA + head)
    forward_flops: int
    backward_flops: int
    activation_bytes: int
    note: str = ""


@dataclass
class GeneratorCost:
    resolution: int
    params: int
    step: PassCost  # one transformer call with gradient


def _meta_transformer(dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    from rewards.dina_lrm.flops import SD35M_TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG)
    return model.to(dtype).requires_grad_(False)


def _sd3_inputs(transformer, resolution: int, text_tokens: int, dtype: torch.dtype):
    from rewards.base import TextConditioning
    from rewards.dina_lrm.flops import SD35_VAE_SCALE

    cfg = transformer.config
    side = resolution // SD35_VAE_SCALE
    with torch.device("meta"):
        latents = torch.empty(1, cfg.in_channels, side, side, dtype=dtype, requires_grad=True)
        text = TextConditioning(torch.empty(1, text_tokens, cfg.joint_attention_dim, dtype=dtype),
                                torch.empty(1, cfg.pooled_projection_dim, dtype=dtype))
    return latents, text


def generator_cost(transformer, resolution: int, text_tokens: int, dtype: torch.dtype) -> GeneratorCost:
    from rewards.dina_lrm.model import TIMESTEP_SCALE

    latents, text = _sd3_inputs(transformer, resolution, text_tokens, dtype)
    t = torch.full((1,), TIMESTEP_SCALE * DINA_SIGMA, device="meta")

    def call():
        return transformer(hidden_states=latents, encoder_hidden_states=text.encoder_hidden_states,
                           pooled_projections=text.pooled_projections, timestep=t, return_dict=False)[0]

    return GeneratorCost(resolution, sum(p.numel() for p in transformer.parameters()),
                         pass_cost(call, [latents], (transformer,)))


def dina_model(transformer, dtype: torch.dtype):
    """DiNa-LRM in its release config (12 blocks, taps 4/8/12) on ``transformer``'s blocks, frozen."""
    from rewards.dina_lrm.config import DiNaLRMConfig
    from rewards.dina_lrm.model import DiNaLRM

    model = DiNaLRM.build(DiNaLRMConfig(), transformer).to(dtype)
    model.set_trainable(lora=False, head=False)
    return model


def dina_costs(model, transformer, resolution: int, text_tokens: int, dtype: torch.dtype) -> list[RewardCallCost]:
    """DiNa-LRM at one noise level and as the K = 3 noise ensemble, given ``text_tokens`` of conditioning."""
    config = model.config
    lora = sum(p.numel() for p in model.lora_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    # the base weights of its blocks: neither its own adapter nor the policy's, which a separate copy would not carry
    backbone = sum(p.numel() for n, p in model.tapped_backbone.named_parameters() if ".lora_" not in n)
    latents, text = _sd3_inputs(transformer, resolution, text_tokens, dtype)
    with torch.device("meta"):
        noise = torch.empty_like(latents, requires_grad=False)
    single = pass_cost(lambda: model.score(latents, torch.full((1,), DINA_SIGMA, device="meta"), text), [latents],
                       (model, transformer))
    ensemble = pass_cost(lambda: model.score_ensemble(latents, noise, DINA_ENSEMBLE_LEVELS, text), [latents],
                         (model, transformer))
    params = backbone + lora + head
    return [RewardCallCost("dina-lrm", resolution, params, lora + head, single.forward_flops, single.backward_flops,
                           single.activation_bytes, f"{config.num_transformer_layers} blocks, one level"),
            RewardCallCost("dina-lrm-k3", resolution, params, lora + head, ensemble.forward_flops,
                           ensemble.backward_flops, ensemble.activation_bytes,
                           f"noise ensemble {DINA_ENSEMBLE_LEVELS}")]


def _vae_decoder(dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from rewards.cost import SD35M_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**SD35M_VAE_CONFIG)
    return vae.to(dtype).requires_grad_(False)


def decode_cost(resolution: int, dtype: torch.dtype) -> tuple[int, PassCost]:
    from rewards.cost import SD35M_VAE_CONFIG, VAE_DOWNSAMPLE

    vae = _vae_decoder(dtype)
    side = resolution // VAE_DOWNSAMPLE
    with torch.device("meta"):
        z = torch.empty(1, SD35M_VAE_CONFIG["latent_channels"], side, side, dtype=dtype, requires_grad=True)
    params = sum(p.numel() for p in vae.decoder.parameters())
    return params, pass_cost(lambda: vae.decode(z).sample, [z], (vae,))


def pickscore_cost(dtype: torch.dtype) -> tuple[int, PassCost]:
    """CLIP ViT-H/14 image tower on a 224 crop (the prompt's text embedding is cached, so not per call)."""
    from transformers import CLIPConfig, CLIPModel

    from rewards.cost import CLIP_VIT_H14_CONFIG

    config = CLIPConfig(**CLIP_VIT_H14_CONFIG)
    config._attn_implementation = "sdpa"
    size = config.vision_config.image_size
    with torch.device("meta"):
        model = CLIPModel(config)
        pixels = torch.empty(1, 3, size, size, dtype=dtype, requires_grad=True)
    model = model.to(dtype).requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    return params, pass_cost(lambda: model.get_image_features(pixel_values=pixels), [pixels], (model,))


def hpsv3_cost(resolution: int, dtype: torch.dtype) -> tuple[int, PassCost, str]:
    """Qwen2-VL-7B: the vision tower on the resized image, then the decoder on image + chat tokens."""
    from transformers import Qwen2VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import get_vision_position_ids

    from rewards.cost import hpsv3_geometry
    from rewards.hpsv3 import rm_head

    config, gh, gw, _, seq = hpsv3_geometry(resolution)
    vc = config.vision_config
    grid = torch.tensor([[1, gh, gw]])
    with torch.device("meta"):
        model = Qwen2VLModel._from_config(config, attn_implementation="sdpa")
        head = rm_head(config.text_config.hidden_size)
        patches = torch.empty(gh * gw, 3 * vc.temporal_patch_size * vc.patch_size**2, dtype=dtype,
                              requires_grad=True)
        embeds = torch.empty(1, seq, config.text_config.hidden_size, dtype=dtype, requires_grad=True)
    model = model.to(dtype).requires_grad_(False)
    head.requires_grad_(False)
    kwargs = dict(position_ids=get_vision_position_ids(grid, vc.spatial_merge_size).to("meta"),
                  cu_seqlens=torch.arange(2, dtype=torch.int32) * gh * gw)
    vision = pass_cost(lambda: model.visual(patches, grid_thw=grid, **kwargs), [patches], (model,))
    decoder = pass_cost(lambda: model.language_model(inputs_embeds=embeds, use_cache=False), [embeds], (model,))
    params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters())
    both = PassCost(vision.forward_flops + decoder.forward_flops, vision.backward_flops + decoder.backward_flops,
                    vision.activation_bytes + decoder.activation_bytes)
    return params, both, f"{gh * gw} patches, {seq} decoder tokens"


def reward_call_costs(resolutions: tuple[int, ...], dtype: torch.dtype = torch.bfloat16
                      ) -> tuple[list[RewardCallCost], dict[int, GeneratorCost]]:
    from rewards.dina_lrm.flops import CLIP_TOKENS
    from rlkit.config import load_recipe
    from rlkit.models.lora import add_lora

    recipe = load_recipe(shipped_recipe(REFL_RECIPE))
    text_tokens = CLIP_TOKENS + recipe.model.max_sequence_length  # the generator's conditioning, which the
    # trainers pass to DiNa-LRM as well
    transformer = _meta_transformer(dtype)
    if recipe.lora.enabled:  # the policy's adapter: its inputs are kept for its gradient
        with torch.device("meta"):
            add_lora(transformer, recipe.lora.adapter_name, rank=recipe.lora.rank, alpha=recipe.lora.alpha,
                     target_modules=list(recipe.lora.target_modules), init=recipe.lora.init)
        transformer.to(dtype)  # as DeepSpeed's bf16 module holds it (its fp32 masters live in the optimiser): an
        # fp32 adapter would keep fp32 copies of its inputs for backward, 2.8 GiB more per call at 1024 px
    # the generator is measured before DiNa-LRM puts its adapter on the same blocks
    gens = {res: generator_cost(transformer, res, text_tokens, dtype) for res in resolutions}
    with torch.device("meta"):  # peft adds a second adapter's weights on the default device
        dina = dina_model(transformer, dtype)
    pick_params, pick = pickscore_cost(dtype)
    rows = []
    for res in resolutions:
        rows += dina_costs(dina, transformer, res, text_tokens, dtype)
        dec_params, dec = decode_cost(res, dtype)
        rows.append(RewardCallCost("decode+pickscore", res, dec_params + pick_params, dec_params + pick_params,
                                   dec.forward_flops + pick.forward_flops, dec.backward_flops + pick.backward_flops,
                                   dec.activation_bytes + pick.activation_bytes, "VAE decoder + ViT-H/14 at 224"))
        hps_params, hps, note = hpsv3_cost(res, dtype)
        rows.append(RewardCallCost("decode+hpsv3", res, dec_params + hps_params, dec_params + hps_params,
                                   dec.forward_flops + hps.forward_flops, dec.backward_flops + hps.backward_flops,
                                   dec.activation_bytes + hps.activation_bytes, "VAE decoder + Qwen2-VL-7B, " + note))
    return rows, gens


# ---------------------------------------------------------------------------------------------------------------
# 2. per ReFL step / Flow-GRPO epoch image, from per-call costs x call counts
COST_MODEL = """Cost model (per image, bf16 weights, no gradient checkpointing; attention FLOPs are its two matmuls, its
activations what a fused (flash) kernel keeps: q, k, v, output, log-sum-exp; text encoders left out: the same
for every reward, and cached):
  ReFL step  = k no-grad sampling calls x CFG branches (k = mean of grad_step_range)
             + grad_steps transformer calls with gradient x CFG branches (forward + backward)
             + reward forward + backward (input gradient only; the reward is frozen)
  reward FLOPs = reward forward + backward; update FLOPs = what carries gradient (grad steps + reward);
  total = update + the no-grad sampling
  Flow-GRPO epoch (per image) = rollout: sampled steps x CFG x transformer forward + reward forward
             + updates: trained steps x CFG x (forward + backward, + a reference forward when kl_beta > 0)
             (trained steps: the window's, less the grid's last step unless train_last_step; each recipe at its
             own settings: flow_grpo_sd35.yaml trains 9 of 10 steps at CFG 4.5, -Fast 3 at CFG 1; window_end
             stops the rollout at the window's end and scores there); each row scores with its one reward
             (flow_grpo_fast_sd35.yaml adds 0.2 x PickScore's advantage to DiNa-LRM's: a decode + PickScore call
             per image more than its DiNa-LRM row)
  peak memory = generator weights + reward weights it does not share (shared DiNa-LRM: LoRA + head only;
             separate: its own 12-block copy, bf16 as the policy) + activations kept for the backward pass (ReFL:
             transformer grad steps + the reward's; Flow-GRPO: one trained step's call for one image, both CFG
             branches in one batch, the reward runs without gradient; the recipes train 8-9 images per call,
             whose activations add up)."""


@dataclass
class PlanCost:
    plan: str
    reward: str
    backbone: str  # shared | separate | - (pixel rewards)
    resolution: int
    reward_flops: float  # per image
    update_flops: float  # what carries gradient: transformer grad steps + reward (ReFL); the updates (GRPO)
    total_flops: float  # with the no-grad sampling
    peak_bytes: float


def refl_step_costs(calls: list[RewardCallCost], gens: dict[int, GeneratorCost]) -> list[PlanCost]:
    from rlkit.config import load_recipe

    cfg = load_recipe(shipped_recipe(REFL_RECIPE)).refl
    cfg_mult = _cfg_branches(cfg.guidance_scale)
    k = sum(cfg.grad_step_range) / 2
    out = []
    for c in calls:
        g = gens[c.resolution]
        sample = k * cfg_mult * g.step.forward_flops
        grad = cfg.grad_steps * cfg_mult * (g.step.forward_flops + g.step.backward_flops)
        reward = c.forward_flops + c.backward_flops
        acts = cfg.grad_steps * cfg_mult * g.step.activation_bytes + c.activation_bytes
        for backbone, extra in _backbones(c):
            out.append(PlanCost("refl_step", c.reward, backbone, c.resolution, reward, grad + reward,
                                sample + grad + reward,
                                BF16_BYTES * (g.params + extra) + acts))
    return out


def _backbones(c: RewardCallCost) -> list[tuple[str, int]]:
    if c.reward.startswith("dina"):
        return [("shared", c.own_params), ("separate", c.params)]
    return [("-", c.own_params)]


def _cfg_branches(guidance_scale: float) -> int:
    """Transformer calls per sampling step: CFG runs two at every scale but 1 (``rollout.guided_velocity``)."""
    from rlkit.rollout import NO_GUIDANCE

    return 1 if guidance_scale == NO_GUIDANCE else CFG_BRANCHES


def grpo_recipes() -> dict[str, Any]:
    """The Flow-GRPO settings of the shipped SD3.5-M recipes: Flow-GRPO (``flow_grpo_sd35.yaml``: every step
    stochastic and trained, CFG 4.5), -Fast (``flow_grpo_fast_sd35.yaml``) and -Fast scoring at its window's end."""
    from dataclasses import replace

    from rlkit.config import load_recipe

    fast = load_recipe(shipped_recipe(FAST_RECIPE)).flow_grpo
    return {"flow_grpo": load_recipe(shipped_recipe(FLOW_GRPO_RECIPE)).flow_grpo,
            "fast": replace(fast, reward_at="final"), "fast_window_end": replace(fast, reward_at="window_end")}


def grpo_epoch_costs(calls: list[RewardCallCost], gens: dict[int, GeneratorCost]) -> list[PlanCost]:
    from rlkit.trainers.flow_grpo import trained_positions

    out = []
    for variant, cfg in grpo_recipes().items():
        cfg_mult = _cfg_branches(cfg.guidance_scale)
        window_end = sum(cfg.window_start_range) / 2 + cfg.window_size
        sampled = min(window_end, cfg.num_steps) if cfg.reward_at == "window_end" else cfg.num_steps
        per_trained = 1 + (1 if cfg.kl_beta > 0 else 0)
        trained = len(trained_positions(cfg, cfg.window_start_range[0]))  # the grid's last step is not trained
        for c in calls:
            if cfg.reward_at == "window_end" and not c.reward.startswith("dina"):
                continue  # a pixel reward cannot score a noisy state
            g = gens[c.resolution]
            rollout = sampled * cfg_mult * g.step.forward_flops + c.forward_flops
            update = cfg.inner_epochs * trained * cfg_mult * (
                per_trained * g.step.forward_flops + g.step.backward_flops)
            for backbone, extra in _backbones(c):
                out.append(PlanCost(f"grpo_{variant}", c.reward, backbone, c.resolution, c.forward_flops, update,
                                    rollout + update,
                                    BF16_BYTES * (g.params + extra) + cfg_mult * g.step.activation_bytes))
    return out


def figure4(plans: list[PlanCost], resolution: int) -> dict[str, float]:
    """HPSv3 -> DiNa-LRM (shared backbone) relative changes of a ReFL step, next to the paper's."""
    pick = {(p.reward, p.backbone): p for p in plans if p.plan == "refl_step" and p.resolution == resolution}
    hps, dina = pick[("decode+hpsv3", "-")], pick[("dina-lrm", "shared")]
    return {"peak_memory": dina.peak_bytes / hps.peak_bytes - 1,
            "reward_flops": dina.reward_flops / hps.reward_flops - 1,
            "update_flops": dina.update_flops / hps.update_flops - 1,
            "step_flops": dina.total_flops / hps.total_flops - 1}


# ---------------------------------------------------------------------------------------------------------------
# 3. measured with tiny models
@dataclass
class Measured:
    what: str
    variant: str
    seconds: float
    peak_bytes: int  # peak RSS above the start (CPU) or torch.cuda.max_memory_allocated (cuda)
    activation_bytes: int  # what autograd kept for the backward pass (real tensors)
    ratio_time: float = 1.0
    ratio_memory: float = 1.0  # of peak_bytes on cuda, of activation_bytes on CPU (RSS deltas of tiny models
    # are allocator noise)


def _tiny_rewards(folder: Path, tiny_dir: Path) -> dict[str, Any]:
    import rewards
    from rewards.dina_lrm.config import DiNaLRMConfig
    from rewards.dina_lrm.reward import DiNaLRMReward
    from rewards.tiny import save_tiny_pickscore

    pick = save_tiny_pickscore(folder / "pickscore")
    tiny_dina = DiNaLRMConfig(num_transformer_layers=2, visual_head_idx=(1, 2), text_head_idx=(2,), lora_r=4,
                              lora_alpha=8, num_attn_heads=4, num_queries=2, max_sequence_length=16)
    return {
        "latent-direction": lambda: rewards.build("latent-direction", seed=1),
        "dina-lrm (shared)": lambda: DiNaLRMReward(config=tiny_dina, base_model=str(tiny_dir)),
        "decode+pickscore": lambda: rewards.build("pickscore", model=str(pick), processor=str(pick)),
    }


def _measure(fn, device: str, activations: bool = True) -> tuple[float, int, int]:
    """(seconds, peak memory, saved activation bytes) of ``fn()``. The activations are counted in a run of their own
    before the timed one (the meter's hooks cost time on every saved tensor, and more for the variant that saves
    more); without ``activations`` that run is skipped and 0 returned."""
    saved_bytes = 0
    if activations:
        with SavedActivations() as saved:
            fn()
        saved_bytes = saved.bytes
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, int(torch.cuda.max_memory_allocated()), saved_bytes
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return seconds, rss.peak_bytes - rss.start_bytes, saved_bytes


def measure_refl(device: str, repeats: int, folder: Path) -> list[Measured]:
    """One ReFL step (rollout to k, gradient step, reward, backward) on the tiny SD3, per reward."""
    from rlkit.config import ReFLConfig
    from rlkit.models.lora import add_lora
    from rlkit.models.sd3 import SD3Generator
    from rlkit.models.tiny import save_tiny_sd3
    from rlkit.trainers.refl import refl_forward

    tiny_dir = save_tiny_sd3(folder / "sd3")
    cfg = ReFLConfig(num_steps=4, grad_step_range=(1, 3), guidance_scale=1.0, batch_size=2, loss="neg")
    prompts = ["a red circle", "a blue square at the top"]
    results: dict[str, list[tuple[float, int, int]]] = {}
    for name, make in _tiny_rewards(folder, tiny_dir).items():
        gen = SD3Generator.from_pretrained(tiny_dir, max_sequence_length=16, device=device)
        gen.transformer.requires_grad_(False)
        add_lora(gen.transformer, "policy", rank=4, alpha=8.0)
        reward = make().to(device)
        reward.attach_generator(gen)
        reward.requires_grad_(False)
        c, s, _ = gen.latent_shape(gen.vae_scale_factor * gen.transformer.config.sample_size)

        def step(seed: int) -> None:
            rng = torch.Generator().manual_seed(seed)
            noise = torch.randn(len(prompts), c, s, s, generator=rng).to(device)
            loss, _ = refl_forward(gen, gen.transformer, reward, prompts, noise, cfg, k=1,
                                   reward_rng=torch.Generator().manual_seed(seed))
            loss.mean().backward()

        step(0)  # warm-up: caches, lazy weights, allocator
        results[name] = [_measure(lambda r=r: step(r + 1), device, activations=r == 0) for r in range(repeats)]
        del gen, reward
    return _with_ratios("refl_step (tiny)", results, "decode+pickscore", device)


def measure_grpo(device: str, repeats: int, folder: Path) -> list[Measured]:
    """Flow-GRPO vs -Fast vs -Fast + window_end epochs on the tiny SD3 with a latent, noise-aware reward."""
    import rewards
    from rlkit.config import FlowGRPOConfig
    from rlkit.models.sd3 import SD3Generator
    from rlkit.models.tiny import save_tiny_sd3
    from rlkit.trainers.flow_grpo import add_cost_policy, cost_variants, epoch_cost

    tiny_dir = folder / "sd3"
    if not tiny_dir.exists():
        save_tiny_sd3(tiny_dir)
    fast = FlowGRPOConfig(num_steps=6, window_size=2, window_start_range=(0, 2), group_size=2, prompts_per_epoch=2,
                          batch_size=2, updates_per_epoch=1)
    reward = rewards.build("latent-direction", seed=1)
    prompts = ["a red circle", "a blue square at the top"]
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in cost_variants(fast)}
    warm = SD3Generator.from_pretrained(tiny_dir, max_sequence_length=16, device=device)
    reward.attach_generator(warm)
    epoch_cost(warm, reward, fast, prompts, resolution=32)  # warm-up, not timed
    for r in range(repeats):
        for name, cfg in cost_variants(fast).items():
            gen = SD3Generator.from_pretrained(tiny_dir, max_sequence_length=16, device=device)
            add_cost_policy(gen.transformer)  # set up before the clock starts, on every repeat alike
            reward.attach_generator(gen)
            results[name].append(_measure(lambda: epoch_cost(gen, reward, cfg, prompts, resolution=32, epoch=r),
                                          device, activations=r == 0))
    return _with_ratios("grpo_epoch (tiny)", results, "flow_grpo", device)


def _with_ratios(what: str, results: dict[str, list[tuple[float, int, int]]], reference: str,
                 device: str) -> list[Measured]:
    med = {k: (statistics.median(r[0] for r in v), max(r[1] for r in v), max(r[2] for r in v))
           for k, v in results.items()}
    ref_t, ref_m, ref_a = med[reference]
    mem = (lambda m, a: m / ref_m if ref_m else float("nan")) if device == "cuda" else (
        lambda m, a: a / ref_a if ref_a else float("nan"))
    return [Measured(what, k, t, m, a, t / ref_t, mem(m, a)) for k, (t, m, a) in med.items()]


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    reward_calls: list[RewardCallCost]
    generator: list[dict]
    plans: list[PlanCost]
    figure4: dict[str, dict[str, float]]
    measured: list[Measured] = field(default_factory=list)
    device: str = "cpu"

    def as_dict(self) -> dict:
        return {"reward_calls": [asdict(c) for c in self.reward_calls], "generator": self.generator,
                "plans": [asdict(p) for p in self.plans], "figure4": self.figure4, "paper_figure4": PAPER_FIGURE4,
                "measured": [asdict(m) for m in self.measured], "device": self.device, "cost_model": COST_MODEL}


def run_bench(resolutions: tuple[int, ...], measure: bool = True, device: str = "cpu", repeats: int = MEASURE_REPEATS,
              grpo: bool = True) -> BenchResult:
    calls, gens = reward_call_costs(resolutions)
    plans = refl_step_costs(calls, gens) + grpo_epoch_costs(calls, gens)
    fig = {str(r): figure4(plans, r) for r in resolutions}
    gen_rows = [{"resolution": g.resolution, "params": g.params, **asdict(g.step)} for g in gens.values()]
    measured: list[Measured] = []
    if measure:
        with tempfile.TemporaryDirectory() as tmp:
            measured += measure_refl(device, repeats, Path(tmp))
            if grpo:
                measured += measure_grpo(device, repeats, Path(tmp))
    return BenchResult(calls, gen_rows, plans, fig, measured, device)


def format_table(result: BenchResult) -> str:
    lines = ["Per reward call (batch 1, SD3.5-M shapes, meta device, bf16):",
             f"{'reward':<18}{'res':>6}{'params':>10}{'own':>10}{'fwd TF':>9}{'bwd TF':>9}{'act GiB':>9}  note"]
    for c in result.reward_calls:
        lines.append(f"{c.reward:<18}{c.resolution:>6}{c.params / 1e9:>9.2f}B{c.own_params / 1e9:>9.3f}B"
                     f"{c.forward_flops / TERA:>9.2f}{c.backward_flops / TERA:>9.2f}{c.activation_bytes / GIB:>9.2f}"
                     f"  {c.note}")
    for g in result.generator:
        lines.append(f"{'(sd3.5-m transformer)':<18}{g['resolution']:>6}{g['params'] / 1e9:>9.2f}B{'':>10}"
                     f"{g['forward_flops'] / TERA:>9.2f}{g['backward_flops'] / TERA:>9.2f}"
                     f"{g['activation_bytes'] / GIB:>9.2f}  one call with gradient")
    lines += ["", "Per image of a ReFL step / Flow-GRPO epoch (estimates):",
              f"{'plan':<22}{'reward':<18}{'backbone':<10}{'res':>6}{'reward TF':>11}{'update TF':>11}{'total TF':>10}"
              f"{'peak GiB':>10}"]
    for p in result.plans:
        lines.append(f"{p.plan:<22}{p.reward:<18}{p.backbone:<10}{p.resolution:>6}{p.reward_flops / TERA:>11.2f}"
                     f"{p.update_flops / TERA:>11.1f}{p.total_flops / TERA:>10.1f}{p.peak_bytes / GIB:>10.1f}")
    lines += ["", "HPSv3 -> DiNa-LRM (shared), ReFL step, change (this model | paper Figure 4):"]
    for res, fig in result.figure4.items():
        paper = PAPER_FIGURE4 if int(res) == PAPER_FIGURE4_RESOLUTION else {}  # the paper measured 1024 only
        parts = [f"{k} {v:+.1%} | " + (f"{paper[k]:+.1%}" if k in paper else "-") for k, v in fig.items()]
        lines.append(f"  {res}px: " + "; ".join(parts))
    if result.measured:
        lines += ["", f"Measured on this machine ({result.device}), tiny models, median of repeats:",
                  f"{'what':<20}{'variant':<20}{'seconds':>9}{'peak MiB':>10}{'act MiB':>9}{'x time':>8}{'x mem':>8}"]
        for m in result.measured:
            lines.append(f"{m.what:<20}{m.variant:<20}{m.seconds:>9.3f}{m.peak_bytes / MIB:>10.2f}"
                         f"{m.activation_bytes / MIB:>9.2f}{m.ratio_time:>8.2f}{m.ratio_memory:>8.2f}")
        lines.append("  (peak MiB: RSS rise on CPU, max_memory_allocated on cuda; act MiB: tensors autograd kept; "
                     "x mem: ratio of act MiB on CPU, of peak on cuda)")
    lines += ["", COST_MODEL]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkit bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512 px only, one repeat, no Flow-GRPO measurement")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to measure the tiny steps")
    parser.add_argument("--no-measure", action="store_true", help="FLOP / memory model only")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rlkit bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    resolutions = tuple(args.resolutions or (QUICK_RESOLUTIONS if args.quick else FULL_RESOLUTIONS))
    result = run_bench(resolutions, measure=not args.no_measure, device=args.device,
                       repeats=QUICK_REPEATS if args.quick else MEASURE_REPEATS, grpo=not args.quick)
    if args.json == "-":
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1))
    return 0
