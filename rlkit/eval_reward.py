"""``rlkit eval-reward``: pairwise accuracy of any registered reward on any preference set.

    rlkit eval-reward --reward dina-lrm --args pretrained=liuhuohuo/DiNa-LRM-SD35M-12layers \\
        --data data/hpdv3_test.parquet --generator stabilityai/stable-diffusion-3.5-medium \\
        --levels 0.1,0.3,0.4,0.5,0.7,0.9 --out runs/eval_dina

Convention (stated in every report): a pair is a *win* when ``score(chosen) - score(rejected) > tie_tol``,
a *tie* when ``|difference| <= tie_tol``, else a *loss*. ``accuracy = wins / pairs`` (ties count as wrong),
``accuracy_ties_half = (wins + ties / 2) / pairs``, ``accuracy_no_ties = wins / (wins + losses)``; the
confidence interval (Wilson score by default, or a seeded percentile bootstrap) is for ``accuracy``.
Pairs labelled as ties in the data (label 0.5) have no right answer and are left out (counted).

Rows: ``reward`` scores the clean pairs with the reward as configured (a stochastic reward gets the same
generator state for the chosen and the rejected image, so both see the same noise); ``u=<level>`` rows
(``--levels``, noise-aware latent rewards) noise both latents of a pair with one shared eps,
``x_u = (1 - u) x0 + u eps``, and ask the reward to score that state at its own ``sigma = u``;
``ensemble(...)`` (``--ensemble``) runs the reward's own noise ensemble over those levels, one eps shared by
the chosen and the rejected latent. ``--pair-noise independent`` draws the chosen and the rejected side's noise
apart instead, as the DiNa-LRM release's benchmark code does (use it to compare with the paper's tables); shared
noise compares the two sides at the same noise and gives the lower-variance estimate. Rewards with scoring
modes (DiNa-LRM's ``options.mode``: ``renoise``, ``state``, ``ensemble``) are switched to ``state`` for the level
rows and to ``ensemble`` for the ensemble row, and restored afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from rewards.base import Reward, RewardInput
from rlkit.data import LoadOptions, PreferenceDataError, PreferencePair, load_pairs, load_side
from rlkit.evaluate import Shard
from rlkit.runtime.seeding import derive_seed

CIMethod = Literal["wilson", "bootstrap"]
PairNoise = Literal["shared", "independent"]
CONVENTION = ("win: score(chosen) - score(rejected) > tie_tol; tie: |difference| <= tie_tol; "
              "accuracy = wins / pairs (ties count as wrong); accuracy_ties_half = (wins + ties/2) / pairs; "
              "accuracy_no_ties = wins / (wins + losses); the CI is for accuracy")
CLEAN_ROW = "reward"
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP_SAMPLES = 2000
ROW_SEED_STRIDE = 1_000_003  # per-batch generator seeds: seed + ROW * row + BATCH * batch + group
BATCH_SEED_STRIDE = 1009


# --------------------------------------------------------------------------------------------------
# statistics


def wilson_interval(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(outcomes: Tensor, confidence: float = DEFAULT_CONFIDENCE,
                       samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean of ``outcomes`` (1 = win, 0 otherwise), seeded."""
    n = outcomes.numel()
    if n == 0:
        return 0.0, 1.0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (samples, n), generator=gen)
    means = outcomes.double()[idx].mean(dim=1)
    lo = torch.quantile(means, (1 - confidence) / 2).item()
    hi = torch.quantile(means, 1 - (1 - confidence) / 2).item()
    return lo, hi


@dataclass
class PairwiseResult:
    """Accuracy of one row (one noise setting) of an evaluation."""

    setting: str
    pairs: int
    wins: int
    ties: int
    losses: int
    accuracy: float  # wins / pairs
    accuracy_ties_half: float  # (wins + ties / 2) / pairs
    accuracy_no_ties: float  # wins / (wins + losses); nan when every pair is a tie
    ci_low: float
    ci_high: float
    mean_margin: float  # mean of score(chosen) - score(rejected)


def summarize(setting: str, margins: Tensor, tie_tol: float = 0.0, ci: CIMethod = "wilson",
              confidence: float = DEFAULT_CONFIDENCE, bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
              seed: int = 0) -> PairwiseResult:
    """Counts wins/ties/losses of per-pair margins ``score(chosen) - score(rejected)`` (N,)."""
    margins = margins.double().flatten()
    n = margins.numel()
    wins = int((margins > tie_tol).sum())
    ties = int((margins.abs() <= tie_tol).sum())
    losses = n - wins - ties
    if ci == "wilson":
        lo, hi = wilson_interval(wins, n, confidence)
    elif ci == "bootstrap":
        lo, hi = bootstrap_interval((margins > tie_tol).double(), confidence, bootstrap_samples, seed)
    else:
        raise ValueError(f"ci: expected 'wilson' or 'bootstrap', got {ci!r}")
    return PairwiseResult(
        setting=setting, pairs=n, wins=wins, ties=ties, losses=losses,
        accuracy=wins / n if n else float("nan"),
        accuracy_ties_half=(wins + ties / 2) / n if n else float("nan"),
        accuracy_no_ties=wins / (wins + losses) if wins + losses else float("nan"),
        ci_low=lo, ci_high=hi, mean_margin=margins.mean().item() if n else float("nan"),
    )


# --------------------------------------------------------------------------------------------------
# the report


@dataclass
class EvalReport:
    reward: str
    data: str
    results: list[PairwiseResult]
    skipped_label_ties: int = 0  # pairs labelled 0.5 in the data
    tie_tol: float = 0.0
    ci: str = "wilson"
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0
    seconds: float = 0.0
    pair_noise: str = "shared"  # noise of the chosen and the rejected side: one draw, or two
    convention: str = CONVENTION
    reward_args: dict[str, Any] = field(default_factory=dict)

    def row(self, setting: str) -> PairwiseResult:
        for r in self.results:
            if r.setting == setting:
                return r
        raise KeyError(f"no row {setting!r}; rows: {[r.setting for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        pct = int(round(self.confidence * 100))
        lines = [
            f"# Pairwise accuracy: `{self.reward}` on `{self.data}`",
            "",
            f"{self.results[0].pairs if self.results else 0} pairs (label ties skipped: {self.skipped_label_ties}), "
            f"tie tolerance {self.tie_tol:g}, {pct}% CI: {self.ci}, seed {self.seed}, {self.pair_noise} noise "
            f"per pair, {self.seconds:.1f} s.",
            "",
            f"Convention: {self.convention}.",
            "",
            f"| setting | pairs | wins | ties | losses | accuracy | {pct}% CI | ties as half | without ties | "
            f"mean margin |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in self.results:
            lines.append(
                f"| {r.setting} | {r.pairs} | {r.wins} | {r.ties} | {r.losses} | {100 * r.accuracy:.2f} | "
                f"[{100 * r.ci_low:.2f}, {100 * r.ci_high:.2f}] | {100 * r.accuracy_ties_half:.2f} | "
                f"{100 * r.accuracy_no_ties:.2f} | {r.mean_margin:.4g} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "eval_reward.json", out / "eval_reward.md"
        json_path.write_text(self.to_json())
        md_path.write_text(self.to_markdown())
        return json_path, md_path


# --------------------------------------------------------------------------------------------------
# scoring


def _level_name(u: float) -> str:
    return f"u={u:.2f}"


def _ensemble_name(levels: Sequence[float]) -> str:
    return "ensemble(" + ",".join(f"{u:g}" for u in levels) + ")"


@contextmanager
def reward_mode(reward: Reward, mode: str, **fields: Any) -> Iterator[None]:
    """Temporarily sets ``reward.options.mode`` (and other option fields) for rewards that have scoring modes
    (DiNa-LRM); restores them in ``finally``. Rewards without ``options.mode`` are left alone for ``state``
    (they score what they are given) and refused for anything else."""
    options = getattr(reward, "options", None)
    if options is None or not hasattr(options, "mode"):
        if mode != "state":
            raise ValueError(f"{type(reward).__name__} has no scoring modes (options.mode); it cannot run {mode!r}")
        yield
        return
    saved = {name: getattr(options, name) for name in ("mode", *fields)}
    try:
        options.mode = mode
        for name, value in fields.items():
            setattr(options, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(options, name, value)


def _chunks(pairs: Sequence[PreferencePair], batch_size: int, image_size: tuple[int, int] | None,
            starts: Sequence[int]) -> Iterator[tuple[int, list[tuple[list[int], Tensor, Tensor]]]]:
    """Per batch of pairs starting at one of ``starts`` (the others are not loaded): its number and its groups
    ``(indices, chosen, rejected)`` of one tensor shape each."""
    for start in starts:
        groups: dict[tuple, tuple[list[int], list[Tensor], list[Tensor]]] = {}
        for i in range(start, min(start + batch_size, len(pairs))):
            chosen, rejected = load_side(pairs[i], 0, image_size), load_side(pairs[i], 1, image_size)
            if chosen.shape != rejected.shape:
                raise pairs[i].error(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ "
                                     f"in shape; one pair must share a shape (re-cache into shared buckets)", 1)
            idx, cs, rs = groups.setdefault(tuple(chosen.shape), ([], [], []))
            idx.append(i)
            cs.append(chosen)
            rs.append(rejected)
        yield start // batch_size, [(idx, torch.stack(cs), torch.stack(rs)) for idx, cs, rs in groups.values()]


def _input(reward: Reward, prompts: list[str], x: Tensor, kind: str, sigmas: Tensor | None,
           decode: Callable[[Tensor], Tensor] | None, generator: torch.Generator) -> RewardInput:
    if kind == "image":
        if reward.space == "latent":
            raise ValueError(f"{type(reward).__name__} reads latents but the data holds images; "
                             f"encode them once with `rlkit cache-latents`")
        return RewardInput(prompts=prompts, images=x, generator=generator)
    if reward.space == "pixel" and decode is None:
        raise ValueError(f"{type(reward).__name__} reads pixels but the data holds latents; pass a generator "
                         f"(--generator) whose VAE decodes them")
    return RewardInput(prompts=prompts, latents=x, sigmas=sigmas, decode=decode, generator=generator)


def _side_seeds(seed: int, pair_noise: PairNoise) -> tuple[int, int]:
    """The generator seeds of the chosen and the rejected side: one seed, or the rejected side's its own."""
    return seed, (seed if pair_noise == "shared" else derive_seed(seed, "eval-reward/rejected"))


def _score_pair_sides(reward: Reward, prompts: list[str], chosen: Tensor, rejected: Tensor, kind: str,
                      sigmas: Tensor | None, decode: Callable[[Tensor], Tensor] | None, seed: int,
                      pair_noise: PairNoise = "shared") -> Tensor:
    """``score(chosen) - score(rejected)``, the two calls with the same generator state (or, ``independent``,
    states of their own); CPU generators, so draws do not depend on the data's device."""
    scores = []
    for x, side_seed in zip((chosen, rejected), _side_seeds(seed, pair_noise)):
        gen = torch.Generator().manual_seed(side_seed)
        out = reward(_input(reward, prompts, x, kind, sigmas, decode, gen))
        scores.append(out.scores.detach().float().flatten().cpu())
    return scores[0] - scores[1]


@torch.no_grad()
def evaluate_pairwise(
    reward: Reward,
    pairs: Sequence[PreferencePair],
    *,
    levels: Sequence[float] = (),
    ensemble: Sequence[float] = (),
    include_clean: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    tie_tol: float = 0.0,
    ci: CIMethod = "wilson",
    confidence: float = DEFAULT_CONFIDENCE,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    decode: Callable[[Tensor], Tensor] | None = None,
    image_size: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    name: str = "",
    data_name: str = "",
    shard: Shard = Shard(),
    pair_noise: PairNoise = "shared",
) -> EvalReport:
    """Pairwise accuracy of ``reward`` on ``pairs``: a row for the reward as configured (``include_clean``),
    one per noise level in ``levels`` (noise-aware latent rewards; chosen and rejected share eps) and one for
    the reward's noise ensemble over ``ensemble`` (rewards with scoring modes).

    ``pair_noise``: the chosen and the rejected side share each noise draw, or draw their own (the module
    docstring says when to use which). Data ties (label 0.5) are skipped; every result is reproducible from
    ``seed``. On several processes
    (``shard``) each scores every ``world``-th batch and the margins are gathered: every rank gets the report of
    one process. The ranks' forward passes are not kept in step, so not under ZeRO-3.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"evaluate_pairwise: batch_size must be > 0, got {batch_size}")
    if pair_noise not in PairNoise.__args__:
        raise ValueError(f"evaluate_pairwise: pair_noise must be one of {PairNoise.__args__}, got {pair_noise!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"evaluate_pairwise: confidence must lie in (0, 1), got {confidence}")
    for u in (*levels, *ensemble):
        if not 0 < u <= 1:
            raise ValueError(f"evaluate_pairwise: noise levels must lie in (0, 1], got {u}")
    if (levels or ensemble) and not (reward.noise_aware and reward.space == "latent"):
        raise ValueError(f"evaluate_pairwise: {type(reward).__name__} is not a noise-aware latent reward; "
                         f"per-level rows (levels={list(levels)}, ensemble={list(ensemble)}) need one")
    if not include_clean and not levels and not ensemble:
        raise ValueError("evaluate_pairwise: nothing to evaluate (include_clean=False, no levels, no ensemble)")
    kept = [p for p in pairs if not p.is_tie]
    skipped = len(pairs) - len(kept)
    if not kept:
        raise ValueError(f"evaluate_pairwise: no pairs to evaluate ({skipped} label ties skipped)")
    # (row name, harness noise level or None, how the reward runs)
    settings: list[tuple[str, float | None, Callable[[], Any]]] = (
        ([(CLEAN_ROW, None, nullcontext)] if include_clean else [])
        + [(_level_name(u), float(u), lambda: reward_mode(reward, "state")) for u in levels]
        + ([(_ensemble_name(ensemble), None,
             lambda: reward_mode(reward, "ensemble", levels=tuple(float(u) for u in ensemble)))] if ensemble else []))
    margins = {name_: torch.zeros(len(kept)) for name_, _, _ in settings}  # zero where another rank scores
    was_training = reward.training
    reward.eval()
    start_time = time.perf_counter()
    # this rank's batches, dealt as the evaluator deals them (not the repeats that keep ZeRO-3 in step)
    starts = [s for s in shard.starts(list(range(0, len(kept), batch_size))) if s is not None]
    mine = sum(min(batch_size, len(kept) - start) for start in starts)
    bar = tqdm(total=mine, desc=f"eval-reward {name}".strip(), unit="pair", disable=not progress)
    try:
        for b, groups in _chunks(kept, batch_size, image_size, starts):
            for g, (idx, chosen, rejected) in enumerate(groups):
                chosen, rejected = chosen.to(device), rejected.to(device)
                prompts = [kept[i].prompt for i in idx]
                kind = kept[idx[0]].kind
                for r, (setting, u, mode) in enumerate(settings):
                    batch_seed = seed + ROW_SEED_STRIDE * r + BATCH_SEED_STRIDE * b + g
                    with mode():
                        if u is None:
                            m = _score_pair_sides(reward, prompts, chosen, rejected, kind, None, decode, batch_seed,
                                                  pair_noise)
                        else:  # on CPU generators: the same eps on any device
                            eps_c, eps_r = (torch.randn(chosen.shape, generator=torch.Generator().manual_seed(s))
                                            .to(chosen.device) for s in _side_seeds(batch_seed, pair_noise))
                            sig = torch.full((len(idx),), u, device=chosen.device)
                            xc, xr = (1 - u) * chosen + u * eps_c, (1 - u) * rejected + u * eps_r
                            m = _score_pair_sides(reward, prompts, xc, xr, kind, sig, decode, batch_seed, pair_noise)
                    margins[setting][torch.tensor(idx)] = m
            bar.update(sum(len(idx) for idx, _, _ in groups))
    finally:
        bar.close()
        reward.train(was_training)
    if shard.world > 1:  # each margin is zero on every rank but the one that scored it
        every = shard.combine(torch.stack([margins[s] for s, _, _ in settings])[None]).sum(0)
        margins = {s: every[r] for r, (s, _, _) in enumerate(settings)}
    results = [summarize(s, margins[s], tie_tol, ci, confidence, bootstrap_samples, seed) for s, _, _ in settings]
    return EvalReport(reward=name or type(reward).__name__, data=data_name, results=results,
                      skipped_label_ties=skipped, tie_tol=tie_tol, ci=ci, confidence=confidence, seed=seed,
                      seconds=time.perf_counter() - start_time, pair_noise=pair_noise)


# --------------------------------------------------------------------------------------------------
# command line


def parse_kv(items: Sequence[str]) -> dict[str, Any]:
    """``k=v`` strings -> dict, values parsed as YAML scalars (``u=0.4`` is a float, ``levels=[0.2,0.5]`` a list)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--args expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _columns(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        role, sep, column = item.partition("=")
        if not sep:
            raise ValueError(f"--columns expects role=column, got {item!r}")
        out[role] = column
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlkit eval-reward", description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", required=True, help="registered reward name (rewards.available())")
    p.add_argument("--args", nargs="*", default=[], metavar="KEY=VALUE", help="reward constructor arguments")
    p.add_argument("--data", required=True, help="preference file, folder, or hf:owner/name[:split]")
    p.add_argument("--format", default="auto", choices=["auto", "hpdv3", "latents", "generic", "ranked"])
    p.add_argument("--columns", nargs="*", default=[], metavar="ROLE=COLUMN")
    p.add_argument("--split", default=None)
    p.add_argument("--image-root", default=None)
    p.add_argument("--limit", type=int, default=None,
                   help="first N pairs (a cached-latents file is ordered by bucket, smallest first)")
    p.add_argument("--levels", type=_floats, default=[], help="noise levels u, e.g. 0.1,0.3,0.5 (latent rewards)")
    p.add_argument("--ensemble", type=_floats, default=[],
                   help="noise-ensemble levels, e.g. 0.2,0.5,0.7 (rewards with an ensemble mode, DiNa-LRM)")
    p.add_argument("--no-clean", action="store_true", help="only the per-level / ensemble rows")
    p.add_argument("--generator", default=None,
                   help="SD3 pipeline (folder or hub id) attached to the reward; its VAE decodes latents for "
                        "pixel rewards")
    p.add_argument("--image-size", type=int, default=None, help="resize/centre-crop images to this square size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-tol", type=float, default=0.0)
    p.add_argument("--pair-noise", default="shared", choices=list(PairNoise.__args__),
                   help="one noise draw for both sides of a pair (default), or one each as the release's benchmark")
    p.add_argument("--ci", default="wilson", choices=["wilson", "bootstrap"])
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for eval_reward.json and eval_reward.md")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import rewards
    from rlkit.config import RewardSpec
    from rlkit.confload import resolve_package_path

    args = build_parser().parse_args(argv)
    try:
        reward_args = parse_kv(args.args)
        problems = [f"{key}: {message}" for key, message in RewardSpec(args.reward, args=reward_args).check()]
        if problems:  # before any data or weights load
            raise ValueError(f"--reward {args.reward} --args: {'; '.join(problems)}")
        options = LoadOptions(format=args.format, columns=_columns(args.columns), split=args.split,
                              image_root=args.image_root, limit=args.limit)
        pairs = load_pairs(resolve_package_path(args.data), options)
        reward = rewards.build(args.reward, **reward_args).place(args.device)  # unless its args name a device
        decode = None
        if args.generator:
            from rlkit.models.sd3 import SD3Generator

            generator = SD3Generator.from_pretrained(resolve_package_path(args.generator), device=args.device)
            reward.attach_generator(generator)
            decode = generator.decode
        size = (args.image_size, args.image_size) if args.image_size else None
        report = evaluate_pairwise(
            reward, pairs, levels=args.levels, ensemble=args.ensemble, include_clean=not args.no_clean,
            batch_size=args.batch_size, seed=args.seed, tie_tol=args.tie_tol, ci=args.ci, confidence=args.confidence,
            decode=decode, image_size=size, device=args.device, progress=not args.no_progress, name=args.reward,
            data_name=str(args.data), pair_noise=args.pair_noise)
    except (PreferenceDataError, KeyError, ValueError, FileNotFoundError) as exc:
        print(f"rlkit eval-reward: {exc}", file=sys.stderr)
        return 2
    report.reward_args = {k: str(v) for k, v in reward_args.items()}
    print(report.to_markdown())
    if args.out:
        json_path, md_path = report.write(args.out)
        print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
