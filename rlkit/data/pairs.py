"""Preference pairs ``(prompt, chosen, rejected)`` read from local files or the Hugging Face hub.

Sources: a ``.parquet`` / ``.jsonl`` / ``.json`` file, a folder of such files, or a hub data set
(``hf:owner/name[:split]``). Layouts, picked by ``format`` (``auto`` looks at the columns):

- ``hpdv3``: HPDv3's ``prompt, path1, path2`` (+ ``model1, model2, choice_dist, confidence``); the first
  image is the chosen one, as in HPDv3's ``train.json`` and the DiNa-LRM release.
- ``latents``: pre-encoded pairs, the layout the release's data preparation and :mod:`rlkit.cache_latents`
  write: ``prompt, latent1, latent2, latent1_shape, latent2_shape`` (``latent1`` chosen).
- ``generic``: ``prompt, chosen, rejected`` (+ optional ``label``), or any names through ``columns``
  (``{"prompt": "caption", "chosen": "img_w", "rejected": "img_l"}``).
- ``ranked``: several images per prompt with ranks (ImageReward / HPDv2 style: ``image_path`` + ``rank``,
  lower rank is better; or ``human_preference``, higher is better), expanded into every ordered pair.

Images are kept as references (a path, bytes, a ``{"bytes", "path"}`` mapping, or a PIL image) and
latents as stored values (tensor, array, ``.npy`` bytes, raw bytes with a shape column, nested lists); the
``latent1`` / ``latent2`` columns of a parquet file (what :mod:`rlkit.cache_latents` and the release write) stay
on disk as :class:`ParquetCell` references, read a row group at a time when a batch needs them. Nothing is decoded
until then, so a 0.8 M-pair index stays small. Every problem is a :class:`PreferenceDataError` naming the file,
the row and the column.
"""

from __future__ import annotations

import io
import json
import random
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import Tensor

Format = Literal["auto", "hpdv3", "latents", "generic", "ranked"]
FORMATS = ("auto", "hpdv3", "latents", "generic", "ranked")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
HF_PREFIX = "hf:"
NPY_MAGIC = b"\x93NUMPY"
TIE_LABEL = 0.5

# column roles of each layout and their default column names
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "hpdv3": {"prompt": "prompt", "chosen": "path1", "rejected": "path2"},
    "latents": {"prompt": "prompt", "chosen": "latent1", "rejected": "latent2",
                "chosen_shape": "latent1_shape", "rejected_shape": "latent2_shape", "label": "label"},
    "generic": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "label": "label"},
    "ranked": {"prompt": "prompt", "images": "image_path", "ranks": "rank"},
}
RANKED_IMAGE_COLUMNS = ("image_path", "images", "image", "image_paths")
RANKED_RANK_COLUMNS = ("rank", "ranks", "ranking", "human_preference")
HIGHER_IS_BETTER_COLUMNS = ("human_preference",)
HPDV3_META = ("model1", "model2", "choice_dist", "confidence")
LAZY_COLUMNS = ("latent1", "latent2")  # a parquet file's binary latent columns, read when a batch needs them


class PreferenceDataError(ValueError):
    """A problem in a preference data file, located by file, row and column."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None, column: str | None = None):
        self.file, self.row, self.column = file, row, column
        where = [f"{file}" if file else "<data>"]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")


class ParquetCells:
    """Reads single cells of one parquet file a row group at a time, keeping the last ``keep`` row groups' columns
    within ``max_bytes``. Parquet reads a column a row group at a time, so a cell costs its whole row group: small
    row groups read fastest (:mod:`rlkit.cache_latents` writes one per encoding batch). A shuffled batch's pairs come
    from unrelated row groups, so the cache helps little there: a batch of B pairs reads up to 2 B row groups."""

    def __init__(self, path: str, keep: int = 8, max_bytes: int = 2 << 30):
        self.path, self.keep, self.max_bytes = path, keep, max_bytes
        self._file: Any = None
        self._groups: OrderedDict[tuple[int, str], tuple[list, int]] = OrderedDict()  # -> (cells, bytes)

    def __getstate__(self) -> dict[str, Any]:  # for spawned processes: the open file and the cache stay behind
        return {"path": self.path, "keep": self.keep, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["keep"], state["max_bytes"])

    def read(self, group: int, index: int, column: str) -> Any:
        key = (group, column)
        if key in self._groups:
            self._groups.move_to_end(key)
        else:
            if self._file is None:
                import pyarrow.parquet as pq

                self._file = pq.ParquetFile(self.path)
            chunk = self._file.read_row_group(group, columns=[column]).column(0)
            self._groups[key] = (chunk.to_pylist(), chunk.nbytes)
            while len(self._groups) > 1 and (len(self._groups) > self.keep
                                             or sum(n for _, n in self._groups.values()) > self.max_bytes):
                self._groups.popitem(last=False)
        return self._groups[key][0][index]


@dataclass(frozen=True, slots=True)
class ParquetCell:
    """One cell of a parquet file (row ``index`` of row group ``group``), read on use."""

    cells: ParquetCells
    group: int
    index: int
    column: str

    def read(self) -> Any:
        return self.cells.read(self.group, self.index, self.column)


@dataclass
class PreferencePair:
    """One comparison. ``chosen`` / ``rejected`` are image references or stored latents (``kind``)."""

    prompt: str
    chosen: Any
    rejected: Any
    kind: Literal["image", "latent"]
    label: float = 1.0  # probability that ``chosen`` is preferred; 0.5 = a kept tie. A label below 0.5 (data
    # whose columns are "a" / "b" with a label) swaps the sides on construction, so chosen always wins
    file: str = ""
    row: int = -1
    columns: tuple[str, str] = ("chosen", "rejected")  # the source columns, for error messages
    shapes: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None)  # stored latent shapes
    root: str | None = None  # folder relative image paths resolve against
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.label <= 1.0:
            raise self.error(f"label must lie in [0, 1] (the probability that the first side is preferred), "
                             f"got {self.label}")
        if self.label < TIE_LABEL:  # the second side is preferred: orient the pair so that chosen wins
            self.chosen, self.rejected = self.rejected, self.chosen
            self.columns = self.columns[::-1]
            self.shapes = self.shapes[::-1]
            self.label = 1.0 - self.label

    @property
    def is_tie(self) -> bool:
        return self.label == TIE_LABEL

    def error(self, message: str, side: int | None = None) -> PreferenceDataError:
        column = None if side is None else self.columns[side]
        return PreferenceDataError(message, self.file, self.row, column)


@dataclass
class LoadOptions:
    """How a preference source is read. Validated on construction; errors name the field."""

    format: Format = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # role -> column name, overrides the layout's
    split: str | None = None  # hub split (default "train") or None for files
    image_root: str | None = None  # relative image paths resolve here (default: the data file's folder)
    ties: Literal["skip", "keep"] = "skip"  # equal ranks in ranked sets: dropped, or kept with label 0.5
    higher_is_better: bool | None = None  # ranked sets: None = by column name (human_preference: higher)
    max_pairs_per_prompt: int | None = None  # the release keeps at most 8
    limit: int | None = None  # first N pairs after expansion and capping
    seed: int = 0  # which pairs survive ``max_pairs_per_prompt``

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"LoadOptions.format: expected one of {FORMATS}, got {self.format!r}")
        if self.ties not in ("skip", "keep"):
            raise ValueError(f"LoadOptions.ties: expected 'skip' or 'keep', got {self.ties!r}")
        for name in ("max_pairs_per_prompt", "limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"LoadOptions.{name}: must be > 0, got {value}")
        known_roles = {role for cols in DEFAULT_COLUMNS.values() for role in cols}
        for role in self.columns:
            if role not in known_roles:
                raise ValueError(f"LoadOptions.columns: unknown role {role!r}; roles: {sorted(known_roles)}")


# --------------------------------------------------------------------------------------------------
# reading rows


SPLIT_NAMES = ("train", "test", "validation", "val", "eval", "dev", "all")


def _split_of(file: Path) -> str | None:
    """The split a data file's name says it holds (``train.json``, ``test-00000-of-00002.parquet``), if any."""
    stem = file.stem.lower()
    return next((s for s in SPLIT_NAMES if stem == s or stem.startswith((f"{s}-", f"{s}_", f"{s}."))), None)


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise PreferenceDataError(f"no {', '.join(DATA_SUFFIXES)} files in this folder", str(path))
        splits = sorted({s for s in map(_split_of, files) if s is not None})
        if len(splits) > 1:  # HPDv3's folder holds train.json, test.json and all.json: never read them as one set
            raise PreferenceDataError(f"this folder holds the splits {splits}; name the file (or folder) of the one "
                                      "to read", str(path))
        return files
    if path.suffix not in DATA_SUFFIXES:
        raise PreferenceDataError(f"unsupported file type {path.suffix!r}; expected {', '.join(DATA_SUFFIXES)}",
                                  str(path))
    return [path]


def _read_file(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, record)`` of a data file; a JSON Lines row is its line number from 0 (blank lines count)."""
    name = str(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise PreferenceDataError(f"cannot read parquet ({type(exc).__name__}: {exc})", name) from None
        lazy = [c for c in LAZY_COLUMNS if c in schema.names
                and (pa.types.is_binary(schema.field(c).type) or pa.types.is_large_binary(schema.field(c).type))]
        cells = ParquetCells(name)
        row = 0
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group, columns=[c for c in schema.names if c not in lazy])
            except Exception as exc:  # noqa: BLE001 - as above
                raise PreferenceDataError(f"cannot read parquet ({type(exc).__name__}: {exc})", name) from None
            for index, record in enumerate(table.to_pylist()):
                record.update({c: ParquetCell(cells, group, index, c) for c in lazy})
                yield row, record
                row += 1
    elif path.suffix == ".jsonl":
        with path.open() as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PreferenceDataError(f"invalid JSON ({exc.msg})", name, i) from None
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(f"invalid JSON ({exc.msg} at line {exc.lineno})", name) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise PreferenceDataError("expected a list of records (or {\"data\": [...]})", name)
        yield from enumerate(data)


def iter_rows(source: str | Path, split: str | None = None) -> Iterator[tuple[str, int, dict[str, Any], str]]:
    """Yields ``(file, row, record, folder)`` for every record of a file, folder or hub data set."""
    text = str(source)
    path = Path(text).expanduser()
    if not text.startswith(HF_PREFIX) and path.exists():
        for file in _data_files(path):
            for i, record in _read_file(file):
                if not isinstance(record, dict):
                    raise PreferenceDataError(f"expected a mapping, got {type(record).__name__}", str(file), i)
                yield str(file), i, record, str(file.parent)
        return
    name = text[len(HF_PREFIX):] if text.startswith(HF_PREFIX) else text
    if not text.startswith(HF_PREFIX) and (name.count("/") != 1 or Path(name).suffix in DATA_SUFFIXES):
        raise PreferenceDataError("no such file or folder (a hub data set is written hf:owner/name[:split])", text)
    repo, _, hub_split = name.partition(":")
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split or hub_split or "train")
    except Exception as exc:  # the hub client raises many types; one readable line instead
        raise PreferenceDataError(f"cannot load hub data set {repo!r} ({type(exc).__name__}: {exc})", text) from None
    label = f"{HF_PREFIX}{repo}:{split or hub_split or 'train'}"
    # rows as stored: an ``Image`` column stays a {"bytes", "path"} record, decoded when a batch needs it (iterating
    # the data set itself would decode every picture of the set while the index is built)
    rows = (record for batch in ds.with_format("arrow").iter(batch_size=1024) for record in batch.to_pylist())
    for i, record in enumerate(rows):
        yield label, i, record, ""


# --------------------------------------------------------------------------------------------------
# layouts


def detect_format(columns: set[str], mapping: dict[str, str]) -> str:
    """The layout a record's columns imply (explicit ``mapping`` roles win)."""
    if {"chosen", "rejected"} <= set(mapping):
        return "generic"
    if {"images", "ranks"} <= set(mapping):
        return "ranked"
    if {"latent1", "latent2"} <= columns:
        return "latents"
    if {"path1", "path2"} <= columns:
        return "hpdv3"
    if {"chosen", "rejected"} <= columns:
        return "generic"
    if columns & set(RANKED_IMAGE_COLUMNS) and columns & set(RANKED_RANK_COLUMNS):
        return "ranked"
    raise ValueError(
        f"cannot tell the layout from the columns {sorted(columns)}; expected hpdv3 (path1, path2), latents "
        f"(latent1, latent2), generic (chosen, rejected) or ranked (image_path + rank); or pass `format` and "
        f"`columns`")


def _columns_for(fmt: str, record: dict[str, Any], mapping: dict[str, str]) -> dict[str, str]:
    cols = dict(DEFAULT_COLUMNS[fmt])
    if fmt == "ranked":
        cols["images"] = next((c for c in RANKED_IMAGE_COLUMNS if c in record), cols["images"])
        cols["ranks"] = next((c for c in RANKED_RANK_COLUMNS if c in record), cols["ranks"])
    cols.update(mapping)
    return cols


def _get(record: dict[str, Any], column: str, file: str, row: int) -> Any:
    if column not in record:
        raise PreferenceDataError(f"missing column (the record has {sorted(record)})", file, row, column)
    return record[column]


def _prompt(record: dict[str, Any], cols: dict[str, str], file: str, row: int) -> str:
    value = _get(record, cols["prompt"], file, row)
    if not isinstance(value, str):
        raise PreferenceDataError(f"expected a string prompt, got {type(value).__name__}", file, row, cols["prompt"])
    return value


def _label(value: Any, file: str, row: int, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PreferenceDataError(f"expected a number (the probability that the first side is preferred), got "
                                  f"{value!r}", file, row, column) from None


def _pair_label(record: dict[str, Any], column: str, required: bool, file: str, row: int) -> float:
    """The probability that the first side is preferred: 1.0 where the record holds no label, unless the load
    options named the column (then a row without it is an error, not a pair read the wrong way round)."""
    if record.get(column) is None:
        if required:
            raise PreferenceDataError("no label in this row (LoadOptions.columns names this column for it)", file,
                                      row, column)
        return 1.0
    label = _label(record[column], file, row, column)
    if not 0.0 <= label <= 1.0:
        raise PreferenceDataError(f"label must lie in [0, 1], got {label}", file, row, column)
    return label


def _shape(value: Any, file: str, row: int, column: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise PreferenceDataError(f"expected a list of ints, got {value!r}", file, row, column) from None


def _pairs_from_record(fmt: str, record: dict[str, Any], cols: dict[str, str], file: str, row: int,
                       folder: str, opts: LoadOptions) -> list[PreferencePair]:
    prompt = _prompt(record, cols, file, row)
    root = opts.image_root or folder or None
    if fmt in ("hpdv3", "generic"):
        chosen = _get(record, cols["chosen"], file, row)
        rejected = _get(record, cols["rejected"], file, row)
        label = _pair_label(record, cols["label"], "label" in opts.columns, file, row) if fmt == "generic" else 1.0
        kind = "latent" if _looks_like_latent(chosen) else "image"
        meta = {k: record[k] for k in HPDV3_META if fmt == "hpdv3" and k in record}
        return [PreferencePair(prompt, chosen, rejected, kind, label, file, row, (cols["chosen"], cols["rejected"]),
                               root=root, meta=meta)]
    if fmt == "latents":
        shapes = (_shape(record.get(cols["chosen_shape"]), file, row, cols["chosen_shape"]),
                  _shape(record.get(cols["rejected_shape"]), file, row, cols["rejected_shape"]))
        meta = {k: record[k] for k in ("image1_path", "image2_path", "bucket") if k in record}
        chosen, rejected = _get(record, cols["chosen"], file, row), _get(record, cols["rejected"], file, row)
        label = _pair_label(record, cols["label"], "label" in opts.columns, file, row)
        return [PreferencePair(prompt, chosen, rejected, "latent", label, file, row, (cols["chosen"], cols["rejected"]),
                               shapes, root, meta)]
    return _ranked_pairs(record, prompt, cols, file, row, root, opts)


def _ranked_pairs(record: dict[str, Any], prompt: str, cols: dict[str, str], file: str, row: int,
                  root: str | None, opts: LoadOptions) -> list[PreferencePair]:
    """All ordered pairs of a multi-image record; equal ranks are skipped or kept as ties."""
    images = _get(record, cols["images"], file, row)
    ranks = _get(record, cols["ranks"], file, row)
    if not isinstance(images, (list, tuple)) or not isinstance(ranks, (list, tuple)):
        raise PreferenceDataError("expected list columns for images and ranks", file, row, cols["images"])
    if len(images) != len(ranks):
        raise PreferenceDataError(f"{len(images)} images but {len(ranks)} ranks", file, row, cols["ranks"])
    higher = opts.higher_is_better
    if higher is None:
        higher = cols["ranks"] in HIGHER_IS_BETTER_COLUMNS
    try:
        quality = [float(r) if higher else -float(r) for r in ranks]
    except (TypeError, ValueError):
        raise PreferenceDataError(f"ranks must be numbers, got {ranks!r}", file, row, cols["ranks"]) from None
    column = cols["images"]
    kind = "latent" if images and _looks_like_latent(images[0]) else "image"
    out = []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            if quality[i] == quality[j]:
                if opts.ties == "keep":
                    out.append(PreferencePair(prompt, images[i], images[j], kind, TIE_LABEL, file, row,
                                              (f"{column}[{i}]", f"{column}[{j}]"), root=root))
                continue
            a, b = (i, j) if quality[i] > quality[j] else (j, i)
            out.append(PreferencePair(prompt, images[a], images[b], kind, 1.0, file, row,
                                      (f"{column}[{a}]", f"{column}[{b}]"), root=root))
    return out


def _looks_like_latent(value: Any) -> bool:
    if isinstance(value, (Tensor, np.ndarray, ParquetCell)):  # a lazy cell is a latent column's
        return True
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:6]) == NPY_MAGIC
    return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def _cap_per_prompt(pairs: list[PreferencePair], cap: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_prompt[p.prompt].append(i)
    keep: set[int] = set()
    for idx in by_prompt.values():
        keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
    return [p for i, p in enumerate(pairs) if i in keep]


def load_pairs(source: str | Path, options: LoadOptions | None = None, **kwargs: Any) -> list[PreferencePair]:
    """Reads every pair of ``source`` (file, folder, ``hf:`` id, or ``synthetic:...``, see
    :mod:`rlkit.data.synthetic`). ``kwargs`` are :class:`LoadOptions` fields."""
    opts = replace(options, **kwargs) if options is not None else LoadOptions(**kwargs)
    if str(source).startswith("synthetic:"):
        from rlkit.data.synthetic import SyntheticPreferenceConfig, synthetic_pairs

        pairs = synthetic_pairs(SyntheticPreferenceConfig.parse(str(source)), str(source))
        return pairs[: opts.limit] if opts.limit is not None else pairs
    pairs: list[PreferencePair] = []
    fmt_by_file: dict[str, tuple[str, dict[str, str]]] = {}
    for file, row, record, folder in iter_rows(source, opts.split):
        if file not in fmt_by_file:
            try:
                fmt = opts.format if opts.format != "auto" else detect_format(set(record), opts.columns)
            except ValueError as exc:
                raise PreferenceDataError(str(exc), file, row) from None
            fmt_by_file[file] = (fmt, _columns_for(fmt, record, opts.columns))
        fmt, cols = fmt_by_file[file]
        pairs.extend(_pairs_from_record(fmt, record, cols, file, row, folder, opts))
    if opts.max_pairs_per_prompt is not None:
        pairs = _cap_per_prompt(pairs, opts.max_pairs_per_prompt, opts.seed)
    if opts.limit is not None:
        pairs = pairs[: opts.limit]
    return pairs


# --------------------------------------------------------------------------------------------------
# materialising one side of a pair


def _image_ref(pair: PreferencePair, side: int) -> Any:
    """One side's image as stored: bytes (a hub ``{"bytes", "path"}`` record's bytes when it has them), a path
    resolved against the pair's root, or whatever else was given (a PIL image)."""
    ref = pair.chosen if side == 0 else pair.rejected
    if isinstance(ref, dict):  # the Hugging Face ``Image`` feature: {"bytes": ..., "path": ...}
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (str, Path)):
        path = Path(ref).expanduser()
        return Path(pair.root) / path if not path.is_absolute() and pair.root else path
    return ref


def open_image(pair: PreferencePair, side: int):
    """The PIL image of ``pair.chosen`` (side 0) or ``pair.rejected`` (side 1), opened lazily (size known)."""
    from PIL import Image, UnidentifiedImageError

    ref = _image_ref(pair, side)
    try:
        if isinstance(ref, Image.Image):
            return ref
        if isinstance(ref, (bytes, bytearray)):
            return Image.open(io.BytesIO(ref))
        if isinstance(ref, Path):
            return Image.open(ref)
    except (OSError, UnidentifiedImageError) as exc:
        raise pair.error(f"unreadable image ({type(exc).__name__}: {exc})", side) from None
    raise pair.error(f"expected an image path, bytes or a PIL image, got {type(ref).__name__}", side)


def image_identity(pair: PreferencePair, side: int) -> str | None:
    """What tells one side's image apart from every other: its resolved path, or a hash of its bytes (a hub
    ``{"bytes", "path"}`` record's ``path`` is often a bare file name that many rows share); None for a PIL
    image, which has no identity to cache by."""
    import hashlib

    ref = _image_ref(pair, side)
    if isinstance(ref, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(ref).hexdigest()
    return str(ref.resolve()) if isinstance(ref, Path) else None


def load_image(pair: PreferencePair, side: int):
    """The decoded RGB PIL image of one side of a pair."""
    image = open_image(pair, side)
    try:
        return image.convert("RGB")
    except OSError as exc:  # truncated or corrupt data shows up only when decoding
        raise pair.error(f"unreadable image ({type(exc).__name__}: {exc})", side) from None


def image_to_tensor(image) -> Tensor:
    """PIL image -> ``(3, H, W)`` float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def load_latent(pair: PreferencePair, side: int) -> Tensor:
    """The stored latent of one side as a float32 tensor ``(C, h, w)``."""
    value = pair.chosen if side == 0 else pair.rejected
    shape = pair.shapes[side]
    try:
        if isinstance(value, ParquetCell):
            value = value.read()
        if isinstance(value, Tensor):
            out = value.detach().float()
        elif isinstance(value, np.ndarray):
            out = torch.from_numpy(np.array(value, dtype=np.float32))
        elif isinstance(value, (bytes, bytearray)):
            if bytes(value[:6]) == NPY_MAGIC:
                out = torch.from_numpy(np.load(io.BytesIO(value), allow_pickle=False).astype(np.float32))
            else:
                if shape is None:
                    raise pair.error("raw latent bytes need a shape column (e.g. latent1_shape)", side)
                out = torch.from_numpy(np.frombuffer(value, dtype=np.float32).copy())
        elif isinstance(value, list):
            out = torch.tensor(value, dtype=torch.float32)
        else:
            raise pair.error(f"expected a latent (tensor, array, npy bytes, list), got {type(value).__name__}", side)
    except PreferenceDataError:
        raise
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        raise pair.error(f"unreadable latent ({type(exc).__name__}: {exc})", side) from None
    if shape is not None:
        if out.numel() != int(np.prod(shape)):
            raise pair.error(f"latent has {out.numel()} values but its shape column says {list(shape)}", side)
        out = out.reshape(shape)
    if out.dim() != 3:
        raise pair.error(f"expected a (C, h, w) latent, got shape {tuple(out.shape)}", side)
    return out
