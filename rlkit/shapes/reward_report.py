"""``rlkit shapes rewards``: how well each reward of the Shapes world agrees with the annotators.

On the held-out preference pairs (other samples and other annotator draws than the training pairs), side
by side in one run:

- the annotators' own consistency: how often a second, independent labelling of the same pairs agrees
  with the first (the ceiling any reward can reach against one noisy labelling);
- the DiNa-LRM as configured (re-noised at its training level), at each noise level (chosen and
  rejected share the noise) and with its test-time noise ensemble;
- optionally a second DiNa-LRM (``--compare``), e.g. one trained with a fixed Thurstone variance
  instead of the noise-calibrated one;
- the pixel-space CLIP reward, which decodes both latents through the VAE;
- the analytic golden judge (all attributes right or not: many ties, so read its "ties as half" column);
- the same rewards on drawn pairs of held-out scenes (``, drawn``: a picture of the prompt against one with
  a wrong shape, colour or position, see :func:`rlkit.shapes.preferences.drawn_pairs`): what each reward
  reads in clean pictures, beside what it reads in the base generator's samples.

Every row comes from :func:`rlkit.eval_reward.evaluate_pairwise`, so the numbers equal those of
``rlkit eval-reward`` for the same seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlkit.eval_reward import EvalReport, PairwiseResult, evaluate_pairwise
from rlkit.shapes.judges import ASSETS_DIR
from rlkit.shapes.preferences import drawn_pairs

LEVELS = (0.1, 0.4, 0.7, 0.9)
ENSEMBLE = (0.2, 0.5, 0.7)
DRAWN_EVAL_PAIRS = 256
DRAWN_EVAL_SEED = 99  # the trainer's drawn pairs use seed 0 and training scenes


def annotator_agreement(path: str | Path, limit: int | None = None) -> PairwiseResult:
    """Agreement of the two labellings stored with each pair (``label`` and ``label_repeat``) as a row."""
    import datasets
    import torch

    from rlkit.eval_reward import summarize

    data = datasets.Dataset.from_parquet(str(path))
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    first, second = torch.tensor(data["label"]), torch.tensor(data["label_repeat"])
    # +1 agree, -1 disagree, 0 when the second labelling calls a tie (counted as half by the report)
    return summarize("second labelling", torch.where(second == 0.5, 0.0, (first == second).float() * 2 - 1))


def reward_rows(folder: str | Path = ASSETS_DIR, pairs_file: str | Path | None = None,
                compare: dict[str, str | Path] | None = None, limit: int | None = None, seed: int = 0,
                progress: bool = True) -> list[tuple[str, PairwiseResult]]:
    """``(reward, row)`` for every reward of a Shapes assets ``folder`` on its held-out pairs."""
    import rewards
    from rlkit.data import LoadOptions, load_pairs
    from rlkit.shapes.pretrain import load_generator

    folder = Path(folder)
    pairs_file = Path(pairs_file or folder / "preferences" / "eval.parquet")
    pairs = load_pairs(str(pairs_file), LoadOptions(format="latents", limit=limit,
                                                    columns={"chosen": "latents_a", "rejected": "latents_b"}))
    generator = load_generator(folder / "generator")
    rows: list[tuple[str, PairwiseResult]] = [("annotators", annotator_agreement(pairs_file, limit))]

    def add(name: str, report: EvalReport) -> None:
        rows.extend((name, r) for r in report.results)

    dinas = {name: rewards.build("dina-lrm", pretrained=str(path), base_model=str(folder / "generator"))
             for name, path in {"dina-lrm": folder / "dina_lrm", **(compare or {})}.items()}
    pixel_rewards = {"shapes-clip": rewards.build("shapes-clip", path=str(folder / "clip")),
                     "shapes-golden": rewards.build("shapes-golden")}
    # then drawn pairs of held-out scenes (one attribute wrong): what each reward reads in clean pictures
    drawn = drawn_pairs(generator, min(limit or DRAWN_EVAL_PAIRS, DRAWN_EVAL_PAIRS), DRAWN_EVAL_SEED,
                        split="heldout")
    for suffix, data, ensemble in (("", pairs, ENSEMBLE), (", drawn", drawn, ())):
        for name, reward in dinas.items():
            add(name + suffix, evaluate_pairwise(reward, data, levels=LEVELS, ensemble=ensemble, seed=seed,
                                                 progress=progress, name=name))
        for name, reward in pixel_rewards.items():
            add(name + suffix, evaluate_pairwise(reward, data, decode=generator.decode, seed=seed, progress=progress,
                                                 name=name))
    return rows


def to_markdown(rows: list[tuple[str, PairwiseResult]]) -> str:
    lines = ["| reward | setting | pairs | accuracy | 95% CI | ties as half |", "|---|---|---:|---:|---|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r.setting} | {r.pairs} | {r.accuracy:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
                     f"{r.accuracy_ties_half:.3f} |")
    return "\n".join(lines)


def to_dict(rows: list[tuple[str, PairwiseResult]]) -> dict[str, dict[str, float]]:
    """``{"reward / setting": {"accuracy": ..., "ties_half": ..., "pairs": ...}}`` for a build report."""
    return {f"{name} / {r.setting}": {"accuracy": round(r.accuracy, 4), "ties_half": round(r.accuracy_ties_half, 4),
                                      "pairs": r.pairs} for name, r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkit shapes rewards", description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default=str(ASSETS_DIR), help="a Shapes assets folder (default: shipped)")
    parser.add_argument("--pairs", help="preference pairs (default: FOLDER/preferences/eval.parquet)")
    parser.add_argument("--compare", nargs="*", default=[], metavar="NAME=PATH",
                        help="further DiNa-LRM checkpoints on the same generator, e.g. fixed-variance=runs/x/final")
    parser.add_argument("--limit", type=int, help="first N pairs only")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--compare expects NAME=PATH, got {item!r}")
        compare[name] = path
    rows = reward_rows(args.folder, args.pairs, compare, args.limit)
    print(to_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(to_dict(rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
