"""Two ranks under accelerate + DeepSpeed ZeRO-N take optimiser steps on their halves of a global batch.

Run by ``tests/test_distributed.py`` through ``accelerate launch``; each rank writes ``rank{i}.pt`` with what
accelerate reports about the process group, the data it saw and the trainable weights after the steps. The
test compares them with :func:`reference_params`, one process on the union of both ranks' data. The model
is a tiny MLP and a tiny SD3 transformer with a policy LoRA, in one module (DeepSpeed takes one model per
accelerator), plus a frozen helper prepared with ``prepare_frozen``, an EMA of the trainable weights and a
checkpoint save/restore round trip.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

SEED = 0
MICRO_BATCH = 2
STEPS = 2
LR = 0.5
MOMENTUM = 0.9  # optimiser state that ZeRO shards; SGD (unlike Adam) shows any error in the gradient's scale
EMA_DECAY = 0.5
GRAD_CLIP = 0.5  # small enough that clipping is active (the test checks the reference norms exceed it)
LORA_RANK, LORA_ALPHA = 4, 8.0
MLP_IN, MLP_HIDDEN, MLP_OUT = 8, 16, 4
TEXT_LEN = 5


class Pair(nn.Module):
    """A tiny MLP and a tiny LoRA'd SD3 transformer trained on one summed loss."""

    def __init__(self):
        super().__init__()
        from rlkit.models.lora import add_lora
        from rlkit.models.tiny import build_tiny_sd3_components

        torch.manual_seed(SEED)
        self.mlp = nn.Sequential(nn.Linear(MLP_IN, MLP_HIDDEN), nn.Tanh(), nn.Linear(MLP_HIDDEN, MLP_OUT))
        self.transformer = build_tiny_sd3_components(seed=SEED)["transformer"]
        self.transformer.requires_grad_(False)
        torch.manual_seed(SEED + 1)
        add_lora(self.transformer, "policy", LORA_RANK, LORA_ALPHA, init="gaussian")

    def forward(self, batch: dict) -> torch.Tensor:
        mlp_loss = (self.mlp(batch["x"]) - batch["y"]).square().mean()
        velocity = self.transformer(hidden_states=batch["latents"], encoder_hidden_states=batch["text"],
                                    pooled_projections=batch["pooled"], timestep=batch["timestep"],
                                    return_dict=False)[0]
        return mlp_loss + (velocity - batch["target"]).square().mean()


def global_batch(step: int, size: int) -> dict:
    """The batch of one step for all ranks together (drawn from a generator shared by every rank)."""
    from rlkit.models.tiny import TinySD3Config
    from rlkit.runtime.seeding import make_generator

    cfg = TinySD3Config()
    g = make_generator(SEED, "data", step)
    latent = (size, cfg.latent_channels, cfg.sample_size, cfg.sample_size)
    return {
        "x": torch.randn(size, MLP_IN, generator=g),
        "y": torch.randn(size, MLP_OUT, generator=g),
        "latents": torch.randn(latent, generator=g),
        "target": torch.randn(latent, generator=g),
        "text": torch.randn(size, TEXT_LEN, cfg.joint_attention_dim, generator=g),
        "pooled": torch.randn(size, cfg.pooled_projection_dim, generator=g),
        "timestep": 1000 * torch.rand(size, generator=g),
    }


def rank_slice(batch: dict, rank: int, micro: int) -> dict:
    return {k: v[rank * micro:(rank + 1) * micro] for k, v in batch.items()}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def reference_params(world: int) -> tuple[dict[str, torch.Tensor], list[float], dict[str, torch.Tensor]]:
    """One process on the union of the ranks' batches: the weights, the pre-clip gradient norms, the EMA weights."""
    from rlkit.runtime.ema import EMA

    model = Pair()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params)
    ema = EMA(params, decay=EMA_DECAY)
    norms = []
    for step in range(STEPS):
        model(global_batch(step, MICRO_BATCH * world)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)))
        opt.step()
        opt.zero_grad()
        ema.update()
    with ema.applied():
        ema_state = trainable_state(model)
    return trainable_state(model), norms, ema_state


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True, help="ZeRO stage; 0 = plain DDP")
    args = parser.parse_args()

    import deepspeed.ops

    # DeepSpeed's shared-memory all-reduce (an inference speed-up) is JIT-compiled by a C++ compiler on first
    # use (minutes); training collectives go through gloo either way.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from rlkit.config import LaunchConfig
    from rlkit.runtime.accelerator import build_accelerator, prepare_frozen
    from rlkit.runtime.checkpoint import CheckpointManager
    from rlkit.runtime.ema import EMA

    world = 2
    accelerator = build_accelerator(LaunchConfig(num_processes=world, deepspeed=args.stage or None),
                                    grad_clip=GRAD_CLIP, micro_batch=MICRO_BATCH)
    rank = accelerator.process_index
    model = Pair()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    model, opt = accelerator.prepare(model, opt)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA([p for p in unwrapped.parameters() if p.requires_grad], decay=EMA_DECAY)

    frozen = nn.Linear(MLP_IN, MLP_OUT)
    probe = torch.randn(3, MLP_IN, generator=torch.Generator().manual_seed(SEED))
    frozen_want = frozen(probe).detach()
    frozen = prepare_frozen(accelerator, copy.deepcopy(frozen))
    with torch.no_grad():
        frozen_got = frozen(probe)

    seen, norms = [], []
    for step in range(STEPS):
        local = rank_slice(global_batch(step, MICRO_BATCH * accelerator.num_processes), rank, MICRO_BATCH)
        seen.append(local["x"])
        loss = model(local)
        accelerator.backward(loss)  # the DeepSpeed engine averages, clips and steps here
        if args.stage:
            norms.append(float(model.get_global_grad_norm()))
        else:
            norms.append(float(accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
        opt.step()
        opt.zero_grad()
        ema.update()

    gather = dict(params=list(unwrapped.parameters()), enabled=args.stage == 3)
    with deepspeed.zero.GatheredParameters(**gather):
        state = trainable_state(unwrapped)
    with ema.applied(), deepspeed.zero.GatheredParameters(**gather):
        ema_state = trainable_state(unwrapped)

    # checkpoint, take one more step, restore: the weights are those of the checkpoint again
    checkpoints = CheckpointManager(Path(args.out) / "checkpoints", keep_last=1)
    checkpoints.save(accelerator, STEPS, extra={"ema": ema.state_dict()})
    local = rank_slice(global_batch(STEPS, MICRO_BATCH * accelerator.num_processes), rank, MICRO_BATCH)
    accelerator.backward(model(local))
    opt.step()
    opt.zero_grad()
    with deepspeed.zero.GatheredParameters(**gather):
        moved = trainable_state(unwrapped)
    resumed = checkpoints.load_latest(accelerator)
    with deepspeed.zero.GatheredParameters(**gather):
        restored = trainable_state(unwrapped)
    torch.save({
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "dist_world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "seen_x": torch.stack(seen),
        "params": state,
        "ema_params": ema_state,
        "moved_params": moved,
        "restored_params": restored,
        "resumed_step": resumed["step"],
        "resumed_ema_updates": resumed["ema"]["num_updates"],
        "grad_norms": norms,
        "frozen_max_diff": float((frozen_got - frozen_want).abs().max()),
        "engine": type(model).__name__,
        "distributed_type": str(accelerator.distributed_type),
    }, Path(args.out) / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
