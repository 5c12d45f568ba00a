"""One Flow-GRPO epoch on every rank of an ``accelerate launch`` (run by ``tests/test_flow_grpo_trainer.py``).

Usage: ``flow_grpo_ranks.py RECIPE.json OUT.pt``. Rolls out epoch 0, computes the advantages from the rewards
of all ranks, takes one optimiser update, and has the main process save every image's reward and advantage
(by global image index) with the update's statistics.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(recipe_path: str, out_path: str) -> None:
    from rlkit.config import recipe_from_dict
    from rlkit.runtime.accelerator import close_process_group
    from rlkit.trainers.flow_grpo import plan_epoch, rollout_epoch, train_update
    from rlkit.trainers.loop import PolicyRun

    recipe = recipe_from_dict(json.loads(open(recipe_path).read()), file=recipe_path)
    cfg = recipe.flow_grpo
    plan = plan_epoch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    run = PolicyRun.setup(recipe, total_updates=1, micro_batch=cfg.batch_size, grad_accum=plan.grad_accum)
    assert run.world == 2, f"expected 2 processes, the accelerator has {run.world}"
    data = rollout_epoch(run, cfg, plan, 0, recipe.seed, recipe.model.resolution)
    module = run.accelerator.unwrap_model(run.model)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    stats = train_update(run, cfg, plan, data, 0, 0, recipe.seed)
    run.end_update(stats)
    # the first update from a gaussian-init LoRA (B = 0) moves every lora_B (lora_A has no gradient yet)
    unchanged = [n for n, p in module.named_parameters() if n in before and "lora_B" in n
                 and torch.equal(p.detach(), before[n])]
    if run.accelerator.is_main_process:
        torch.save({"rewards": data.all_rewards.cpu(), "advantages": data.all_advantages.cpu(), "steps": run.step,
                    "kl": stats["kl"], "unchanged_lora_B": unchanged, "before": before,
                    "after": {n: p.detach().cpu().clone() for n, p in module.named_parameters() if n in before}},
                   out_path)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
