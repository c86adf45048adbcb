"""Typed dataclass configs: YAML in, dotted ``key=value`` overrides, strict checking.

Every component owns a ``@dataclass(kw_only=True)`` config that validates itself in
``__post_init__``. This module turns plain data (YAML, overrides) into those
dataclasses and refuses, with the offending dotted key in the message, anything that
does not fit: an unknown key, a wrong type, a value the component rejects.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``a.b=value`` overrides (applied last)."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping; a missing file or bad YAML is one ValueError line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist; pass an existing YAML file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` set; values parse as YAML."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:  # a missing or null (optional) section: the override creates it
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                             "check its brackets and quotes") from None
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what PyYAML found and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).split("\n", 1)[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class SettingError(ValueError):
    """A config check that names its key: ``template``'s ``{key}`` becomes the key's whole dotted path
    (``paths`` in ``InputConfig`` reads ``data.input.paths`` in a pre-training config), so the fix it
    gives is a key the user can type."""

    def __init__(self, key: str, template: str) -> None:
        self.key, self.template = key, template
        super().__init__(template.format(key=key))


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Recursively build dataclass ``cls`` from ``data``, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix!r}" if prefix else ""
        known = ", ".join(sorted(fields))
        raise ValueError(f"unknown config key {_join(prefix, unknown[0])!r}{where}; known keys: {known}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except SettingError as err:
        raise SettingError(_join(prefix, err.key), err.template) from None
    except ValueError as err:
        raise ValueError(f"{prefix}: {err}" if prefix else str(err)) from None
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{prefix or cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists, ready for YAML/JSON)."""
    return _plain(dataclasses.asdict(cfg))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; used to log configs as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = _join(prefix, key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key} must have {len(args)} items, got {len(value)}")
            items = [_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):
            value = _parse_float(value, key)  # YAML 1.1 reads "1e-3" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp} of {key} is not supported")


def _parse_float(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {text!r}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------- discoverability
def describe_config(cls: type, prefix: str = "", default: Any = dataclasses.MISSING) -> list[str]:
    """One line per key of ``cls`` (sections as dotted keys): ``key: type = default  # comment``,
    the comment being the one the field carries in its source. For ``--help``."""
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        value = _field_default(f, default)
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        section = _section_type(tp)
        if section is not None:  # an optional section (null: off) lists its keys' own defaults
            lines += [f"{key}: section | null = null{note}"] if value is None else []
            lines += describe_config(section, key, value if dataclasses.is_dataclass(value) else dataclasses.MISSING)
            continue
        shown = "(required)" if value is dataclasses.MISSING else yaml.safe_dump(
            _plain(dataclasses.asdict(value)) if dataclasses.is_dataclass(value) else _plain(value),
            default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"{key}: {_type_name(tp)} = {shown}{note}")
    return lines


def _field_default(f: dataclasses.Field, owner_default: Any) -> Any:
    if owner_default is not dataclasses.MISSING:  # a section's default instance decides its keys' defaults
        return getattr(owner_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        try:
            return f.default_factory()
        except (ValueError, TypeError):  # a section that cannot exist empty (e.g. input.paths): its keys' own
            return dataclasses.MISSING
    return dataclasses.MISSING


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field (``X`` or ``X | None``), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args).replace("NoneType", "null")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source: on its line, else the comment lines above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    only_comment = {n for n in comments if lines[n - 1].strip().startswith("#")}
    nodes = [n for n in ast.parse(source).body[0].body
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    out = {}
    for i, node in enumerate(nodes):
        text = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n >= 1 and n in only_comment:
            above.insert(0, comments[n])
            n -= 1
        if text:  # comment lines right below continue it, unless they introduce the next field (which has none)
            nxt = nodes[i + 1] if i + 1 < len(nodes) else None
            if nxt is None or any(k in comments for k in range(nxt.lineno, nxt.end_lineno + 1)):
                n = node.end_lineno + 1
                while n in only_comment:
                    text.append(comments[n])
                    n += 1
        if text or above:
            out[node.target.id] = " ".join(text or above)
    return out


# --------------------------------------------------------------------- --print-config
def printable_config(cls: type, path: str | Path | None, overrides: Sequence[str]) -> str:
    """The resolved config as YAML. One that cannot run yet (a required key left empty, a value out of
    range) still prints: the defaults with the file's and the overrides' values, the keys to set marked
    ``# required`` and the first problem on top, so the defaults are always there to read."""
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    try:
        return yaml.safe_dump(to_dict(from_dict(cls, data)), sort_keys=False)
    except ValueError as err:
        problem = err
    required: set[str] = set()
    tree = _plain(deep_merge(_default_tree(cls, "", dataclasses.MISSING, required), data))
    if isinstance(problem, SettingError):
        required.add(problem.key)
    lines = []
    for key, line in _keyed_lines(yaml.safe_dump(tree, sort_keys=False)):
        lines.append(f"{line}  # required: set it" if key in required else line)
    return f"# not runnable as it is: {problem}\n" + "\n".join(lines) + "\n"


def _default_tree(cls: type, prefix: str, default: Any, required: set[str]) -> dict[str, Any]:
    hints, tree = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, value, section = _join(prefix, f.name), _field_default(f, default), _section_type(hints[f.name])
        if section is not None and value is not None:
            tree[f.name] = _default_tree(section, key, value if dataclasses.is_dataclass(value) else
                                         dataclasses.MISSING, required)
        elif value is dataclasses.MISSING:
            tree[f.name] = None
            required.add(key)
        else:
            tree[f.name] = _plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
    return tree


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _keyed_lines(text: str) -> Iterator[tuple[str | None, str]]:
    """Each line of block YAML with the dotted key it sets (None for list items and continuations)."""
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        found = re.match(r"( *)([^\s:#-][^:]*):(?: |$)", line)
        if not found:
            yield None, line
            continue
        indent = len(found.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, found.group(2)))
        yield ".".join(name for _, name in stack), line
