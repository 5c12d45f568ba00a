"""Two ranks under accelerate + DeepSpeed ZeRO-N in bf16: the EMA averages the optimiser's fp32 master weights.

Run by ``tests/test_distributed.py`` through ``accelerate launch``; each rank writes ``rank{i}.pt`` with, after
every step, the EMA's average (decay 0: the latest value), DeepSpeed's fp32 masters and the module's bf16 copy,
and what the module held inside ``EMA.applied`` and after it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

SEED = 0
MICRO_BATCH = 4
STEPS = 3
LR = 0.01  # Adam moves every weight by about this much a step: below a bf16 step for weights above ~1.3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True, help="ZeRO stage (2 or 3)")
    args = parser.parse_args()

    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see zero_equivalence.py
    from deepspeed.utils import safe_get_full_fp32_param

    from rlkit.config import LaunchConfig
    from rlkit.runtime.accelerator import build_accelerator, gathered
    from rlkit.runtime.ema import EMA

    accelerator = build_accelerator(LaunchConfig(num_processes=2, deepspeed=args.stage, mixed_precision="bf16"),
                                    micro_batch=MICRO_BATCH)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # weights of a few units, where a bf16 step (2^-6 and up) exceeds Adam's
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model, opt = accelerator.prepare(model, opt)
    params = list(accelerator.unwrap_model(model).parameters())
    ema = EMA(params, decay=0.0)

    def module_copy() -> list[torch.Tensor]:
        with gathered(params):
            return [p.detach().clone() for p in params]

    averages, masters, copies = [], [], []
    g = torch.Generator().manual_seed(SEED + 1 + accelerator.process_index)
    for _ in range(STEPS):
        x = torch.randn(MICRO_BATCH, 8, generator=g).to(torch.bfloat16)
        accelerator.backward(model(x).float().square().mean())
        opt.step()
        opt.zero_grad()
        ema.update()
        averages.append([s.clone() for s in ema.shadow])
        masters.append([safe_get_full_fp32_param(p).detach().clone() for p in params])
        copies.append(module_copy())
    before = module_copy()
    with ema.applied():
        inside = module_copy()
    torch.save({"averages": averages, "masters": masters, "copies": copies, "before": before, "inside": inside,
                "after": module_copy(), "dtype": str(params[0].dtype)},
               Path(args.out) / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
