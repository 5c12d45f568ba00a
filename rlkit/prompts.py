"""Prompt sources named by one string in a recipe.

``shapes:<split>``       the Shapes world's captions (``train`` or ``heldout``)
``path/to/file.txt``     one prompt per line
``path/to/file.jsonl``   a ``prompt`` field (or a JSON string) per line
``path/to/file.json``    a list of prompts, or of objects with a ``prompt`` field
``hf:<dataset>[:split[:column]]``  a Hugging Face dataset column (default split ``train``, column ``prompt``)

Every prompt must be a string: a ``null`` or a number is an error naming the file and the line (or row), not the
prompt ``"None"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

SUFFIXES = (".txt", ".jsonl", ".json")


def _checked(where: str, items: Iterable[tuple[int, Any]]) -> list[str]:
    """The prompts of ``(line or row, value)`` items; a value that is not a string names where it is."""
    prompts = []
    for i, value in items:
        if isinstance(value, dict):
            if "prompt" not in value:
                raise ValueError(f"{where} {i}: expected a 'prompt' field, got the fields {sorted(value)}")
            value = value["prompt"]
        if not isinstance(value, str):
            raise ValueError(f"{where} {i}: expected a prompt string, got {type(value).__name__} {value!r}")
        prompts.append(value)
    return prompts


def _from_file(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of prompts (or of objects with a 'prompt' field), "
                             f"got {type(data).__name__}")
        return _checked(f"{path}: item", enumerate(data))
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {i}: invalid JSON ({exc.msg})") from None
    return _checked(f"{path}: line", records)


SHAPES_SPLITS = ("train", "heldout")


def source_problem(source: str) -> str | None:
    """What is wrong with ``source`` before anything is read (a recipe's validation), or None."""
    if source.startswith("shapes:"):
        split = source.split(":", 1)[1]
        if split not in SHAPES_SPLITS:
            return f"prompt source {source!r}: the Shapes world has the splits {', '.join(SHAPES_SPLITS)}"
    elif source.startswith("hf:"):
        if not source[3:].split(":")[0]:
            return f"prompt source {source!r}: expected hf:<dataset>[:split[:column]]"
    elif not Path(source).is_file():
        return (f"prompt source {source!r}: no such file (expected shapes:<split>, a .txt, .jsonl or .json file, "
                "or hf:<dataset>)")
    elif Path(source).suffix not in SUFFIXES:
        return (f"prompt source {source!r}: unsupported file type {Path(source).suffix!r}; expected one of "
                f"{', '.join(SUFFIXES)}")
    else:
        with open(source, encoding="utf-8", errors="replace") as lines:  # read up to its first line with text
            if not any(line.strip() for line in lines):
                return f"prompt source {source!r} holds no prompts"
    return None


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """The prompts ``source`` names (module docstring), the first ``limit`` of them when a limit is given."""
    if limit is not None and limit <= 0:
        raise ValueError(f"prompt source {source!r}: limit must be > 0, got {limit}")
    problem = source_problem(source)
    if problem is not None:
        raise ValueError(problem)
    if source.startswith("shapes:"):
        from rlkit.shapes import world

        split = source.split(":", 1)[1]
        prompts = {"train": world.train_prompts, "heldout": world.heldout_prompts}[split]()
    elif source.startswith("hf:"):
        from datasets import load_dataset

        parts = source[3:].split(":")
        name, split, column = parts[0], (parts[1] if len(parts) > 1 else "train"), (
            parts[2] if len(parts) > 2 else "prompt")
        ds = load_dataset(name, split=split)
        if column not in ds.column_names:
            raise ValueError(f"prompt source {source!r}: no column {column!r}; columns: {ds.column_names}")
        prompts = _checked(f"{source}: row", enumerate(ds[column]))
    else:
        prompts = _from_file(Path(source))
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    return prompts[:limit] if limit is not None else prompts
