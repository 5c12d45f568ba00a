"""YAML -> typed dataclasses, strictly: unknown keys, wrong types and bad values are collected and
reported all at once, each naming the file and the dotted key.

Precedence: dataclass defaults < YAML < command-line ``key=value`` overrides (dotted paths, list indices,
values parsed as YAML scalars, so ``optim.lr=1e-5`` is a float and ``launch.deepspeed=null`` is None).
The schema itself lives in :mod:`rlkit.config`; this module knows nothing about training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

_MISSING = object()


@dataclasses.dataclass
class ConfigProblem:
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.key or '<root>'}: {self.message}"


class ConfigError(ValueError):
    """All problems of one recipe, reported together."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the recipe:\n{lines}")


def _join(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}.{key}" if prefix else str(key)
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[ConfigProblem] = []

    def fail(self, key: str, message: str) -> object:
        self.problems.append(ConfigProblem(self.file, key, message))
        return _MISSING

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any:
            return _resolve_any(value)
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, key)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            candidates = [a for a in args if a is not type(None)]
            # try each member silently, keep the first that converts
            for cand in candidates:
                trial = _Builder(self.file)
                out = trial.convert(cand, value, key)
                if not trial.problems:
                    return out
            if len(candidates) == 1:
                return self.convert(candidates[0], value, key)
            return self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
        if origin is Literal:
            if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / off as false, yes / on as true
                words = [w for w in YAML_BOOL_WORDS[value] if w in args]
                if words and value not in args:
                    return words[0]
            if value in args:
                return value
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return self.fail(key, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}{hint}")
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                return self.fail(key, f"expected a list, got {value!r}")
            fixed = origin is tuple and args and args[-1] is not Ellipsis  # tuple[int, int]: exactly two items
            if fixed and len(value) != len(args):
                return self.fail(key, f"expected a list of {len(args)} items, got {list(value)!r}")
            item_tps = args if fixed else [args[0] if args else Any] * len(value)
            items = [self.convert(tp_i, v, _join(key, i)) for i, (tp_i, v) in enumerate(zip(item_tps, value))]
            if any(item is _MISSING for item in items):  # reported; the list must not reach a check half-built
                return _MISSING
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                return self.fail(key, f"expected a mapping, got {value!r}")
            val_tp = args[1] if len(args) == 2 else Any
            converted = {k: self.convert(val_tp, v, _join(key, k)) for k, v in value.items()}
            return _MISSING if any(v is _MISSING for v in converted.values()) else converted
        if tp is bool:
            if isinstance(value, bool):
                return value
            return self.fail(key, f"expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return self.fail(key, f"expected an integer, got {value!r}")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-5" as a string
                except ValueError:
                    pass
            return self.fail(key, f"expected a number, got {value!r}")
        if tp is str:
            if isinstance(value, str):
                return resolve_package_path(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            return self.fail(key, f"expected a string, got {value!r}")
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        return self.fail(key, f"expected {_type_name(tp)}, got {value!r}")

    def build_dataclass(self, cls: type, data: Any, key: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return self.fail(key, f"expected a mapping ({cls.__name__}), got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for name in data:
            if name not in fields:
                close = difflib.get_close_matches(str(name), list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
                self.fail(_join(key, name), f"unknown key{hint}")
        kwargs = {}
        broken = False
        for name, f in fields.items():
            if name in data:
                out = self.convert(hints[name], data[name], _join(key, name))
                if out is _MISSING:
                    broken = True
                    continue
                kwargs[name] = out
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(_join(key, name), "required key is missing")
                broken = True
        if broken:
            return _MISSING
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            return self.fail(key, str(exc))
        check = getattr(obj, "check", None)
        if callable(check):
            for sub, message in check():
                self.fail(_join(key, sub), message)
        return obj


PACKAGE_SCHEME = "pkg://"


def recipe_dirs() -> tuple[Path, ...]:
    """Where the shipped recipes live: the source tree's ``recipes/`` (a clone, or ``pip install -e .``), then
    ``share/rlkit/recipes`` of the installed wheel (pyproject's data-files) wherever it went (``--user``,
    ``--prefix``), as its installed-files record says, else under the interpreter's own prefix."""
    import importlib.metadata
    import sysconfig

    dirs = [Path(__file__).resolve().parents[1] / "recipes"]
    try:
        files = importlib.metadata.files("rlkit") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if "share/rlkit/recipes/" in file.as_posix():
            located = Path(file.locate()).resolve()
            folder = next((p for p in located.parents if p.name == "recipes" and p.parent.name == "rlkit"), None)
            if folder is not None:
                dirs.append(folder)
                break
    dirs.append(Path(sysconfig.get_path("data")) / "share" / "rlkit" / "recipes")
    return tuple(dict.fromkeys(dirs))


def shipped_recipe(name: str) -> Path:
    """``recipes/<name>`` as shipped with rlkit, which the demo, the Shapes build and the benchmarks run."""
    dirs = recipe_dirs()
    for folder in dirs:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name}: no such shipped recipe in {' or '.join(str(d) for d in dirs)}")


def missing_local_path(value: str) -> bool:
    """``value`` is written as a local path (absolute, ``./``, ``../``, ``~`` or ``pkg://``), not a hub id, and
    nothing is there: what a recipe's validation can refuse before any weight loads. (A bare relative path such as
    ``data/x.parquet`` may name a file the user has yet to make; it is checked when the run reads it.)"""
    value = resolve_package_path(str(value))
    if not value.startswith(("/", "./", "../", "~")):
        return False
    try:
        return not Path(value).expanduser().exists()
    except RuntimeError:  # ~user of no such user
        return True


def resolve_package_path(value: str) -> str:
    """``pkg://rlkit/shapes/assets/x`` -> the absolute path of that file inside the installed package.

    Lets shipped recipes name shipped checkpoints without depending on the working directory.
    """
    if not value.startswith(PACKAGE_SCHEME):
        return value
    import importlib.util

    package, _, rest = value[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return value
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``fn`` applied to every string in a recipe's nested lists and dicts."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def package_path(value: Any) -> Any:
    """The inverse of :func:`resolve_package_path` over a recipe's values: absolute paths inside the rlkit package
    become ``pkg://rlkit/...`` again, so that a checkpoint built into the package records paths that hold on
    every machine it is installed on. Other values are returned as they are."""
    root = Path(resolve_package_path(f"{PACKAGE_SCHEME}rlkit"))

    def relative(text: str) -> str:
        if text.startswith("/") and root in Path(text).parents:
            return f"{PACKAGE_SCHEME}rlkit/{Path(text).relative_to(root).as_posix()}"
        return text

    return _map_strings(value, relative)


def _resolve_any(value: Any) -> Any:
    return _map_strings(value, resolve_package_path)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``a.b.0.c=value`` -> (['a', 'b', 0, 'c'], parsed value)."""
    if "=" not in text:
        raise ConfigError([ConfigProblem("command line", text, "overrides are written key=value")])
    key, _, raw = text.partition("=")
    path: list[str | int] = [int(p) if p.lstrip("-").isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> list[ConfigProblem]:
    """Applies dotted overrides to a raw mapping in place; returns the problems (bad paths)."""
    problems: list[ConfigProblem] = []
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    problems.append(ConfigProblem("command line", text, f"no list item {part} at this path"))
                    break
                if not isinstance(node[part], (dict, list)):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            else:
                if not isinstance(node, dict):
                    problems.append(ConfigProblem("command line", text, f"{part!r} is not inside a mapping"))
                    break
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        else:
            last = path[-1]
            if isinstance(last, int):
                if isinstance(node, list) and -len(node) <= last < len(node):
                    node[last] = value
                elif isinstance(node, list) and last == len(node):
                    node.append(value)
                else:
                    problems.append(ConfigProblem("command line", text, f"no list item {last} at this path"))
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(ConfigProblem("command line", text, f"{last!r} is not inside a mapping"))
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last one, so a section
    pasted twice would silently drop every setting of the first. Checked as each mapping is first flattened, before
    merge keys (``<<: *anchor``) bring in keys that the mapping may set again on purpose."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    twice = key in seen
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if twice:
                    lines = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                    raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice ({lines})",
                                                            key_node.start_mark)
                seen[key] = key_node.start_mark.line
        super().flatten_mapping(node)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([ConfigProblem(str(path), "", "file not found")])
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        context = getattr(exc, "context", None)
        what = f"{exc.problem}{f' ({context})' if context else ''}" if getattr(exc, "problem", None) else str(exc)
        raise ConfigError([ConfigProblem(str(path), where, f"not valid YAML: {what}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(str(path), "", "the top level must be a mapping")])
    return data


OVERRIDDEN = " (set on the command line)"  # marks the file of a problem at a key an override set


def build(cls: type, data: dict, file: str = "", overrides: list[str] | None = None):
    """Builds dataclass ``cls`` from ``data`` (+ overrides, applied to a copy: the caller's mapping is left as it
    is); raises :class:`ConfigError` with every problem."""
    data = copy.deepcopy(data)
    problems = apply_overrides(data, overrides or [])
    builder = _Builder(file)
    obj = builder.build_dataclass(cls, data, "")
    # a problem at or under a key an override set is the command line's, not the file's
    given = [text.partition("=")[0].strip() for text in overrides or []]
    problems += [ConfigProblem(f"{file}{OVERRIDDEN}", p.key, p.message)
                 if any(p.key == k or p.key.startswith(k + ".") for k in given) else p for p in builder.problems]
    if problems:
        raise ConfigError(problems)
    return obj


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe's plain data as ``{"dotted.key": value}``; a list of mappings (``rewards``) by index, with its length
    as ``<key>.len``; other lists as JSON text, so that values compare and print as one."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}.{i}"))
        out[f"{prefix}.len"] = len(data)
        return out
    return {prefix: json.dumps(data) if isinstance(data, (list, dict)) else data}


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
