"""Held-out evaluation shared by every trainer: fixed prompts, fixed seeds, golden rewards never differentiated.

Each evaluation samples the same noise for the same (prompt, image) slot, so curves compare like with like. The
noise is drawn per slot, seeded by the evaluation's seed and the slot's index (the sampler's starting noise, and
apart from it the noise a stochastic reward such as DiNa-LRM draws), so a slot's sample and scores do not depend on
the batch size or the number of processes, and runs whose evaluations share prompts, seed and sampler draw the same
samples from the same policy. Golden and proxy scores are averaged, an image grid is written, and the first golden
reward drives early stopping. On several processes each samples and scores its share of the slots (:class:`Shard`).

Every slot's scores are also written, per evaluation, to ``<run>/eval_scores/step_<N>.json`` (:func:`read_scores`):
for a per-prompt breakdown, and for the standard error of a gain between two evaluations (:func:`gain_sem`). As
both evaluations score the same prompts from the same noise, that error is the one of the per-slot differences,
which removes what the slots share (their prompt, their noise); it is smaller than the two means' errors taken
as independent (``sqrt(se_a^2 + se_b^2)``, the fallback where a file is missing).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rewards.base import MemoDecode, Reward, RewardInput
from rlkit.runtime.checkpoint import write_text_atomic
from rlkit.runtime.seeding import make_generator

SCORES_DIR = "eval_scores"


def scores_path(run_dir: str | Path, step: int) -> Path:
    """Where the evaluation after update ``step`` wrote every slot's scores."""
    return Path(run_dir) / SCORES_DIR / f"step_{step:06d}.json"


Scores = tuple[list[str], dict[str, Tensor]]  # every slot's prompt, and each key's per-slot values


def read_scores(run_dir: str | Path, step: int) -> Scores | None:
    """The prompt of every slot and each score key's per-slot values (keys as logged, without ``eval/``) of the
    evaluation after update ``step``; ``None`` when that evaluation wrote no file."""
    path = scores_path(run_dir, step)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["prompts"], {k: torch.tensor(v, dtype=torch.float64) for k, v in data["scores"].items()}


def gain_sem(run_dir: str | Path, key: str, first: int, last: int) -> float | None:
    """Standard error of ``key``'s mean gain from the evaluation after update ``first`` to the one after ``last``,
    paired by slot: ``std(after - before) / sqrt(slots)``. ``None`` unless both evaluations wrote the same slots.

    The evaluation enumerates its prompts, so the prompts are not a sample and the slots' noise is the only chance
    in a mean; pairing removes the part of it both evaluations share (each slot's prompt and starting noise)."""
    return paired_sem(read_scores(run_dir, first), read_scores(run_dir, last), key)


def paired_scores(before: Scores | None, after: Scores | None, key: str) -> tuple[list[str], Tensor, Tensor] | None:
    """Two evaluations' per-slot values of ``key`` and the slots' prompts, or ``None`` unless both hold ``key`` for
    the same slots."""
    if before is None or after is None or before[0] != after[0] or key not in before[1] or key not in after[1]:
        return None
    return before[0], before[1][key], after[1][key]


def paired_sem(before: Scores | None, after: Scores | None, key: str) -> float | None:
    """:func:`gain_sem` of two evaluations' scores as read (``None`` unless both hold ``key`` for the same slots)."""
    paired = paired_scores(before, after, key)
    if paired is None or len(paired[0]) < 2:
        return None
    diff = paired[2] - paired[1]
    return float(diff.std() / len(diff) ** 0.5)


def grid_indices(num_prompts: int, per_prompt: int, limit: int) -> list[int]:
    """Which evaluation samples a grid shows: every prompt's first image, then every prompt's second, ...

    Samples are laid out prompt by prompt, so the first ``limit`` would show a handful of prompts only.
    """
    order = [p * per_prompt + k for k in range(per_prompt) for p in range(num_prompts)]
    return order[:max(limit, 0)]


@dataclass(frozen=True)
class Shard:
    """One process's share of an evaluation on ``world`` processes: the batches ``rank, rank + world, ...``.

    Every rank runs as many batches (one that runs short repeats the first and drops it), since under ZeRO-3 each
    forward pass is a collective. ``gather`` concatenates every rank's tensor along dim 0 (the accelerator's
    gather, CPU tensors in and out).
    """

    rank: int = 0
    world: int = 1
    gather: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world or (self.world > 1 and self.gather is None):
            raise ValueError(f"Shard: rank {self.rank} of {self.world} processes needs 0 <= rank < world and, "
                             "on more than one process, a gather")

    def starts(self, starts: list[int]) -> list[int | None]:
        """This rank's batch starts of ``starts``; ``None`` where it repeats a batch to keep in step."""
        per_rank = -(-len(starts) // self.world)
        return [starts[i] if i < len(starts) else None for i in range(self.rank, per_rank * self.world, self.world)]

    def combine(self, local: Tensor) -> Tensor:
        return local if self.world == 1 else self.gather(local)


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]
    images_path: Path | None = None


@torch.no_grad()
def score_all(rewards: dict[str, Reward], prompts: list[str], latents: Tensor, decode, text=None,
              generator: torch.Generator | list[torch.Generator] | None = None) -> dict[str, Tensor]:
    """Scores ``latents`` with every reward; the VAE decode is shared and runs only if a pixel reward asks."""
    memo = MemoDecode(decode)
    batch = RewardInput(prompts=prompts, latents=latents, sigmas=torch.zeros(len(prompts), device=latents.device),
                        text=text, decode=memo, generator=generator)
    out: dict[str, Tensor] = {}
    for name, reward in rewards.items():
        with reward.held_out():  # the training reward's running statistics stay the training batches'
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
    # per reward normalised by running statistics (a mixture with z-scored components): the statistics of its
    # components' scores at the first evaluation, which every evaluation normalises by (:meth:`_fixed_scale`);
    # None for a run resumed from a checkpoint that predates it, which goes on with the running statistics
    reference: dict[str, dict[str, tuple[float, float]]] | None = field(default_factory=dict)
    # evaluations draw each slot's noise from a seed of its own; an older rlkit drew it per batch. For a run resumed
    # from such a checkpoint: its last evaluation's step, the end of the curve's per-batch part (else None)
    per_batch_until: int | None = None
    _bad_evals: int = 0

    @property
    def slots(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]

    @torch.no_grad()
    def run(self, gen, step: int, out_dir: str | Path | None = None, transformer=None,
            shard: Shard = Shard()) -> EvalResult:
        """Samples and scores this process's share of the slots, gathers every share, and writes the grid to
        ``out_dir`` (the main process's; ``None`` on the others)."""
        slots = self.slots
        starts = list(range(0, len(slots), self.batch_size))
        picks = grid_indices(len(self.prompts), self.images_per_prompt, self.grid_images)
        rows: dict[int, dict[str, Tensor]] = {}
        picked: Tensor | None = None
        keys: list[str] = []
        for start in shard.starts(starts):
            first = starts[0] if start is None else start
            chunk = slots[first:first + self.batch_size]
            latents = self._sample(gen, chunk, first, transformer)
            scores = self._score(gen, chunk, latents, first)
            keys = sorted(scores)  # a repeated batch's too: a rank may have no batch of its own
            if picked is None:
                picked, dtype = torch.zeros(len(picks), *latents.shape[1:]), latents.dtype
            if start is None:
                continue
            rows[start] = scores
            for i, slot in enumerate(picks):
                if start <= slot < start + len(chunk):
                    picked[i] = latents[slot - start].cpu()
        scores = self._fixed_scale(self._gather_scores(rows, keys, starts, len(slots), shard))
        metrics = {f"eval/{k}": v.mean().item() for k, v in scores.items()}
        metrics.update({f"eval/{k}_sem": (v.std() / len(slots) ** 0.5).item()
                        for k, v in scores.items() if k.startswith("golden/") and "/" not in k[7:]})
        if out_dir is not None:
            self._write_scores(out_dir, step, slots, scores)
        images_path = None
        if picks:
            picked = shard.combine(picked[None]).sum(0)  # each pick is non-zero on the rank that sampled it
        if out_dir is not None and picks:
            from rlkit.runtime.images import save_image_grid

            images = torch.cat([gen.decode(picked[i:i + self.batch_size].to(gen.device, dtype)).cpu()
                                for i in range(0, len(picks), self.batch_size)])
            images_path = Path(out_dir) / "samples" / f"step_{step:06d}.png"
            save_image_grid(images, images_path, captions=[slots[i] for i in picks])
        result = EvalResult(step, metrics, images_path)
        self._update_patience(result)
        self.history.append(result)
        return result

    @staticmethod
    def _write_scores(out_dir: str | Path, step: int, slots: list[str], scores: dict[str, Tensor]) -> None:
        data = {"step": step, "prompts": slots, "scores": {k: v.tolist() for k, v in scores.items()}}
        write_text_atomic(scores_path(out_dir, step), json.dumps(data))

    def _sample(self, gen, chunk: list[str], start: int, transformer) -> Tensor:
        from rlkit.rollout import per_image_generators, sample

        generators = per_image_generators(self.seed, range(start, start + len(chunk)))
        return sample(gen, chunk, num_steps=self.num_steps, guidance_scale=self.guidance_scale, generator=generators,
                      transformer=transformer, resolution=self.resolution)

    def _score(self, gen, chunk: list[str], latents: Tensor, start: int) -> dict[str, Tensor]:
        # a stream of its own per slot: a CPU generator keeps 32 bits of its seed, so seed + 2^32 + i would replay
        # the sampler's starting noise (seed + i), and a reward re-noising the sample would retrace its path
        g = [make_generator(self.seed, "eval/reward", i) for i in range(start, start + len(chunk))]
        return score_all({**{f"golden/{k}": r for k, r in self.golden.items()},
                          **{f"proxy/{k}": r for k, r in self.proxy.items()}},
                         chunk, latents, gen.decode, text=gen.encode_prompts(chunk), generator=g)

    def _fixed_scale(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """``scores`` with every reward that normalises by running statistics (``WeightedReward.zscored``) recomputed
        on one scale for the whole run: the statistics its components' scores had at the first evaluation (the base
        policy's), instead of the training batches' of the moment."""
        if self.reference is None:
            return scores
        for prefix, rewards in (("golden", self.golden), ("proxy", self.proxy)):
            for name, reward in rewards.items():
                if not getattr(reward, "zscored", None):
                    continue
                key = f"{prefix}/{name}"
                parts = {k.removeprefix(f"{key}/"): v for k, v in scores.items() if k.startswith(f"{key}/")}
                if key not in self.reference:
                    self.reference[key] = reward.held_out_reference(parts)
                scores[key], normalized = reward.held_out_total(parts, self.reference[key])
                scores.update({f"{key}/{k}": v for k, v in normalized.items()})
        return scores

    def _gather_scores(self, rows: dict[int, dict[str, Tensor]], keys: list[str], starts: list[int],
                       num_slots: int, shard: Shard) -> dict[str, Tensor]:
        """Every slot's scores in slot order, from the batches each rank scored (``rows``: start -> scores)."""
        if shard.world > 1:  # a fixed-size table per rank (its last batch may be short), NaN-padded
            widths = shard.combine(torch.tensor([len(keys)]))
            if int(widths.min()) != int(widths.max()):
                raise RuntimeError(f"evaluation: the ranks' rewards returned {widths.tolist()} kinds of score")
            if not keys:
                return {}
            per_rank = len(shard.starts(starts))
            table = torch.full((per_rank, self.batch_size, len(keys)), float("nan"))
            index = torch.full((per_rank,), -1, dtype=torch.long)
            for j, (start, scores) in enumerate(rows.items()):
                n = len(scores[keys[0]])
                table[j, :n] = torch.stack([scores[k] for k in keys], -1)
                index[j] = start
            table, index = shard.combine(table), shard.combine(index)
            rows = {int(start): {k: table[j, :min(self.batch_size, num_slots - int(start)), i]
                                 for i, k in enumerate(keys)}
                    for j, start in enumerate(index.tolist()) if start >= 0}
        return {k: torch.cat([rows[start][k] for start in starts]).contiguous() for k in keys}

    @property
    def primary_key(self) -> str | None:
        return f"eval/golden/{next(iter(self.golden))}" if self.golden else None

    def _update_patience(self, result: EvalResult) -> None:
        key = self.primary_key
        past = [r.metrics[key] for r in self.history if key is not None and key in r.metrics]
        if not past:  # no golden reward, or one that joined on resume: it has no history to fall from yet
            self._bad_evals = 0
            return
        self._bad_evals = self._bad_evals + 1 if result.metrics[key] < max(past) else 0

    def state_dict(self) -> dict:
        return {"history": [(r.step, r.metrics) for r in self.history], "bad_evals": self._bad_evals,
                "reference": self.reference, "per_batch_until": self.per_batch_until}

    def load_state_dict(self, state: dict) -> None:
        self.history = [EvalResult(step, metrics) for step, metrics in state["history"]]
        self._bad_evals = int(state["bad_evals"])
        # a state without a reference comes from the rlkit before per-sample noise (both came in one release)
        old = bool(self.history) and "reference" not in state
        self.per_batch_until = state.get("per_batch_until", self.history[-1].step if old else None)
        if self.per_batch_until is not None:
            warnings.warn(f"evaluation: this run's evaluations up to step {self.per_batch_until} drew their noise per "
                          "batch (an older rlkit), those after it per sample, so the curve's two parts differ by a "
                          "fresh draw of evaluation noise as well", stacklevel=2)
        reference = state.get("reference", {} if not self.history else None)
        if reference is None:
            if any(getattr(r, "zscored", None) for r in (*self.golden.values(), *self.proxy.values())):
                warnings.warn("evaluation: the checkpoint predates the fixed held-out scale of z-scored rewards, whose "
                              "first evaluation it would need; this run goes on normalising them by the running "
                              "training statistics, as its earlier evaluations did", stacklevel=2)
            self.reference = None
            return
        self.reference = {k: {c: tuple(v) for c, v in ref.items()} for k, ref in reference.items()}

    @property
    def should_stop(self) -> bool:
        """Early stopping: the first golden reward fell below its best for ``patience`` evaluations in a row."""
        return self.patience > 0 and self._bad_evals >= self.patience
