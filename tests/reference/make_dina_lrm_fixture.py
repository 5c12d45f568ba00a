"""Regenerates ``tests/fixtures/dina_lrm/`` with the reference implementation of the official code.

Run from the repository root::

    python -m tests.reference.make_dina_lrm_fixture

Writes a tiny SD3 transformer (every weight random), a DiNa-LRM checkpoint in the release's layout on its
first blocks (every weight random, the zero-initialised ones included), inputs and the reference's outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .official_dina_lrm import (
    SD3RewardModel,
    official_config,
    randomize_,
    reward,
    reward_ensemble,
    save_checkpoint,
    to_namespace,
)

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "dina_lrm"
SEED = 1234
NUM_LAYERS = 3
VISUAL_TAPS = (1, 2, 3)
TEXT_TAPS = (2, 3)
LORA_R, LORA_ALPHA = 4, 8
BATCH, TEXT_LEN = 2, 12
FORWARD_TIMESTEPS = (250.0, 700.0)
RENOISE_U = 0.4
ENSEMBLE_LEVELS = (0.2, 0.5, 0.7)
SCHEDULER_SHIFT = 3.0


def tiny_transformer(seed: int):
    """The tiny SD3 transformer of ``rlkit.models.tiny`` (dual attention, qk RMS-norm), all weights random."""
    from rlkit.models.tiny import TinySD3Config, build_tiny_sd3_components

    transformer = build_tiny_sd3_components(TinySD3Config(), seed=seed)["transformer"]
    randomize_(transformer, torch.Generator().manual_seed(seed), scale=1.0)
    return transformer.eval()


def make_inputs(transformer, generator: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = transformer.config
    latent_shape = (BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return {
        "latents": torch.randn(latent_shape, generator=generator),
        "noise": torch.randn(latent_shape, generator=generator),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, cfg.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(BATCH, cfg.pooled_projection_dim, generator=generator),
        "timesteps": torch.tensor(FORWARD_TIMESTEPS),
    }


@torch.no_grad()
def build(out_dir: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_transformer(SEED).save_pretrained(out_dir / "base_transformer")
    # the reference wraps (and peft mutates) the blocks it is given: build it on a fresh load of the saved base
    transformer = SD3Transformer2DModel.from_pretrained(out_dir / "base_transformer").eval()
    config = official_config(NUM_LAYERS, VISUAL_TAPS, TEXT_TAPS, r=LORA_R, alpha=LORA_ALPHA)
    torch.manual_seed(SEED)
    model = SD3RewardModel(transformer, to_namespace(config["model"])).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    randomize_(model.reward_head, generator)
    for name, p in model.backbone.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5 / p.shape[-1] ** 0.5)
    save_checkpoint(model, config, str(out_dir / "rm"))

    inputs = make_inputs(transformer, generator)
    text = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "pooled_projections": inputs["pooled_projections"]}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)
    expected = {
        "forward": model(latents=inputs["latents"], timesteps=inputs["timesteps"], **text)[:, 0],
        "reward_u": reward(model, scheduler, text, inputs["latents"], RENOISE_U, inputs["noise"])[:, 0],
        "ensemble": reward_ensemble(model, scheduler, text, inputs["latents"], ENSEMBLE_LEVELS,
                                    inputs["noise"])[:, 0],
    }
    torch.save({**inputs, "renoise_u": torch.tensor(RENOISE_U), "levels": torch.tensor(ENSEMBLE_LEVELS),
                "expected": expected}, out_dir / "io.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
