"""DiNa-LRM on an SD3-family transformer: the truncated backbone with taps, LoRA, and the scoring functions.

Two ways to hold the backbone:

* **own** (``share=False``): the model holds the embedders and the first N blocks as submodules
  (``backbone.pos_embed``, ``backbone.transformer_blocks.{i}``, ... the key layout of the release's
  ``full_model.pt``); LoRA is injected into those blocks. Used for reward training and standalone scoring.
* **shared** (``share=True``): the blocks belong to a generator's transformer that also carries the policy
  adapter. The reward injects its own peft adapter (``rm_lora``) into the first N of those blocks and switches
  to it (:func:`rlkit.models.lora.use_adapter`) for its forward. The transformer is *not* a submodule of the
  reward, so ``reward.parameters()``, ``.to()`` and ``requires_grad_()`` never touch the generator's weights.
"""

from __future__ import annotations

import copy
from functools import partial
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from rewards.base import TextConditioning
from rewards.dina_lrm.config import DiNaLRMConfig
from rewards.dina_lrm.head import RewardHead
from rlkit.models.lora import BLOCKS_PREFIX, add_lora, adapter_names, use_adapter

ADAPTER_NAME = "rm_lora"
TIMESTEP_SCALE = 1000.0  # transformer timestep = 1000 * sigma
LOGISTIC_HIGH, LOGISTIC_LOW = 2.0, -2.0  # the release's fixed eta1, eta2 of its optional logistic output
LOGISTIC_EPS = 1e-6


def sigma_grid(num_train_timesteps: int = 1000, shift: float = 3.0) -> Tensor:
    """The flow-matching scheduler's training sigma table, descending: ``shift s / (1 + (shift - 1) s)``,
    ``s = k / num_train_timesteps``, k = N..1 (what ``FlowMatchEulerDiscreteScheduler(shift).sigmas`` holds)."""
    s = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float64) / num_train_timesteps
    return (shift * s / (1 + (shift - 1) * s)).float()


def snap_sigmas(sigmas: Tensor, grid: Tensor) -> Tensor:
    """Each sigma replaced by the nearest grid value (the release scores only at table sigmas)."""
    grid = grid.to(sigmas.device)
    idx = torch.argmin((grid[None, :] - sigmas.reshape(-1)[:, None].float()).abs(), dim=1)
    return grid[idx].reshape(sigmas.shape)


def lora_target_names(blocks: nn.Module, config: DiNaLRMConfig) -> list[str]:
    """Full names (``transformer_blocks.{i}.attn2.to_q``...) of the projections that get LoRA.

    Suffix matching as peft does it, so dual-attention ``attn2`` projections are included; the release's
    exclusions (:attr:`DiNaLRMConfig.excluded_lora_modules`) removed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    excluded = set(config.excluded_lora_modules)
    for name, module in blocks.named_modules(prefix=BLOCKS_PREFIX):
        if not isinstance(module, (nn.Linear, BaseTunerLayer)) or name in excluded:
            continue
        if any(name == t or name.endswith("." + t) for t in config.lora_targets):
            names.append(name)
    return names


class TappedBackbone(nn.Module):
    """The embedders and the first N blocks of an SD3 transformer; returns the conditioning and the taps."""

    def __init__(self, transformer: nn.Module, config: DiNaLRMConfig):
        super().__init__()
        n_total = len(transformer.transformer_blocks)
        if config.num_transformer_layers > n_total:
            raise ValueError(f"DiNaLRMConfig.num_transformer_layers={config.num_transformer_layers} exceeds the "
                             f"base transformer's {n_total} blocks")
        for tap in config.text_head_idx:
            if tap > 0 and getattr(transformer.transformer_blocks[tap - 1], "context_pre_only", False):
                raise ValueError(f"DiNaLRMConfig.text_head_idx: block {tap} is the transformer's last block, "
                                 "which outputs no text tokens")
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[: config.num_transformer_layers])
        self.image_taps = tuple(config.visual_head_idx)
        self.text_taps = tuple(config.text_head_idx)

    @property
    def width(self) -> int:
        return self.context_embedder.out_features

    def forward(self, latents: Tensor, timesteps: Tensor, text: TextConditioning, checkpoint_fn=None
                ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """latents (B, C, h, w), timesteps (B,) -> cond (B, D), image taps [(B, N, D)], text taps [(B, L, D)].

        ``checkpoint_fn(block, hidden, context, cond, kwargs)``: gradient checkpointing of each block (diffusers'
        calling convention), used when grad is enabled.
        """
        image = self.pos_embed(latents)
        cond = self.time_text_embed(timesteps, text.pooled_projections)
        context = self.context_embedder(text.encoder_hidden_states)
        image_taps = [image] if 0 in self.image_taps else []
        text_taps = [context] if 0 in self.text_taps else []
        for depth, block in enumerate(self.transformer_blocks, start=1):
            if checkpoint_fn is not None and torch.is_grad_enabled():
                context, image = checkpoint_fn(block, image, context, cond, None)
            else:
                context, image = block(hidden_states=image, encoder_hidden_states=context, temb=cond)
            if depth in self.image_taps:
                image_taps.append(image)
            if depth in self.text_taps:
                text_taps.append(context)
        return cond, image_taps, text_taps


class DiNaLRM(nn.Module):
    """The reward model ``r(x_sigma, sigma, c)``. Build with :meth:`build`; score with :meth:`score`."""

    def __init__(self, config: DiNaLRMConfig, backbone: TappedBackbone, shared_transformer: nn.Module | None):
        super().__init__()
        self.config = config
        width = config.head_width_for(backbone.width)
        self.reward_head = RewardHead(
            token_dim=backbone.width, cond_dim=backbone.width, width=width,
            n_visual=len(config.visual_head_idx), n_text=len(config.text_head_idx),
            num_queries=config.num_queries, num_attn_heads=config.num_attn_heads, out_dim=config.out_dim,
            dropout=config.dropout, use_proj_in=config.use_proj_in, feature_divisor=config.feature_divisor,
            ffn_mult=config.ffn_mult,
        )
        if config.use_logistic:
            self.eta3 = nn.Parameter(torch.tensor(0.0))
            self.eta4 = nn.Parameter(torch.tensor(0.15))
        # shared: a plain attribute (a tuple), so the generator's weights stay out of this module's parameters
        self._shared = (backbone, shared_transformer) if shared_transformer is not None else None
        if shared_transformer is None:
            self.backbone = backbone
        self.gradient_checkpointing = False  # own backbone; a shared one follows the generator's setting
        # float32 whatever the model runs in (see _apply): a bf16 table holds 355 distinct sigmas of 1000, and
        # scores at sigma 0.699 where the release scores at 0.700
        self.register_buffer("grid", sigma_grid(config.grid_num_train_timesteps, config.grid_shift), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        grid = self.grid
        super()._apply(fn, recurse)
        self.grid = grid.to(self.grid.device)
        return self

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: DiNaLRMConfig, transformer: nn.Module, share: bool = False, copy_blocks: bool = False,
              add_adapter: bool = True) -> "DiNaLRM":
        """A fresh model on ``transformer``'s first blocks.

        ``share``: the blocks stay the generator's; the LoRA becomes adapter ``rm_lora`` on them.
        ``copy_blocks``: take a deep copy of the embedders and blocks first (a frozen copy of a generator
        that is being fully fine-tuned). ``add_adapter=False`` leaves the LoRA out (loading ``full_model.pt``).
        """
        if share and copy_blocks:
            raise ValueError("DiNaLRM.build: share and copy_blocks exclude each other")
        backbone = TappedBackbone(transformer, config)
        if copy_blocks:
            backbone = _without_adapters(copy.deepcopy(backbone))
        if not share:
            backbone.requires_grad_(not config.freeze_backbone and not config.use_lora)
        dtype = next(backbone.parameters()).dtype
        device = next(backbone.parameters()).device
        model = cls(config, backbone, transformer if share else None).to(device=device, dtype=dtype)
        if add_adapter and config.use_lora and not config.freeze_backbone:
            model._add_lora()
        return model

    def _add_lora(self) -> None:
        targets = lora_target_names(self.tapped_backbone.transformer_blocks, self.config)
        host = self.adapter_host
        previous = _active_state(host)
        add_lora(host, ADAPTER_NAME, self.config.lora_r, self.config.lora_alpha, targets, self.config.lora_init)
        if self._shared is not None:  # the generator keeps running its own adapter (or none: the base model)
            _set_active_state(host, previous or None)

    @property
    def tapped_backbone(self) -> TappedBackbone:
        return self._shared[0] if self._shared is not None else self.backbone

    @property
    def adapter_host(self) -> nn.Module:
        """The module that owns the LoRA layers: the generator's transformer when shared, else the backbone."""
        return self._shared[1] if self._shared is not None else self.backbone

    @property
    def is_shared(self) -> bool:
        return self._shared is not None

    @property
    def has_lora(self) -> bool:
        return ADAPTER_NAME in adapter_names(self.adapter_host)

    def lora_parameters(self) -> list[nn.Parameter]:
        if not self.has_lora:
            return []
        marker = f".{ADAPTER_NAME}."
        return [p for n, p in self.tapped_backbone.named_parameters() if marker in f".{n}."]

    def head_parameters(self) -> list[nn.Parameter]:
        """The reward head (and the optional logistic output's parameters)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def added_parameters(self) -> list[nn.Parameter]:
        """What this reward adds on top of the base transformer's weights: LoRA + head."""
        return self.lora_parameters() + self.head_parameters()

    def set_trainable(self, lora: bool = True, head: bool = True, backbone: bool = False) -> None:
        """Marks what reward training updates (LoRA, head, and for ``full`` mode the backbone itself)."""
        if backbone and self.is_shared:
            raise ValueError("DiNaLRM.set_trainable: a shared backbone belongs to the generator; not trainable here")
        if not self.is_shared:
            self.backbone.requires_grad_(backbone)
        for p in self.lora_parameters():
            p.requires_grad_(lora)
        for p in self.head_parameters():
            p.requires_grad_(head)

    # -- forward ------------------------------------------------------------------------------------------
    def _adapter_context(self):
        if not self.is_shared:
            return nullcontext()
        return use_adapter(self.adapter_host, ADAPTER_NAME if self.has_lora else None)

    def _checkpoint_fn(self):
        """Block checkpointing: a shared backbone checkpoints when the generator does, always re-running a
        block under the adapter of its forward (rm_lora), whatever adapter is active at backward time."""
        if self.is_shared:
            if not getattr(self.adapter_host, "gradient_checkpointing", False):
                return None
            from rlkit.models.lora import checkpoint_under_forward_adapter

            return checkpoint_under_forward_adapter
        if not self.gradient_checkpointing:
            return None
        return partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def _features(self, latents: Tensor, timesteps: Tensor, text: TextConditioning):
        backbone = self.tapped_backbone
        dtype = next(backbone.parameters()).dtype
        text = text.to(device=latents.device, dtype=dtype)
        return backbone(latents.to(dtype), timesteps.to(latents.device, torch.float32), text,
                        checkpoint_fn=self._checkpoint_fn())

    def _output(self, raw: Tensor) -> Tensor:
        raw = raw[:, 0].float() if raw.shape[-1] == 1 else raw.float()
        if not self.config.use_logistic:
            return raw
        z = (raw - self.eta3.float()) / (self.eta4.float().abs() + LOGISTIC_EPS)
        return (LOGISTIC_HIGH - LOGISTIC_LOW) * torch.sigmoid(z) + LOGISTIC_LOW

    def forward(self, latents: Tensor, timesteps: Tensor, text: TextConditioning) -> Tensor:
        """Raw scores (B,) float32 of ``latents`` at transformer ``timesteps`` (B,) (the release's forward)."""
        with self._adapter_context():
            cond, image_taps, text_taps = self._features(latents, timesteps, text)
            return self._output(self.reward_head(image_taps, text_taps, cond))

    def forward_ensemble(self, latents: Sequence[Tensor], timesteps: Sequence[Tensor], text: TextConditioning
                         ) -> Tensor:
        """Noise ensemble: one backbone pass per level, tokens concatenated, one head pass -> (B,)."""
        with self._adapter_context():
            levels = [self._features(x, t, text) for x, t in zip(latents, timesteps, strict=True)]
            return self._output(self.reward_head.forward_levels([(i, t, c) for c, i, t in levels]))

    def score(self, latents: Tensor, sigmas: Tensor | float, text: TextConditioning) -> Tensor:
        """Scores ``latents`` as they are, at noise level ``sigmas`` (B,) (timestep ``1000 * sigma``)."""
        sigmas = _per_item(sigmas, latents)
        return self(latents, TIMESTEP_SCALE * sigmas, text)

    def score_ensemble(self, x0: Tensor, noise: Tensor, levels: Sequence[float] | Tensor,
                       text: TextConditioning) -> Tensor:
        """``x_u = (1 - u) x0 + u noise`` for each level u with one shared ``noise``; tokens concatenated."""
        levels = torch.as_tensor(levels, dtype=torch.float32, device=x0.device)
        noisy, timesteps = [], []
        for u in levels:
            u_b = _per_item(u, x0)
            s = u_b.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
            noisy.append((1 - s) * x0 + s * noise)
            timesteps.append(TIMESTEP_SCALE * u_b)
        return self.forward_ensemble(noisy, timesteps, text)

    def snap(self, sigmas: Tensor) -> Tensor:
        """Noise levels moved to the scheduler table the release scores at."""
        return snap_sigmas(sigmas, self.grid)


def _per_item(sigmas: Tensor | float, latents: Tensor) -> Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    return s.expand(latents.shape[0]) if s.dim() == 0 else s.reshape(latents.shape[0])


def _without_adapters(module: nn.Module) -> nn.Module:
    """Replaces every peft LoRA layer in ``module`` by its base layer (a copy must not carry the policy LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
    return module


def _active_state(model: nn.Module) -> list[str] | None:
    from rlkit.models.lora import active_adapters

    return active_adapters(model)


def _set_active_state(model: nn.Module, active: list[str] | None) -> None:
    """Makes ``active`` (None: adapters disabled) the active adapters of every LoRA layer, keeping requires_grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        if active is None:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(list(active))
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
