"""Held-out evaluation shared by every trainer: fixed prompts, fixed seeds, golden rewards never differentiated.

Each evaluation samples the same noise for the same (prompt, image) slot, so curves compare like with like;
golden and proxy scores are averaged, an image grid is written, and the first golden reward drives early
stopping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rewards.base import MemoDecode, Reward, RewardInput


def grid_indices(num_prompts: int, per_prompt: int, limit: int) -> list[int]:
    """Which evaluation samples a grid shows: every prompt's first image, then every prompt's second, ...

    Samples are laid out prompt by prompt, so the first ``limit`` would show a handful of prompts only.
    """
    order = [p * per_prompt + k for k in range(per_prompt) for p in range(num_prompts)]
    return order[:max(limit, 0)]


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]
    images_path: Path | None = None


@torch.no_grad()
def score_all(rewards: dict[str, Reward], prompts: list[str], latents: Tensor, decode, text=None,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Scores ``latents`` with every reward; the VAE decode is shared and runs only if a pixel reward asks."""
    memo = MemoDecode(decode)
    batch = RewardInput(prompts=prompts, latents=latents, sigmas=torch.zeros(len(prompts), device=latents.device),
                        text=text, decode=memo, generator=generator)
    out: dict[str, Tensor] = {}
    for name, reward in rewards.items():
        result = reward(batch)
        out[name] = result.scores.detach().float().cpu()
        for key, value in result.extras.items():
            if value.ndim == 1 and value.shape[0] == len(prompts):
                out[f"{name}/{key}"] = value.detach().float().cpu()
    return out


@dataclass
class Evaluator:
    """Samples held-out prompts with fixed seeds and scores them; tracks the early-stopping signal."""

    prompts: list[str]
    images_per_prompt: int
    seed: int
    num_steps: int
    guidance_scale: float
    golden: dict[str, Reward]
    proxy: dict[str, Reward]
    batch_size: int = 16
    resolution: int | None = None
    grid_images: int = 16
    patience: int = 0
    history: list[EvalResult] = field(default_factory=list)
    _bad_evals: int = 0

    @property
    def slots(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]

    @torch.no_grad()
    def sample(self, gen, transformer=None) -> tuple[list[str], Tensor]:
        from rlkit.rollout import sample

        slots = self.slots
        latents = []
        for start in range(0, len(slots), self.batch_size):
            chunk = slots[start:start + self.batch_size]
            g = torch.Generator(device="cpu").manual_seed(self.seed + start)
            latents.append(sample(gen, chunk, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                                  generator=g, transformer=transformer, resolution=self.resolution))
        return slots, torch.cat(latents)

    @torch.no_grad()
    def run(self, gen, step: int, out_dir: str | Path | None = None, transformer=None) -> EvalResult:
        slots, latents = self.sample(gen, transformer)
        scores: dict[str, list[Tensor]] = {}
        for start in range(0, len(slots), self.batch_size):
            chunk = slots[start:start + self.batch_size]
            z = latents[start:start + self.batch_size]
            g = torch.Generator(device="cpu").manual_seed(self.seed + 7919 + start)
            text = gen.encode_prompts(chunk)
            part = score_all({**{f"golden/{k}": r for k, r in self.golden.items()},
                              **{f"proxy/{k}": r for k, r in self.proxy.items()}},
                             chunk, z, gen.decode, text=text, generator=g)
            for key, value in part.items():
                scores.setdefault(key, []).append(value)
        metrics = {f"eval/{k}": torch.cat(v).mean().item() for k, v in scores.items()}
        metrics.update({f"eval/{k}_sem": (torch.cat(v).std() / len(slots) ** 0.5).item()
                        for k, v in scores.items() if k.startswith("golden/") and "/" not in k[7:]})
        images_path = None
        picks = grid_indices(len(self.prompts), self.images_per_prompt, self.grid_images)
        if out_dir is not None and picks:
            from rlkit.runtime.images import save_image_grid

            images = torch.cat([gen.decode(latents[picks[i:i + self.batch_size]]).cpu()
                                for i in range(0, len(picks), self.batch_size)])
            images_path = Path(out_dir) / "samples" / f"step_{step:06d}.png"
            save_image_grid(images, images_path, captions=[slots[i] for i in picks])
        result = EvalResult(step, metrics, images_path)
        self._update_patience(result)
        self.history.append(result)
        return result

    @property
    def primary_key(self) -> str | None:
        return f"eval/golden/{next(iter(self.golden))}" if self.golden else None

    def _update_patience(self, result: EvalResult) -> None:
        key = self.primary_key
        if key is None or not self.history:
            return
        best = max(r.metrics[key] for r in self.history)
        self._bad_evals = self._bad_evals + 1 if result.metrics[key] < best else 0

    def state_dict(self) -> dict:
        return {"history": [(r.step, r.metrics) for r in self.history], "bad_evals": self._bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.history = [EvalResult(step, metrics) for step, metrics in state["history"]]
        self._bad_evals = int(state["bad_evals"])

    @property
    def should_stop(self) -> bool:
        """Early stopping: the first golden reward fell below its best for ``patience`` evaluations in a row."""
        return self.patience > 0 and self._bad_evals >= self.patience
