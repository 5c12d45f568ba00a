"""The recipe: one YAML file describes a whole run. One dataclass per component.

``load_recipe(path, overrides)`` gives a validated :class:`Recipe` or raises
:class:`rlkit.confload.ConfigError` listing every problem with its file and key. Every dataclass may have
a ``check()`` returning ``(key, message)`` pairs for value-level rules; types and unknown keys are
checked by :mod:`rlkit.confload`.

The GPU count is never written here: batch sizes are global (per optimiser step) or per process, and the
trainers derive the rest from the world size at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from rlkit import confload
from rlkit.confload import ConfigError, ConfigProblem

Problems = Iterator[tuple[str, str]]

ALGORITHMS = ("refl", "flow_grpo", "reward_model")
# the attention projections of SD3 blocks, matched by name suffix (peft): the DiNa-LRM release's LoRA targets, which
# include SD3.5's second image attention (attn2, in its dual-attention blocks)
SD3_ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# the policy's default: the joint attention only (`attn.`), as upstream Flow-GRPO and the DiNa-LRM release's
# trainers adapt SD3.5 (attn2 would add about a quarter more LoRA parameters to SD3.5-M)
POLICY_LORA_TARGETS = [f"attn.{name}" for name in SD3_ATTN_TARGETS]


def _positive(obj: Any, *names: str) -> Problems:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:  # NaN too
            yield name, f"must be > 0, got {value}"


def _non_negative(obj: Any, *names: str) -> Problems:
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:  # NaN too
            yield name, f"must be >= 0, got {value}"


def _prompt_source(obj: Any, name: str) -> Problems:
    from rlkit.prompts import source_problem

    problem = source_problem(getattr(obj, name))
    if problem is not None:
        yield name, problem


def _unit(obj: Any, *names: str) -> Problems:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            yield name, f"must lie in [0, 1], got {value}"


@dataclass
class DecodeConfig:
    """How the VAE decodes for pixel rewards (memory options for ReFL through the VAE)."""

    gradient_checkpointing: bool = False  # recompute the decoder's activations in backward
    slicing: bool = False  # decode a batch one image at a time
    tiling: bool = False  # decode large images in overlapping tiles (diffusers' VAE tiling)


# distinct prompts whose text embeddings a generator keeps (SD3Generator.cache_limit): SD3.5-M's take (77 + T5 tokens)
# x 4096 values each, 1.3 MB in bf16 at 77 T5 tokens and 2.7 MB at 256, on the accelerator; a prompt set of 25k would
# otherwise fill tens of GB. The first prompts seen stay: the evaluation's, which the step-0 evaluation encodes first
# and every evaluation reuses, then training prompts, which a large prompt set seldom repeats (256 x 2.7 MB = 0.7 GB).
# Prompts past the limit are encoded at each use, exactly as the cached ones were
TEXT_CACHE_SIZE = 256


@dataclass
class ModelConfig:
    """The generator: a hub id or a local folder (``pkg://`` paths name files shipped inside the package)."""

    pretrained: str = "pkg://rlkit/shapes/assets/generator"
    revision: str | None = None
    # weights of frozen parts; the trainable LoRA stays fp32 (under DeepSpeed: its master copy, in the optimiser)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    resolution: int = 32
    max_sequence_length: int = 77
    text_cache_size: int | None = TEXT_CACHE_SIZE  # prompts whose embeddings stay in memory (null: every prompt)
    gradient_checkpointing: bool = False
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        self.pretrained = confload.resolve_package_path(self.pretrained)  # defaults resolve like YAML values

    def check(self) -> Problems:
        yield from _positive(self, "resolution", "max_sequence_length")
        if confload.missing_local_path(self.pretrained):
            yield "pretrained", f"no such folder: {self.pretrained} (expected a local folder or a hub id)"
        if self.text_cache_size is not None and self.text_cache_size < 0:
            yield "text_cache_size", f"must be >= 0 (0: no cache) or null (no limit), got {self.text_cache_size}"


@dataclass
class LoRAConfig:
    """Policy LoRA; ``enabled: false`` fine-tunes the whole transformer."""

    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    init: Literal["gaussian", "default", "random"] = "gaussian"  # random: A and B random (tests)
    target_modules: list[str] = field(default_factory=lambda: list(POLICY_LORA_TARGETS))
    adapter_name: str = "policy"

    def check(self) -> Problems:
        yield from _positive(self, "rank", "alpha")
        if not self.target_modules:
            yield "target_modules", "must name at least one module"


@dataclass
class RewardSpec:
    """A reward by registry name with its constructor arguments."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    # in a list of several: how this reward's scores are normalised before they are weighted and summed (none,
    # affine, zscore, or a mapping of rewards.weighted.NormalizeSpec fields); none leaves raw scores, whose scales
    # may differ by orders of magnitude
    normalize: str | dict[str, Any] | None = None

    def check(self) -> Problems:
        import rewards

        if not math.isfinite(self.weight):
            yield "weight", f"must be a finite number, got {self.weight}"
        if self.normalize is not None:
            from rewards.weighted import NormalizeSpec

            try:
                NormalizeSpec.parse(self.normalize)
            except (TypeError, ValueError) as exc:
                yield "normalize", str(exc)
        known = rewards.available()
        if self.name not in known and ":" not in self.name:
            import difflib

            close = difflib.get_close_matches(self.name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            yield "name", f"unknown reward {self.name!r}; {hint}known: {', '.join(known)} (or a module:Class path)"
            return
        try:
            cls = rewards.REGISTRY.check_args(self.name, self.args)
        except KeyError as exc:  # a module:Class path that does not import
            yield "name", str(exc.args[0])
            return
        except TypeError as exc:
            yield "args", str(exc)
            return
        for key, message in cls.args_problems(self.args):
            yield "args" + (f".{key}" if key else ""), f"reward {self.name!r}: {message}"


# the setting under which each policy trainer scores noisy states at their own sigma: (key, value, the alternative)
NOISY_STATE_SETTINGS = {"refl": ("refl.reward_at", "state", "reward_at: x0_hat"),
                        "flow_grpo": ("flow_grpo.reward_at", "window_end", "reward_at: final")}


def not_noise_aware(algorithm: str, reward: str) -> str:
    """Why ``reward`` cannot score ``algorithm``'s noisy states (recipe validation and the trainers say it alike)."""
    key, value, instead = NOISY_STATE_SETTINGS[algorithm]
    return (f"{key}: {value} scores a noisy state at its own sigma, but the reward {reward} is not noise-aware; "
            f"use {instead}")


def not_scoring_states(algorithm: str, reward: str) -> str:
    """Why a noise-aware ``reward`` set to noise clean latents itself cannot score ``algorithm``'s noisy states."""
    key, value, instead = NOISY_STATE_SETTINGS[algorithm]
    return (f"{key}: {value} scores a noisy state at its own sigma, but the reward {reward} is set to score clean "
            f"latents (DiNa-LRM: its args need mode: state); or use {instead}")


def not_differentiable(rewards: list[str]) -> str:
    return (f"ReFL backpropagates the reward into the policy, but {', '.join(rewards)} is not differentiable; score "
            "it under eval.golden, or train with flow_grpo")


def reward_classes(specs: list[RewardSpec]) -> Iterator[tuple[str, type, dict]]:
    """``(recipe key, class, args)`` of every reward a list of specs builds, a ``weighted`` mixture's components
    included: what a recipe's validation can know of its rewards without loading a weight (names that do not
    resolve are left to the specs' own checks)."""
    import rewards
    from rewards.base import Reward

    for i, spec in enumerate(specs):
        components = spec.args.get("components") if spec.name == "weighted" else None
        named = [(f"rewards.{i}.args.components.{j}", c.get("name"), c.get("args") or {})
                 for j, c in enumerate(components) if isinstance(c, dict)] if isinstance(components, list) \
            else [(f"rewards.{i}", spec.name, spec.args)]
        for key, name, args in named:
            try:
                cls = rewards.REGISTRY.resolve(str(name))
            except KeyError:
                continue
            if isinstance(cls, type) and issubclass(cls, Reward):
                yield key, cls, args if isinstance(args, dict) else {}


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float | None = 1.0

    def check(self) -> Problems:
        yield from _positive(self, "lr", "eps", "grad_clip")
        yield from _non_negative(self, "weight_decay")
        yield from _non_negative(self, "warmup_steps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"expected two numbers in [0, 1), got {list(self.betas)}"


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9
    update_every: int = 1

    def check(self) -> Problems:
        yield from _unit(self, "decay")
        yield from _positive(self, "update_every")


@dataclass
class LaunchConfig:
    """How ``rlkit train`` starts accelerate. ``deepspeed``: ZeRO stage 2 or 3, or null for DDP / one process."""

    num_processes: int = 1
    deepspeed: Literal[2, 3] | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    main_process_port: int | None = None
    # seconds the ranks of `rlkit train` get after a SIGTERM to finish the update (Flow-GRPO: the epoch), checkpoint
    # and exit before the launcher kills them (torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default)
    stop_grace_s: int = 600

    def check(self) -> Problems:
        yield from _positive(self, "num_processes", "stop_grace_s")


@dataclass
class LoggingConfig:
    backends: list[Literal["jsonl", "wandb", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])
    project: str = "rlkit"
    every: int = 1
    progress: bool = True

    def check(self) -> Problems:
        yield from _positive(self, "every")


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end (and on SIGTERM)
    keep_last: int = 2
    resume: bool = True  # resume from the newest complete checkpoint in the run folder (false: start afresh,
    # removing the folder's checkpoints and metrics)

    def check(self) -> Problems:
        if self.every < 0:
            yield "every", f"must be >= 0, got {self.every}"
        yield from _positive(self, "keep_last")


@dataclass
class EvalConfig:
    """Held-out evaluation: fixed prompts and seeds, golden rewards never differentiated."""

    every: int = 0  # steps; 0 = only before and after training
    prompts: str = "shapes:heldout"  # shapes:<split> | file.txt | file.jsonl | hf:<dataset>[:split[:column]]
    num_prompts: int = 16
    images_per_prompt: int = 1
    seed: int = 1234
    num_steps: int = 20
    guidance_scale: float | None = None  # None: the trained algorithm's (refl / flow_grpo guidance_scale)
    golden: list[RewardSpec] = field(default_factory=list)
    grid_images: int = 16
    early_stopping_patience: int = 0  # evaluations in a row the first golden reward may fall; 0 = off
    batch_size: int = 16

    def check(self) -> Problems:
        if self.every < 0:
            yield "every", f"must be >= 0, got {self.every}"
        yield from _positive(self, "num_prompts", "images_per_prompt", "num_steps", "batch_size")
        yield from _prompt_source(self, "prompts")
        if self.early_stopping_patience and not self.golden:
            yield "early_stopping_patience", "needs at least one golden reward"
        for i, spec in enumerate(self.golden):
            if spec.normalize is not None:
                yield f"golden.{i}.normalize", "has no effect: golden rewards are scored raw, each on its own"


@dataclass
class PromptsConfig:
    """Training prompts."""

    source: str = "shapes:train"  # shapes:<split> | file.txt | file.jsonl | hf:<dataset>[:split[:column]]
    limit: int | None = None

    def check(self) -> Problems:
        yield from _positive(self, "limit")
        yield from _prompt_source(self, "source")


@dataclass
class PretrainLossConfig:
    """ReFL's regulariser: flow-matching loss on data latents or on the base model's own samples."""

    weight: float = 0.0  # lambda in (L_reward + lambda L_pre) / (1 + lambda); 0 = off
    source: Literal["data", "base_samples"] = "base_samples"
    data: str | None = None  # latents/images for source=data

    def check(self) -> Problems:
        yield from _non_negative(self, "weight")
        if self.weight > 0 and self.source == "data" and not self.data:
            yield "data", "source 'data' needs a data path"


@dataclass
class ReFLConfig:
    num_steps: int = 40  # sampling grid
    grad_step_range: tuple[int, int] = (30, 39)  # the step that carries gradient, drawn inclusively
    grad_steps: int = 1  # K last steps that carry gradient
    guidance_scale: float = 4.5  # CFG in the no-grad rollout
    batch_size: int = 1  # prompts per process per micro-batch
    grad_accum: int = 1
    max_steps: int = 150  # optimiser updates
    reward_at: Literal["x0_hat", "state"] = "x0_hat"  # renoise x0_hat, or score the state at its own sigma
    loss: Literal["margin", "neg", "relu_margin"] = "margin"
    margin: float = 2.0  # margin - r, or relu(margin - r) * scale
    loss_scale: float = 1.0
    kl_beta: float = 0.0  # trust region: + kl_beta * |v - v_base|^2 at the gradient-carrying steps (needs LoRA)
    pretrain: PretrainLossConfig = field(default_factory=PretrainLossConfig)

    def check(self) -> Problems:
        yield from _positive(self, "num_steps", "grad_steps", "batch_size", "grad_accum", "max_steps")
        yield from _non_negative(self, "kl_beta")
        lo, hi = self.grad_step_range
        if not 0 <= lo <= hi < self.num_steps:
            yield "grad_step_range", f"must satisfy 0 <= lo <= hi < num_steps ({self.num_steps}), got {[lo, hi]}"


# the noise level a of each sampler where a recipe gives none: Flow-GRPO's flow-SDE 0.7, Flow-GRPO-Fast's CPS 0.8
DEFAULT_NOISE_LEVELS = {"sde": 0.7, "cps": 0.8}


@dataclass
class FlowGRPOConfig:
    num_steps: int = 10
    sde: Literal["sde", "cps"] = "cps"
    noise_level: float | None = None  # None: the method's own, DEFAULT_NOISE_LEVELS
    window_size: int = 3  # SDE steps trained; = num_steps gives plain Flow-GRPO
    window_start_range: tuple[int, int] = (0, 2)  # inclusive
    group_size: int = 8  # images per prompt (a group may span processes)
    prompts_per_epoch: int = 8  # global
    batch_size: int = 8  # images per process per forward
    inner_epochs: int = 1
    updates_per_epoch: int = 2  # optimiser steps per epoch; accumulation derives from this and world size
    guidance_scale: float = 1.0  # 1 = no CFG (Fast trains and samples without CFG)
    # with CFG, train through the unconditional branch too (its weight in the update is 1 - guidance_scale); upstream
    # Flow-GRPO detaches it (train_sd3.py since 2025-07), which is the default here
    cfg_uncond_grad: bool = False
    clip_range: float = 1e-5
    adv_clip: float = 5.0
    std: Literal["group", "global"] = "global"
    kl_beta: float = 0.0
    reward_at: Literal["final", "window_end"] = "final"
    reward_mix: Literal["reward", "advantage"] = "reward"
    max_epochs: int = 100
    train_last_step: bool = False
    cps_log_prob: Literal["upstream", "gaussian"] = "upstream"  # upstream: -mean((x' - mu)^2), no variance
    kl_std: Literal["upstream", "transition"] = "upstream"  # KL divides by std_t^2 (upstream) or std_t^2 |dt|

    def __post_init__(self) -> None:
        if self.noise_level is None:
            self.noise_level = DEFAULT_NOISE_LEVELS.get(self.sde, DEFAULT_NOISE_LEVELS["cps"])

    def split(self, world: int) -> tuple[int, int]:
        """``(images, batches)`` per process of an epoch on ``world`` processes; raises naming the recipe keys that
        do not divide."""
        images = self.prompts_per_epoch * self.group_size
        if images % world:
            raise ValueError(f"flow_grpo.prompts_per_epoch x flow_grpo.group_size = {images} images per epoch cannot "
                             f"be split over {world} processes")
        per_rank = images // world
        if per_rank % self.batch_size:
            raise ValueError(f"{per_rank} images per process ({images} / {world} processes) is not a multiple of "
                             f"flow_grpo.batch_size = {self.batch_size}")
        batches = per_rank // self.batch_size
        if batches % self.updates_per_epoch:
            raise ValueError(f"{batches} batches per process per epoch cannot be split into "
                             f"flow_grpo.updates_per_epoch = {self.updates_per_epoch} updates")
        return per_rank, batches

    def check(self) -> Problems:
        yield from _positive(self, "num_steps", "window_size", "group_size", "prompts_per_epoch", "batch_size",
                             "inner_epochs", "updates_per_epoch", "clip_range", "max_epochs")
        yield from _non_negative(self, "kl_beta")
        lo, hi = self.window_start_range
        if not 0 <= lo <= hi or hi + self.window_size > self.num_steps:
            yield "window_start_range", (f"window [{lo}..{hi}] + size {self.window_size} must fit in "
                                         f"num_steps {self.num_steps}")
        elif not self.train_last_step and lo + self.window_size < self.num_steps <= hi + self.window_size:
            yield "window_start_range", (f"some windows in [{lo}..{hi}] reach the last step and some do not, so the "
                                         "number of trained steps per batch would vary; keep every window off the "
                                         "last step or set train_last_step")
        if self.train_last_step and self.sde == "cps":
            yield "train_last_step", "the last CPS step is deterministic (std 0) and has no log-prob to train"
        if self.group_size < 2:
            yield "group_size", "GRPO needs at least 2 images per prompt"
        if self.noise_level <= 0:
            yield "noise_level", (f"must be > 0, got {self.noise_level} (without noise every step is the ODE's and "
                                  "has no log-prob to train)")


def source_list(sources: str | list[str]) -> list[str]:
    """A data field that names one source or several (``PreferenceDataConfig.train``), as a list."""
    return [sources] if isinstance(sources, str) else list(sources)


GENERATED_PAIR_SOURCES = ("hf:", "synthetic:", "shapes:")  # preference sources that are not files


@dataclass
class PreferenceDataConfig:
    # one source or several, concatenated (files, folders, hf:<id>, synthetic:..., shapes:drawn:<pairs>[:<seed>],
    # shapes:generated:<samples>[:<seed>])
    train: str | list[str] = ""
    eval: str | None = None
    format: Literal["auto", "hpdv3", "latents", "generic", "ranked"] = "auto"  # see rlkit.data.pairs
    columns: dict[str, str] = field(default_factory=dict)  # generic column mapping
    max_pairs_per_prompt: int | None = None
    # where shapes:generated sources keep their labelled samples, so that the next training on the same source
    # and generator weights (an ablation, a sweep) skips the sampling; None samples every time
    cache_dir: str | None = None

    def check(self) -> Problems:
        sources = [("train", self.train)] if isinstance(self.train, str) else \
            [(f"train.{i}", source) for i, source in enumerate(self.train)]
        for key, source in sources + [("eval", self.eval or "")]:
            if source and not source.startswith(GENERATED_PAIR_SOURCES) and confload.missing_local_path(source):
                yield key, (f"no such file or folder: {source} (expected a preference file or folder, or one of "
                            f"{', '.join(s + '...' for s in GENERATED_PAIR_SOURCES)})")


@dataclass
class RewardModelConfig:
    """DiNa-LRM training (``algorithm: reward_model``)."""

    model: dict[str, Any] = field(default_factory=dict)  # DiNa-LRM architecture config fields
    init_from: str | None = None  # an existing DiNa-LRM checkpoint to fine-tune
    trainable: Literal["lora_head", "head", "full"] = "lora_head"
    loss: Literal["thurstone_calibrated", "thurstone_fixed", "bt", "bt_margin", "nll_calibrated"] = (
        "thurstone_calibrated")
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "constant", "power", "beta"] = "uniform"
    timestep_args: dict[str, float] = field(default_factory=dict)
    snap_to_grid: bool = True
    # > 0: each micro-batch also trains on its noisy latents moved this far (per-latent RMS) along the pair loss's
    # gradient, the nearby latents the model ranks worst; makes the reward's own gradient (what ReFL follows) carry
    # what the labels carry (rlkit.trainers.reward_model.adversarial_latents)
    adversarial_eps: float = 0.0
    batch_size: int = 4  # pairs per process
    grad_accum: int = 1
    max_steps: int = 1000
    epochs: int | None = None
    eval_every: int = 0
    eval_levels: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5])
    eval_limit: int | None = None  # N held-out pairs drawn at random, seeded (the release evaluates 1000)
    eval_batch_size: int = 16
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)

    def check(self) -> Problems:
        yield from _positive(self, "batch_size", "grad_accum", "max_steps", "eval_limit", "eval_batch_size")
        if self.epochs is not None and self.epochs <= 0:
            yield "epochs", f"must be > 0 or null, got {self.epochs}"
        yield from _non_negative(self, "adversarial_eps")
        scheme_args = {"uniform": (), "logit_normal": ("mean", "std"), "mode": ("scale",), "constant": ("value",),
                       "power": ("power",), "beta": ("alpha", "beta")}[self.timestep_sampling]
        for key in self.timestep_args:
            if key not in scheme_args:
                yield f"timestep_args.{key}", (f"does not apply to timestep_sampling {self.timestep_sampling!r} "
                                               f"(its arguments: {', '.join(scheme_args) or 'none'})")
        for i, u in enumerate(self.eval_levels):
            if not 0 < u <= 1:
                yield f"eval_levels.{i}", f"must lie in (0, 1] (a noise level the reward scores at), got {u}"
        if self.data.eval and not self.eval_levels:
            yield "eval_levels", "must name at least one noise level to evaluate data.eval at"
        if self.init_from and self.model:
            yield "model", "has no effect with init_from, whose config.json sets the architecture; remove one of them"
        elif self.model:
            from rewards.dina_lrm.config import DiNaLRMConfig

            try:
                DiNaLRMConfig.from_dict(self.model)
            except (TypeError, ValueError) as exc:  # DiNaLRMConfigError is a ValueError
                yield "model", str(exc)


@dataclass
class Recipe:
    algorithm: Literal["refl", "flow_grpo", "reward_model"]
    name: str = ""
    seed: int = 0
    output_dir: str = "runs"  # the run folder is <output_dir>/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)

    def __post_init__(self) -> None:
        if self.eval.guidance_scale is None:  # evaluate with the sampler the policy is trained with
            self.eval.guidance_scale = self.policy.guidance_scale if self.policy is not None else 1.0

    @property
    def policy(self) -> ReFLConfig | FlowGRPOConfig | None:
        """The settings of the policy-training algorithm this recipe runs (None for reward-model training)."""
        return {"refl": self.refl, "flow_grpo": self.flow_grpo}.get(self.algorithm)

    def check(self) -> Problems:
        if self.algorithm in ("refl", "flow_grpo") and not self.rewards:
            yield "rewards", f"algorithm {self.algorithm!r} needs at least one reward"
        if self.algorithm == "reward_model" and not self.reward_model.data.train:
            yield "reward_model.data.train", "reward-model training needs a preference data set"
        epoch = self.flow_grpo.inner_epochs * self.flow_grpo.updates_per_epoch
        if self.algorithm == "flow_grpo" and epoch > 0 and self.checkpoint.every % epoch:
            yield "checkpoint.every", (f"must be a multiple of the {epoch} updates of a Flow-GRPO epoch (inner_epochs "
                                       "x updates_per_epoch): a run resumed inside an epoch would draw its rollouts "
                                       "again from the updated policy")
        counts = (self.launch.num_processes, self.flow_grpo.batch_size, self.flow_grpo.updates_per_epoch)
        if self.algorithm == "flow_grpo" and min(counts) > 0:
            try:  # what every process will do, for the launch's process count
                self.flow_grpo.split(self.launch.num_processes)
            except ValueError as exc:
                yield "flow_grpo", f"{exc} (launch.num_processes = {self.launch.num_processes})"
        yield from self._reward_fits()
        policy = self.policy
        if policy is not None and policy.kl_beta > 0 and not self.lora.enabled:
            yield f"{self.algorithm}.kl_beta", ("> 0 needs lora.enabled: the reference policy is the LoRA-disabled "
                                                "model (set kl_beta: 0 for full fine-tuning)")

    def _reward_fits(self) -> Problems:
        """What the trainers refuse at start-up (``require_differentiable``, ``require_noise_aware``) as far as
        the reward classes and their args tell it."""
        if self.algorithm not in NOISY_STATE_SETTINGS:
            return
        needs_states = self.policy.reward_at == NOISY_STATE_SETTINGS[self.algorithm][1]
        for key, cls, args in reward_classes(self.rewards):
            if self.algorithm == "refl" and not cls.differentiable:
                yield f"{key}.name", not_differentiable([cls.__name__])
            if needs_states and not cls.noise_aware:
                yield f"{key}.name", not_noise_aware(self.algorithm, cls.__name__)
            elif needs_states and not cls.scores_noisy_states_with(args):
                yield f"{key}.args", not_scoring_states(self.algorithm, cls.__name__)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.name or self.algorithm)

    def to_dict(self) -> dict:
        return confload.to_dict(self)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads, overrides and validates a recipe; raises ConfigError with every problem found."""
    data = confload.read_yaml(path)
    return confload.build(Recipe, data, file=str(path), overrides=overrides)


def recipe_from_dict(data: dict, overrides: list[str] | None = None, file: str = "<dict>") -> Recipe:
    return confload.build(Recipe, data, file=file, overrides=overrides)


def save_resolved(recipe: Recipe, run_dir: str | Path) -> Path:
    """Writes the resolved recipe to ``<run_dir>/recipe.yaml`` (atomically)."""
    import os

    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "recipe.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    os.replace(tmp, out)
    return out


__all__ = [
    "ALGORITHMS", "CheckpointConfig", "ConfigError", "ConfigProblem", "EMAConfig", "EvalConfig", "FlowGRPOConfig",
    "LaunchConfig", "LoRAConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "PreferenceDataConfig",
    "PretrainLossConfig", "PromptsConfig", "ReFLConfig", "Recipe", "RewardModelConfig", "RewardSpec",
    "load_recipe", "recipe_from_dict", "save_resolved",
]
