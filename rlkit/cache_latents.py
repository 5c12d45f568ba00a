"""``rlkit cache-latents``: encode a preference set once with the generator's VAE.

Reward-model training then reads latents and never runs the VAE. Each pair is put in one aspect-ratio
bucket shared by its two images (pairs whose images are too small or cannot share a bucket are dropped
and counted), its images are resized to the bucket and encoded with ``SD3Generator.encode`` (posterior
mode, ``z = (vae_latent - shift) * scale``), and written to a parquet file in the release's layout
(``prompt, latent1, latent2, latent1_shape, latent2_shape, image1_path, image2_path``; ``latent1`` is the
chosen image, latents are ``.npy`` bytes), which :func:`rlkit.data.load_pairs` reads back as ``latents``.

    rlkit cache-latents --data hpdv3/train.json --generator stabilityai/stable-diffusion-3.5-medium \\
        --out data/hpdv3_sd35m.parquet [--min-size 256] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlkit.data import BucketConfig, LoadOptions, PreferencePair, image_to_tensor, load_image, load_pairs, open_image
from rlkit.data.pairs import image_identity
from rlkit.data.buckets import RELEASE_AR_THRESHOLD, resize_to_bucket

LATENT_DTYPES = {"fp32": np.float32, "fp16": np.float16}
MEMO_LIMIT = 256  # latents kept for reuse (a prompt's images; ~1 MB each at SD3.5-M's 1024 px)
METADATA_KEY = b"rlkit.cache_latents"


@dataclass
class CacheReport:
    out: str
    pairs_in: int
    written: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    buckets: dict[str, int] = field(default_factory=dict)  # "HxW" -> pairs
    encoded_images: int = 0  # VAE encodes actually run (images shared by several pairs are encoded once)


VAE_FACTORS = (("vae_scaling_factor", "scaling_factor"), ("vae_shift_factor", "shift_factor"))


def cache_metadata(path: str | Path) -> dict[str, Any] | None:
    """What ``rlkit cache-latents`` recorded in a parquet file it wrote (None for any other file)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(str(path)).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def check_vae_factors(pairs: list[PreferencePair], vae_config: Any) -> None:
    """Refuses latents cached with another VAE scaling or shift than ``vae_config``'s (the generator that trains on
    them): they would train the reward on latents scaled unlike the ones it will score, silently."""
    import math

    for file in sorted({p.file for p in pairs if p.file.endswith(".parquet") and Path(p.file).is_file()}):
        meta = cache_metadata(file) or {}
        for key, attr in VAE_FACTORS:
            cached, now = meta.get(key), getattr(vae_config, attr, None)
            if cached is not None and now is not None and not math.isclose(cached, now, rel_tol=1e-6, abs_tol=1e-9):
                raise ValueError(f"{file}: its latents were cached with a VAE {attr} of {cached}, the generator's VAE "
                                 f"has {now}; encode the pairs again with this generator (`rlkit cache-latents`)")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _ref_text(pair: PreferencePair, side: int) -> str | None:
    ref = pair.chosen if side == 0 else pair.rejected
    if isinstance(ref, dict):
        ref = ref.get("path")
    return str(ref) if isinstance(ref, (str, Path)) else None


def _schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("prompt", pa.string()),
        pa.field("latent1", pa.binary()),
        pa.field("latent2", pa.binary()),
        pa.field("latent1_shape", pa.list_(pa.int64())),
        pa.field("latent2_shape", pa.list_(pa.int64())),
        pa.field("image1_path", pa.string()),
        pa.field("image2_path", pa.string()),
        pa.field("label", pa.float32()),
        pa.field("bucket", pa.list_(pa.int64())),
        pa.field("source_file", pa.string()),
        pa.field("source_row", pa.int64()),
    ])


def assign_buckets(pairs: list[PreferencePair], buckets: BucketConfig) -> tuple[dict[tuple[int, int], list[int]],
                                                                                  Counter]:
    """Pair index lists per shared bucket, and the count of dropped pairs per reason."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    dropped: Counter = Counter()
    for i, pair in enumerate(pairs):
        if pair.kind != "image":
            raise pair.error("already a latent; cache-latents encodes images", 0)
        sizes = []
        for side in (0, 1):
            image = open_image(pair, side)
            sizes.append((image.height, image.width))
        if min(h * w for h, w in sizes) < buckets.min_pixels:
            dropped["too_small"] += 1
            continue
        bucket = buckets.assign_pair(sizes[0], sizes[1])
        if bucket is None:
            dropped["no_shared_bucket"] += 1
            continue
        groups[bucket].append(i)
    return groups, dropped


@torch.no_grad()
def cache_latents(
    data: str | Path | list[PreferencePair],
    generator: Any,
    out: str | Path,
    buckets: BucketConfig | None = None,
    load_options: LoadOptions | None = None,
    batch_size: int = 8,
    dtype: str = "fp32",
    progress: bool = True,
) -> CacheReport:
    """Encodes every image pair of ``data`` with ``generator.encode`` and writes ``out`` (parquet).

    ``generator`` is an ``SD3Generator`` (anything with ``encode(images (B,3,H,W) in [0,1]) -> latents``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"cache_latents: batch_size must be > 0, got {batch_size}")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"cache_latents: dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    buckets = buckets or BucketConfig()
    pairs = data if isinstance(data, list) else load_pairs(data, load_options)
    groups, dropped = assign_buckets(pairs, buckets)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    memo: dict[str, np.ndarray] = {}  # image identity -> latent, within the bucket being written
    report = CacheReport(str(out), len(pairs), 0, dict(dropped))
    vae_cfg = getattr(getattr(generator, "vae", None), "config", None)
    meta = {"buckets": [list(s) for s in buckets.sizes], "min_pixels": buckets.min_pixels, "dtype": dtype,
            **{key: getattr(vae_cfg, attr, None) for key, attr in VAE_FACTORS}}
    schema = _schema().with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    total = sum(len(v) for v in groups.values())
    if not total:
        raise ValueError(f"cache_latents: no pair to write ({len(pairs)} read, dropped: {dict(dropped) or 'none'}); "
                         "check --min-size and --buckets against the images' sizes")
    bar = tqdm(total=total, desc="cache-latents", unit="pair", disable=not progress)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for bucket in sorted(groups):
                memo.clear()  # latents of another bucket are never reused
                idx = sorted(groups[bucket], key=lambda i: (pairs[i].prompt, i))  # a prompt's images sit together
                for start in range(0, len(idx), batch_size):
                    batch = [pairs[i] for i in idx[start:start + batch_size]]
                    latents = _encode_batch(batch, bucket, generator, memo, report)
                    rows = _rows(batch, latents, bucket, LATENT_DTYPES[dtype])
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    report.written += len(batch)
                    bar.update(len(batch))
                report.buckets[f"{bucket[0]}x{bucket[1]}"] = len(idx)
        tmp.replace(out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)  # a failed run leaves no half-written file behind
    return report


def _encode_batch(batch: list[PreferencePair], bucket: tuple[int, int], generator: Any,
                  memo: dict[str, np.ndarray], report: CacheReport) -> list[list[np.ndarray]]:
    """``latents[side][k]`` for the batch; an image met again within its prompt's pairs is encoded once."""
    keys: dict[tuple[int, int], Any] = {}  # (k, side) -> memo key, or a unique key for images without one
    todo: dict[Any, tuple[int, int]] = {}  # memo key -> first (k, side) that needs it encoded
    for k, pair in enumerate(batch):
        for side in (0, 1):
            identity = image_identity(pair, side)
            key = identity if identity is not None else ("#", k, side)
            keys[(k, side)] = key
            if key not in memo and key not in todo:
                todo[key] = (k, side)
    if todo:
        images = [image_to_tensor(resize_to_bucket(load_image(batch[k], side), bucket)) for k, side in todo.values()]
        device = getattr(generator, "device", torch.device("cpu"))
        z = generator.encode(torch.stack(images).to(device)).float().cpu().numpy()
        report.encoded_images += len(images)
        fresh = dict(zip(todo, z))
    else:
        fresh = {}
    out = [[fresh[keys[(k, side)]] if keys[(k, side)] in fresh else memo[keys[(k, side)]] for k in range(len(batch))]
           for side in (0, 1)]
    if len(memo) + len(fresh) > MEMO_LIMIT:  # images repeat within a prompt's pairs, which sit together
        memo.clear()
    memo.update((key, latent) for key, latent in fresh.items() if isinstance(key, str))
    return out


def _rows(batch: list[PreferencePair], latents: list[list[np.ndarray]], bucket: tuple[int, int],
          dtype: type) -> list[dict[str, Any]]:
    rows = []
    for k, pair in enumerate(batch):
        z1, z2 = (latents[side][k].astype(dtype) for side in (0, 1))
        rows.append({
            "prompt": pair.prompt,
            "latent1": _npy_bytes(z1), "latent2": _npy_bytes(z2),
            "latent1_shape": list(z1.shape), "latent2_shape": list(z2.shape),
            "image1_path": _ref_text(pair, 0), "image2_path": _ref_text(pair, 1),
            "label": pair.label, "bucket": list(bucket),
            "source_file": pair.file, "source_row": pair.row,
        })
    return rows


def _parse_columns(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        role, sep, column = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--columns expects role=column, got {item!r}")
        out[role] = column
    return out


def _parse_buckets(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets expects HxW[,HxW...], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlkit cache-latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="preference file, folder, or hf:owner/name[:split]")
    p.add_argument("--generator", required=True, help="SD3 pipeline folder or hub id whose VAE encodes")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--format", default="auto", choices=["auto", "hpdv3", "generic", "ranked"])
    p.add_argument("--columns", nargs="*", default=[], metavar="ROLE=COLUMN")
    p.add_argument("--split", default=None)
    p.add_argument("--image-root", default=None)
    p.add_argument("--ties", default="skip", choices=["skip", "keep"])
    p.add_argument("--max-pairs-per-prompt", type=int, default=None)
    p.add_argument("--buckets", type=_parse_buckets, default=None, help="HxW,... (default: the release's)")
    p.add_argument("--min-size", type=int, default=256, help="drop images with fewer than MIN_SIZE² pixels")
    p.add_argument("--ar-threshold", type=float, default=RELEASE_AR_THRESHOLD)
    p.add_argument("--divisible", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=sorted(LATENT_DTYPES), help="stored latent precision")
    p.add_argument("--vae-dtype", default="fp32", help="VAE weights: fp32 | bf16 | fp16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rlkit.data import PreferenceDataError
    from rlkit.models.sd3 import SD3Generator, WeightsNotFoundError

    try:
        bucket_kwargs: dict[str, Any] = {"min_pixels": args.min_size ** 2, "ar_threshold": args.ar_threshold,
                                         "divisible": args.divisible}
        if args.buckets:
            bucket_kwargs["sizes"] = args.buckets
        buckets = BucketConfig(**bucket_kwargs)
        options = LoadOptions(format=args.format, columns=_parse_columns(args.columns), split=args.split,
                              image_root=args.image_root, ties=args.ties,
                              max_pairs_per_prompt=args.max_pairs_per_prompt)
        generator = SD3Generator.from_pretrained(args.generator, dtype=args.vae_dtype, device=args.device,
                                                 load_text_encoders=False)
        report = cache_latents(args.data, generator, args.out, buckets, options, args.batch_size, args.dtype,
                               progress=not args.no_progress)
    except (PreferenceDataError, WeightsNotFoundError, ValueError, argparse.ArgumentTypeError) as exc:
        print(f"rlkit cache-latents: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
