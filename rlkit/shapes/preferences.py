"""The preference set of the Shapes world (its HPDv3): pairs of the base generator's own samples.

For each pair, one training prompt is sampled twice by the base generator (different noise, one
guidance scale drawn per pair so that quality varies), both pictures are shown to the annotators
(:class:`rlkit.shapes.judges.AnnotatorJudge`) and the label records which one they prefer. The clean
latents of both samples are stored, so a latent reward model trains without decoding. A second,
independent labelling (``label_repeat``) measures the annotators' own consistency ceiling.

Columns: ``prompt`` (str), ``latents_a`` / ``latents_b`` (C, h, w float16, transformer latent space),
``label`` (1.0 when ``a`` is preferred), ``label_repeat`` (a second labelling), ``guidance`` (float).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlkit.models.sd3 import SD3Generator
from rlkit.shapes import world
from rlkit.shapes.judges import AnnotatorConfig, AnnotatorJudge, annotator_utility
from rlkit.shapes.pretrain import sample_latents


MAX_TIE_ROUNDS = 4  # sampling rounds, in multiples of those needed, before ties are kept


@dataclass
class PreferenceConfig:
    num_pairs: int = 1024
    num_steps: int = 12  # Euler steps per sample
    guidance_range: tuple[float, float] = (1.5, 5.0)  # per-pair CFG scale, uniform
    batch_size: int = 64  # pairs per sampling batch
    drop_ties: bool = True  # pairs the annotators value exactly equally carry no preference
    annotators: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PreferenceConfig.{name} must be positive")
        lo, hi = self.guidance_range
        if not 0 < lo <= hi:
            raise ValueError(f"PreferenceConfig.guidance_range must be 0 < low <= high, got {self.guidance_range}")


@torch.no_grad()
def build_preferences(generator: SD3Generator, config: PreferenceConfig) -> tuple["datasets.Dataset", dict]:  # noqa: F821
    """Samples and labels pairs; returns the dataset and its statistics (ceiling, agreement, ties)."""
    import datasets

    annotators = AnnotatorJudge(config.annotators)
    rng = np.random.default_rng([config.seed, 3])
    noise_rng = torch.Generator().manual_seed(config.seed)
    label_rng = torch.Generator().manual_seed(config.seed + 1)
    repeat_rng = torch.Generator().manual_seed(config.seed + 2)
    train = world.train_prompts()
    rows: dict[str, list] = {k: [] for k in ("prompt", "latents_a", "latents_b", "label", "label_repeat", "guidance")}
    utilities_a, utilities_b = [], []
    ties = 0
    # a generator whose samples all look alike gives only ties: keep them after a few rounds, never loop forever
    tie_rounds = MAX_TIE_ROUNDS * -(-config.num_pairs // config.batch_size)
    rounds = 0
    while len(rows["prompt"]) < config.num_pairs:
        rounds += 1
        n = config.batch_size
        prompts = [train[i] for i in rng.integers(0, len(train), n)]
        guidance = torch.as_tensor(rng.uniform(*config.guidance_range, n), dtype=torch.float32)
        both = sample_latents(generator, prompts + prompts, noise_rng, config.num_steps,
                              torch.cat([guidance, guidance]))
        za, zb = both.chunk(2)
        images_a, images_b = generator.decode(za), generator.decode(zb)
        ua, ub = annotator_utility(images_a, prompts), annotator_utility(images_b, prompts)
        label, repeat = annotators.label(ua, ub, label_rng), annotators.label(ua, ub, repeat_rng)
        for i in range(n):
            if config.drop_ties and ua[i] == ub[i] and rounds <= tie_rounds:
                ties += 1
                continue
            if len(rows["prompt"]) == config.num_pairs:
                break
            rows["prompt"].append(prompts[i])
            rows["latents_a"].append(za[i].half().cpu().numpy())
            rows["latents_b"].append(zb[i].half().cpu().numpy())
            rows["label"].append(float(label[i]))
            rows["label_repeat"].append(float(repeat[i]))
            rows["guidance"].append(float(guidance[i]))
            utilities_a.append(float(ua[i]))
            utilities_b.append(float(ub[i]))
    shape = tuple(rows["latents_a"][0].shape)
    features = datasets.Features({
        "prompt": datasets.Value("string"),
        "latents_a": datasets.Array3D(shape=shape, dtype="float16"),
        "latents_b": datasets.Array3D(shape=shape, dtype="float16"),
        "label": datasets.Value("float32"),
        "label_repeat": datasets.Value("float32"),
        "guidance": datasets.Value("float32"),
    })
    dataset = datasets.Dataset.from_dict(rows, features=features)
    ua_t, ub_t = torch.tensor(utilities_a), torch.tensor(utilities_b)
    label_t, repeat_t = torch.tensor(rows["label"]), torch.tensor(rows["label_repeat"])
    stats = {
        "pairs": len(dataset),
        "ties_dropped": ties,
        "annotator_agreement": float((label_t == repeat_t).float().mean()),  # two labellings, measured
        "annotator_ceiling": annotators.consistency_ceiling(ua_t, ub_t),  # the same, expected
        "label_accuracy": float((label_t == (ua_t > ub_t).float()).float().mean()),  # vs noise-free utility
        "preferred_a": float(label_t.mean()),
    }
    return dataset, stats


def save_preferences(dataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def load_preferences(path: str | Path | None = None):
    """The preference pairs as a ``datasets.Dataset`` (default: the set shipped with rlkit)."""
    import datasets

    from rlkit.shapes.judges import ASSETS_DIR

    source = Path(path or ASSETS_DIR / "preferences" / "train.parquet")
    if not source.is_file():
        raise FileNotFoundError(f"no Shapes preference set at {str(source)!r}; rebuild it with `rlkit shapes build`")
    return datasets.Dataset.from_parquet(str(source))
