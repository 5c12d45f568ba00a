"""An independent re-implementation of the official DiNa-LRM code (HKUST-C4G/diffusion-rm), for conformance.

Structured as the release is (``diffusion_rm/models/{sd3_rm,reward_head}.py``, ``infer/inference.py``,
``train/engine.py``): the same module tree and parameter names, the same forward and forward_ensemble maths,
the same nearest-table-sigma timesteps and the same three save modes. Written independently of
``rewards.dina_lrm`` (it shares no code with it) so that agreement between the two means something.
Text encoders are left out: the conformance inputs are prompt embeddings.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

# ------------------------------------------------------------------ reward_head.py


class FiLMLayerAdapter(nn.Module):
    def __init__(self, in_dim, emb_dim, hidden_dim, output_dim, use_proj_in=True):
        super().__init__()
        needs_proj = use_proj_in or in_dim != hidden_dim
        self.proj_in = nn.Linear(in_dim, hidden_dim) if needs_proj else nn.Identity()
        self.layer_embed = nn.Parameter(0.02 * torch.randn(1, 1, hidden_dim))
        self.cond_mlp = nn.Sequential(
            nn.Linear(emb_dim, 2 * hidden_dim), nn.SiLU(), nn.Linear(2 * hidden_dim, 2 * hidden_dim)
        )
        self.proj = nn.Linear(hidden_dim, output_dim)
        nn.init.zeros_(self.cond_mlp[-1].weight)
        nn.init.zeros_(self.cond_mlp[-1].bias)

    def forward(self, x, t_emb):
        x = self.proj_in(x)
        style = self.cond_mlp(t_emb)
        gamma = style[:, : style.shape[-1] // 2].unsqueeze(1)
        beta = style[:, style.shape[-1] // 2:].unsqueeze(1)
        x = x + x * gamma + beta
        x = x + self.layer_embed
        return self.proj(x)


class CrossAttnBlockVGated(nn.Module):
    def __init__(self, dim, num_heads=8, use_norm=True, use_text=True, dropout=0.0, use_v_gating=True):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.use_text, self.use_v_gating = use_text, use_v_gating
        self.norm_q = nn.RMSNorm(dim) if use_norm else None
        self.norm_v = nn.RMSNorm(dim) if use_norm else None
        self.norm_t = nn.RMSNorm(dim) if (use_norm and use_text) else None
        self.to_q = nn.Linear(dim, dim)
        self.to_k_vis = nn.Linear(dim, dim)
        self.to_v_vis = nn.Linear(dim, dim)
        self.to_k_text = nn.Linear(dim, dim) if use_text else None
        self.to_v_text = nn.Linear(dim, dim) if use_text else None
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

        def gate():
            g = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
            nn.init.zeros_(g[-1].weight)
            nn.init.zeros_(g[-1].bias)
            return g

        self.gate_vis = gate() if use_v_gating else None
        self.gate_text = gate() if (use_v_gating and use_text) else None

    def _heads(self, x):
        return x.unflatten(-1, (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def _sdpa(self, q, k, v):
        # explicit softmax attention (not F.scaled_dot_product_attention) to stay independent of the production
        qh, kh, vh = self._heads(q), self._heads(k), self._heads(v)
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1)
        return (weights @ vh).permute(0, 2, 1, 3).flatten(-2)

    def forward(self, queries, context_visual, context_text=None):
        residual = queries
        if self.norm_q is not None:
            queries = self.norm_q(queries)
        if self.norm_v is not None:
            context_visual = self.norm_v(context_visual)
        if self.norm_t is not None and context_text is not None:
            context_text = self.norm_t(context_text)
        q = self.to_q(queries)
        k_vis, v_vis = self.to_k_vis(context_visual), self.to_v_vis(context_visual)
        if self.use_v_gating and self.gate_vis is not None:
            v_vis = v_vis * torch.sigmoid(self.gate_vis(context_visual))
        h = self._sdpa(q, k_vis, v_vis)
        if self.use_text and context_text is not None and self.to_k_text is not None:
            k_t, v_t = self.to_k_text(context_text), self.to_v_text(context_text)
            if self.use_v_gating and self.gate_text is not None:
                v_t = v_t * torch.sigmoid(self.gate_text(context_text))
            h = h + self._sdpa(q, k_t, v_t)
        return residual + self.to_out(h)


class RewardHead(nn.Module):
    def __init__(self, token_dim, width=-1, out_dim=1, n_visual_heads=1, n_text_heads=1, num_queries=4,
                 num_attn_heads=8, dropout=0.0, t_embed_dim=-1, use_proj_in=False, **unused):
        super().__init__()
        width = token_dim if width == -1 else width
        feat = width // 4
        emb = t_embed_dim if t_embed_dim > 0 else width
        self.layer_adapters_visual = nn.ModuleList(
            [FiLMLayerAdapter(token_dim, emb, width, feat, use_proj_in) for _ in range(n_visual_heads)])
        self.layer_adapters_text = nn.ModuleList(
            [FiLMLayerAdapter(token_dim, emb, width, feat, use_proj_in) for _ in range(n_text_heads)])
        self.agg_visual = nn.Linear(n_visual_heads * feat, width) if n_visual_heads > 0 else None
        self.agg_text = nn.Linear(n_text_heads * feat, width) if n_text_heads > 0 else None
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, num_queries, width))
        self.attn1 = CrossAttnBlockVGated(width, num_attn_heads, True, n_text_heads > 0, dropout, True)
        self.attn2 = CrossAttnBlockVGated(width, num_attn_heads, True, False, dropout, False)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                nn.Dropout(dropout))
        self.head = nn.Linear(width, out_dim)

    def _build_view_tokens(self, visual_features, text_features, t_emb):
        vis = torch.cat([ad(f, t_emb) for ad, f in zip(self.layer_adapters_visual, visual_features)], dim=-1)
        visual_out = self.agg_visual(vis)
        if text_features is None or len(self.layer_adapters_text) == 0:
            return visual_out, None
        txt = torch.cat([ad(f, t_emb) for ad, f in zip(self.layer_adapters_text, text_features)], dim=-1)
        return visual_out, self.agg_text(txt)

    def _queries_to_score(self, visual, text):
        queries = self.query_tokens.expand(visual.shape[0], -1, -1)
        queries = self.attn1(queries, visual, text)
        queries = self.attn2(queries, visual, None)
        queries = queries + self.ff(self.norm_ff(queries))
        return self.head(queries).mean(dim=1)

    def forward(self, visual_features, text_features, t_embed=None, hw=None):
        visual_out, text_out = self._build_view_tokens(visual_features, text_features, t_embed)
        return self._queries_to_score(visual_out, text_out)

    def forward_ensemble(self, visual_features_per_t, text_features_per_t, t_embed_per_t):
        vis_all, txt_all = [], []
        for i in range(t_embed_per_t.shape[1]):
            tf = text_features_per_t[i] if text_features_per_t is not None else None
            v, t = self._build_view_tokens(visual_features_per_t[i], tf, t_embed_per_t[:, i, :])
            vis_all.append(v)
            if t is not None:
                txt_all.append(t)
        text_cat = torch.cat(txt_all, dim=1) if txt_all else None
        return self._queries_to_score(torch.cat(vis_all, dim=1), text_cat)


# ------------------------------------------------------------------ sd3_rm.py

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class SD3Backbone(nn.Module):
    def __init__(self, transformer, config_model):
        super().__init__()
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[: config_model.num_transformer_layers])
        self.visual_head_idx = list(config_model.visual_head_idx)
        self.text_head_idx = list(config_model.text_head_idx)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                unpatched=False):
        hidden_states = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        vis = [hidden_states] if self.visual_head_idx[0] == 0 else []
        txt = [encoder_hidden_states] if self.text_head_idx[0] == 0 else []
        for k, block in enumerate(self.transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)
            if k + 1 in self.visual_head_idx:
                vis.append(hidden_states)
            if k + 1 in self.text_head_idx:
                txt.append(encoder_hidden_states)
        return temb, vis, txt


class SD3RewardModel(nn.Module):
    """``SD3RewardModel`` without its (unregistered) text encoders."""

    def __init__(self, transformer, config_model):
        super().__init__()
        self.backbone = SD3Backbone(transformer, config_model)
        if config_model.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad = False
        elif config_model.use_lora and config_model.lora_config is not None:
            n = config_model.num_transformer_layers
            exclude = [f"transformer_blocks.{n - 1}.attn.{m}"
                       for m in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
            if config_model.use_text_features and config_model.text_head_idx[-1] == n:
                exclude = None
            lc = config_model.lora_config
            self.backbone = get_peft_model(self.backbone, LoraConfig(
                r=lc.r, lora_alpha=lc.lora_alpha, init_lora_weights=lc.init_lora_weights,
                target_modules=LORA_TARGETS, exclude_modules=exclude))
        head_cfg = dict(vars(config_model.reward_head))
        self.reward_head = RewardHead(
            token_dim=transformer.inner_dim,
            n_visual_heads=len(config_model.visual_head_idx),
            n_text_heads=len(config_model.text_head_idx),
            patch_size=transformer.config.patch_size,
            t_embed_dim=transformer.inner_dim,
            use_t_embed=config_model.use_t_embed,
            **head_cfg,
        )
        self.use_logistic = bool(getattr(config_model, "use_logistic", False))
        if self.use_logistic:
            self.eta1, self.eta2 = 2.0, -2.0
            self.eta3 = nn.Parameter(torch.tensor(0.0))
            self.eta4 = nn.Parameter(torch.tensor(0.15))

    def _logistic(self, x):
        if not self.use_logistic:
            return x
        return (self.eta1 - self.eta2) / (1 + torch.exp(-(x - self.eta3) / (self.eta4.abs() + 1e-6))) + self.eta2

    def forward(self, latents, encoder_hidden_states, pooled_projections, timesteps, **kwargs):
        h, w = latents.shape[-2:]
        temb, vis, txt = self.backbone(hidden_states=latents, encoder_hidden_states=encoder_hidden_states,
                                       pooled_projections=pooled_projections, timestep=timesteps)
        return self._logistic(self.reward_head(visual_features=vis, text_features=txt, t_embed=temb, hw=(h, w)))

    def forward_ensemble(self, latents, encoder_hidden_states, pooled_projections, ensemble_timesteps):
        tembs, vis_all, txt_all = [], [], []
        for x, t in zip(latents, ensemble_timesteps):
            temb, vis, txt = self.backbone(hidden_states=x, encoder_hidden_states=encoder_hidden_states,
                                           pooled_projections=pooled_projections, timestep=t)
            tembs.append(temb)
            vis_all.append(vis)
            txt_all.append(txt)
        out = self.reward_head.forward_ensemble(visual_features_per_t=vis_all, text_features_per_t=txt_all,
                                                t_embed_per_t=torch.stack(tembs, dim=1))
        return self._logistic(out)


# ------------------------------------------------------------------ infer/inference.py, train/engine.py


def to_namespace(d):
    if isinstance(d, dict):
        return SimpleNamespace(**{k: to_namespace(v) for k, v in d.items()})
    return d


def get_timesteps_from_sigma(noise_scheduler, sigma_target, n_dim=4):
    table = noise_scheduler.sigmas.to(sigma_target.device)
    idx = torch.argmin((table[None, :] - sigma_target[:, None]).abs(), dim=1)
    timesteps = noise_scheduler.timesteps.to(sigma_target.device)[idx]
    sigma = table[idx]
    while sigma.dim() < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma, timesteps


def reward(model, noise_scheduler, text_conds, latents, u, noise, add_noise=True):
    """``DRMInferencer.reward`` with the noise passed in (the release draws ``randn_like`` inside)."""
    u_tensor = torch.tensor([u] * latents.shape[0])
    sigmas, timesteps = get_timesteps_from_sigma(noise_scheduler, u_tensor, n_dim=latents.dim())
    x = (1.0 - sigmas) * latents + sigmas * noise if add_noise else latents
    return model(latents=x, timesteps=timesteps, **text_conds)


def reward_ensemble(model, noise_scheduler, text_conds, latents, levels, noise):
    """``InferenceEngine.validate_ensemble``'s scoring of one image (shared noise over the levels)."""
    u = torch.stack([torch.tensor([v] * latents.shape[0]) for v in levels]).view(-1)
    sigmas, timesteps = get_timesteps_from_sigma(noise_scheduler, u, n_dim=latents.dim())
    sigmas = sigmas.view(len(levels), latents.shape[0], *([1] * (latents.dim() - 1)))
    timesteps = timesteps.view(len(levels), latents.shape[0])
    xs = [(1.0 - sigmas[j]) * latents + sigmas[j] * noise for j in range(len(levels))]
    return model.forward_ensemble(latents=xs, ensemble_timesteps=list(timesteps), **text_conds)


def save_checkpoint(model, config, save_dir):
    """The release's ``save_checkpoint`` (three modes) plus its ``config.json`` dump."""
    ckpt = os.path.join(save_dir, "checkpoint")
    os.makedirs(ckpt, exist_ok=True)
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=4)
    m = config["model"]
    if m["use_lora"] and not m["freeze_backbone"]:
        model.backbone.save_pretrained(os.path.join(ckpt, "backbone_lora"))
        torch.save(model.reward_head.state_dict(), os.path.join(ckpt, "rm_head.pt"))
    elif not m["freeze_backbone"]:
        torch.save(model.state_dict(), os.path.join(ckpt, "full_model.pt"))
    else:
        torch.save(model.reward_head.state_dict(), os.path.join(ckpt, "rm_head.pt"))


def official_config(num_layers, visual_idx, text_idx, use_lora=True, freeze_backbone=False, r=4, alpha=8,
                    num_queries=4, num_attn_heads=8, use_logistic=False):
    """A config.json in the release's layout (``config/sd3m/thurstone-12layer.yaml`` dumped by OmegaConf)."""
    return {
        "model": {
            "model_type": "thurstone", "backbone_model_id": "tiny-sd3", "num_transformer_layers": num_layers,
            "freeze_backbone": freeze_backbone, "use_ema": True, "ema_decay": 0.995, "use_lora": use_lora,
            "use_text_features": True,
            "lora_config": {"r": r, "lora_alpha": alpha, "init_lora_weights": "gaussian"},
            "use_logistic": use_logistic, "visual_head_idx": list(visual_idx), "text_head_idx": list(text_idx),
            "use_t_embed": True,
            "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": num_queries,
                            "num_attn_heads": num_attn_heads, "dropout": 0.0},
        },
        "training": {"mixed_precision": "fp32", "learning_rate": 5e-5, "t_weighting_scheme": "uniform",
                     "add_noise": True},
        "paths": {"run_name": "conformance", "save_dir": "outputs"},
    }


def randomize_(module, generator, scale=0.5):
    """Every parameter random (zero-initialised ones included): matrices ~ N(0, scale^2 / fan_in), vectors
    ~ N(0, scale^2), norm weights ~ 1 + N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * scale / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * scale)


def load_checkpoint(model, config_model, checkpoint_path):
    """``DRMInferencer.load_checkpoint``: peft ``load_adapter`` as ``rm_lora`` + head, or full model, or head."""
    if config_model.use_lora and not config_model.freeze_backbone:
        model.backbone.load_adapter(os.path.join(checkpoint_path, "backbone_lora"), adapter_name="rm_lora")
        model.backbone.set_adapter("rm_lora")
        model.reward_head.load_state_dict(
            torch.load(os.path.join(checkpoint_path, "rm_head.pt"), map_location="cpu", weights_only=True))
    elif not config_model.freeze_backbone:
        model.load_state_dict(
            torch.load(os.path.join(checkpoint_path, "full_model.pt"), map_location="cpu", weights_only=True))
    else:
        model.reward_head.load_state_dict(
            torch.load(os.path.join(checkpoint_path, "rm_head.pt"), map_location="cpu", weights_only=True))
    return model.eval()
