"""Prompt sources named by one string in a recipe.

``shapes:<split>``       the Shapes world's captions (``train`` or ``heldout``)
``path/to/file.txt``     one prompt per line
``path/to/file.jsonl``   a ``prompt`` field per line
``hf:<dataset>[:split[:column]]``  a Hugging Face dataset column (default split ``train``, column ``prompt``)
"""

from __future__ import annotations

import json
from pathlib import Path


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    if source.startswith("shapes:"):
        from rlkit.shapes import world

        splits = {"train": world.train_prompts, "heldout": world.heldout_prompts}
        split = source.split(":", 1)[1]
        if split not in splits:
            raise ValueError(f"prompt source {source!r}: the Shapes world has splits {sorted(splits)}")
        prompts = splits[split]()
    elif source.startswith("hf:"):
        from datasets import load_dataset

        parts = source[3:].split(":")
        name, split, column = parts[0], (parts[1] if len(parts) > 1 else "train"), (
            parts[2] if len(parts) > 2 else "prompt")
        ds = load_dataset(name, split=split)
        if column not in ds.column_names:
            raise ValueError(f"prompt source {source!r}: no column {column!r}; columns: {ds.column_names}")
        prompts = [str(p) for p in ds[column]]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt source {source!r}: no such file (expected shapes:<split>, a .txt or "
                                    ".jsonl file, or hf:<dataset>)")
        if path.suffix == ".jsonl":
            prompts = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{path}: line {i}: expected a JSON object with a 'prompt' field "
                                     f"({exc})") from None
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    return prompts[:limit] if limit else prompts
