"""Preference data: pairs ``(prompt, chosen, rejected)`` from files or the hub, buckets and batches."""

from rlkit.data.batching import BucketBatchSampler, PairBatch, collate_pairs, load_side, shape_key
from rlkit.data.buckets import RELEASE_BUCKETS, BucketConfig, resize_to_bucket
from rlkit.data.pairs import (
    TIE_LABEL,
    LoadOptions,
    PreferenceDataError,
    PreferencePair,
    detect_format,
    image_to_tensor,
    iter_rows,
    load_image,
    load_latent,
    load_pairs,
    open_image,
)

__all__ = [
    "RELEASE_BUCKETS", "TIE_LABEL", "BucketBatchSampler", "BucketConfig", "LoadOptions", "PairBatch",
    "PreferenceDataError", "PreferencePair", "collate_pairs", "detect_format", "image_to_tensor", "iter_rows",
    "load_image", "load_latent", "load_pairs", "load_side", "open_image", "resize_to_bucket", "shape_key",
]
