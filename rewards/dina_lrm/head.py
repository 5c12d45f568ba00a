"""The DiNa-LRM reward head: FiLM adapters per tapped block, cross-layer fusion, value-gated Q-Former.

Parameter names equal those of the release's ``rm_head.pt`` (``layer_adapters_visual.{i}.cond_mlp.0``,
``attn1.gate_vis.2``, ``query_tokens``, ...) so the published state dict loads unchanged.

Shapes: B batch, N image tokens, L text tokens, D backbone width, W head width, F = W // feature_divisor,
Q queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBED_INIT_STD = 0.02  # learned layer embeddings and query tokens start at N(0, 0.02^2)


class FiLMAdapter(nn.Module):
    """``proj((proj_in(x)) * (1 + gamma) + beta + layer_embed)`` with ``(gamma, beta) = MLP(cond)``.

    The MLP's last layer starts at zero, so a fresh adapter does not modulate.
    """

    def __init__(self, in_dim: int, cond_dim: int, width: int, out_dim: int, use_proj_in: bool):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width) if (use_proj_in or in_dim != width) else nn.Identity()
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * EMBED_INIT_STD)
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.proj = nn.Linear(width, out_dim)
        nn.init.zeros_(self.cond_mlp[2].weight)
        nn.init.zeros_(self.cond_mlp[2].bias)

    def forward(self, tokens: Tensor, cond: Tensor) -> Tensor:
        # tokens (B, N, D), cond (B, D_cond) -> (B, N, out_dim)
        gamma, beta = self.cond_mlp(cond)[:, None, :].chunk(2, dim=-1)
        modulated = self.proj_in(tokens) * (1 + gamma) + beta + self.layer_embed
        return self.proj(modulated)


def _gate_mlp(dim: int) -> nn.Sequential:
    """Token-wise value gate logits; zero last layer, so gates start at sigmoid(0) = 0.5."""
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class GatedCrossAttention(nn.Module):
    """Queries attend to image tokens and (optionally) text tokens with separate keys/values.

    The two attentions are summed, projected and added to the queries. With ``gated`` each context token's
    value is scaled by a learned sigmoid gate of that token.
    """

    def __init__(self, dim: int, num_heads: int, with_text: bool, gated: bool, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(dim)
        self.norm_v = nn.RMSNorm(dim)
        self.norm_t = nn.RMSNorm(dim) if with_text else None
        self.to_q = nn.Linear(dim, dim)
        self.to_k_vis = nn.Linear(dim, dim)
        self.to_v_vis = nn.Linear(dim, dim)
        self.to_k_text = nn.Linear(dim, dim) if with_text else None
        self.to_v_text = nn.Linear(dim, dim) if with_text else None
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.gate_vis = _gate_mlp(dim) if gated else None
        self.gate_text = _gate_mlp(dim) if (gated and with_text) else None

    def _attend(self, q: Tensor, context: Tensor, to_k: nn.Linear, to_v: nn.Linear, gate: nn.Module | None) -> Tensor:
        b, n_q, d = q.shape
        h = self.num_heads
        value = to_v(context)
        if gate is not None:
            value = value * torch.sigmoid(gate(context))  # (B, L, 1) per-token gate on the values only
        heads = [t.reshape(b, t.shape[1], h, d // h).transpose(1, 2) for t in (q, to_k(context), value)]
        out = F.scaled_dot_product_attention(*heads)  # (B, H, Q, D/H)
        return out.transpose(1, 2).reshape(b, n_q, d)

    def forward(self, queries: Tensor, image: Tensor, text: Tensor | None = None) -> Tensor:
        q = self.to_q(self.norm_q(queries))
        mixed = self._attend(q, self.norm_v(image), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if text is not None and self.to_k_text is not None:
            mixed = mixed + self._attend(q, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text)
        return queries + self.to_out(mixed)


class RewardHead(nn.Module):
    """FiLM adapters on the tapped image/text tokens -> fused tokens -> 2 Q-Former blocks -> FFN -> mean score."""

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int,
        n_visual: int,
        n_text: int,
        num_queries: int = 4,
        num_attn_heads: int = 8,
        out_dim: int = 1,
        dropout: float = 0.0,
        use_proj_in: bool = False,
        feature_divisor: int = 4,
        ffn_mult: int = 4,
    ):
        super().__init__()
        feat = width // feature_divisor

        def adapters(n: int) -> nn.ModuleList:
            return nn.ModuleList(FiLMAdapter(token_dim, cond_dim, width, feat, use_proj_in) for _ in range(n))

        self.layer_adapters_visual = adapters(n_visual)
        self.layer_adapters_text = adapters(n_text)
        self.agg_visual = nn.Linear(n_visual * feat, width)
        self.agg_text = nn.Linear(n_text * feat, width) if n_text > 0 else None
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * EMBED_INIT_STD)
        self.attn1 = GatedCrossAttention(width, num_attn_heads, with_text=n_text > 0, gated=True, dropout=dropout)
        self.attn2 = GatedCrossAttention(width, num_attn_heads, with_text=False, gated=False, dropout=dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width),
                                nn.Dropout(dropout))
        self.head = nn.Linear(width, out_dim)

    def fuse(self, image_taps: Sequence[Tensor], text_taps: Sequence[Tensor], cond: Tensor
             ) -> tuple[Tensor, Tensor | None]:
        """FiLM-project each tap under ``cond`` (B, D) and fuse the taps per token: (B, N, W), (B, L, W) | None."""
        if len(image_taps) != len(self.layer_adapters_visual) or len(text_taps) != len(self.layer_adapters_text):
            raise ValueError(f"RewardHead expects {len(self.layer_adapters_visual)} image and "
                             f"{len(self.layer_adapters_text)} text taps, got {len(image_taps)} and {len(text_taps)}")
        image = self.agg_visual(torch.cat([a(x, cond) for a, x in zip(self.layer_adapters_visual, image_taps)], -1))
        if self.agg_text is None:
            return image, None
        text = self.agg_text(torch.cat([a(x, cond) for a, x in zip(self.layer_adapters_text, text_taps)], -1))
        return image, text

    def pool(self, image: Tensor, text: Tensor | None) -> Tensor:
        """Q-Former over fused tokens -> (B, out_dim): the mean of the per-query scores."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        queries = self.attn1(queries, image, text)
        queries = self.attn2(queries, image)
        queries = queries + self.ff(self.norm_ff(queries))
        return self.head(queries).mean(dim=1)

    def forward(self, image_taps: Sequence[Tensor], text_taps: Sequence[Tensor], cond: Tensor) -> Tensor:
        return self.pool(*self.fuse(image_taps, text_taps, cond))

    def forward_levels(self, taps_per_level: Sequence[tuple[Sequence[Tensor], Sequence[Tensor], Tensor]]) -> Tensor:
        """Noise ensemble: fuse each level's taps under its own conditioning, concatenate tokens, pool once."""
        fused = [self.fuse(image, text, cond) for image, text, cond in taps_per_level]
        image = torch.cat([f[0] for f in fused], dim=1)
        text = torch.cat([f[1] for f in fused], dim=1) if fused[0][1] is not None else None
        return self.pool(image, text)
