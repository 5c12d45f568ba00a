"""Prompt sources: text, JSON Lines and JSON files, the Shapes splits; a prompt that is not a string is an error."""

from __future__ import annotations

import json

import pytest

from rlkit.prompts import load_prompts


def test_every_file_layout_reads_the_same_prompts_and_limit_takes_the_first(tmp_path):
    prompts = ["a red circle", "a blue square", "a cat"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    (tmp_path / "strings.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "list.json").write_text(json.dumps(prompts))
    (tmp_path / "records.json").write_text(json.dumps([{"prompt": p} for p in prompts]))
    for name in ("p.txt", "p.jsonl", "strings.jsonl", "list.json", "records.json"):
        assert load_prompts(str(tmp_path / name)) == prompts, name
        assert load_prompts(str(tmp_path / name), limit=2) == prompts[:2], name
    assert load_prompts("shapes:heldout", limit=3) == load_prompts("shapes:heldout")[:3]


@pytest.mark.parametrize("name, text, message", [
    ("list.json", json.dumps(["a cat", None]), r"list.json: item 1: expected a prompt string, got NoneType None"),
    ("n.jsonl", '{"prompt": "a"}\n\n{"prompt": 123}\n', r"n.jsonl: line 3: expected a prompt string, got int 123"),
    ("k.jsonl", '{"caption": "a"}\n', r"k.jsonl: line 1: expected a 'prompt' field, got the fields \['caption'\]"),
    ("bad.jsonl", '{"prompt": "a"}\n{oops\n', r"bad.jsonl: line 2: invalid JSON"),
    ("obj.json", json.dumps({"prompt": "a"}), r"obj.json: expected a list of prompts"),
    ("p.csv", "a cat\n", r"unsupported file type '.csv'; expected one of .txt, .jsonl, .json"),
    ("empty.txt", "\n\n", r"holds no prompts"),
])
def test_bad_sources_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(tmp_path / name))


def test_a_missing_file_and_a_bad_limit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "nope.txt"))
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="limit must be > 0, got 0"):
        load_prompts(str(tmp_path / "p.txt"), limit=0)
    with pytest.raises(ValueError, match="splits"):
        load_prompts("shapes:test")
