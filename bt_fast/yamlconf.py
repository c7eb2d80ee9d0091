"""Strict YAML into typed dataclasses: the machinery under ``bt_fast.config``.

PyYAML's traps handled here: duplicate keys (it keeps the last one silently) are an
error, ``1e-3`` without a dot (a string to PyYAML) is read as a float where the field is
a float. Every document is bounded before it is built (a config is a few kilobytes):
MAX_BYTES of UTF-8, MAX_DEPTH levels of nesting, MAX_ALIASES aliases and MAX_NODES nodes
once aliases are expanded; a few hundred bytes of nested aliases ("billion laughs") would
otherwise expand to gigabytes in the first error message or deep copy. Values quoted in
messages are cut to MAX_SHOWN characters. Unknown keys name the valid ones (with a did-you-mean), wrong types name the
key and the value. ``--set a.b.c=value`` paths walk mappings and lists. Every error is
a ``ConfigError`` (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, List

import yaml

from bt_fast.errors import ConfigError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *defaults``: merged keys may be overridden (YAML's rule)
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"a mapping or list as a key at line {key_node.start_mark.line + 1}") from None
        if key in seen:
            raise ConfigError(f"duplicate key {shown(key)} at line {key_node.start_mark.line + 1} "
                              f"(first at line {seen[key]})")
        seen[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)  # merge keys first, explicit keys after: the last one wins
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

MAX_BYTES = 1 << 20
"""Largest config or overlay file (1 MiB; the official ImageNet recipe is under 2 KiB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists (a config nests 4 levels)."""
MAX_ALIASES = 64
"""Most ``*alias`` references in one document."""
MAX_NODES = 20_000
"""Most nodes in one document with every alias expanded (what a deep copy would build)."""
MAX_SHOWN = 80
"""Longest value quoted in an error message."""


def shown(value: Any) -> str:
    """repr(value) cut to MAX_SHOWN characters: error lines stay readable."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


class BoundedLoader(StrictLoader):
    """StrictLoader that refuses deep nesting and too many aliases while composing."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} aliases (*name) in one document")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ConfigError(f"nested deeper than {MAX_DEPTH} levels "
                                  f"(line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded_size(node: yaml.Node, memo: dict, active: set) -> int:
    """Nodes under ``node`` with aliases expanded (shared nodes counted each time)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise ConfigError(f"alias refers to itself (line {node.start_mark.line + 1})")
    active.add(id(node))
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_NODES:
            break  # no need to count further
    active.discard(id(node))
    memo[id(node)] = size
    return size


def load_text(text: str) -> Any:
    """One YAML document, strict (duplicate keys) and bounded; ConfigError otherwise."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_NODES:
            raise ConfigError(f"more than {MAX_NODES} values once aliases are expanded")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else coerce(value, args[0], where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {shown(value)}")
        (arg,) = typing.get_args(tp)
        return [coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, typing.Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {shown(value)}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {shown(value)}")
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {shown(value)}")


def build(cls: type, values: dict, where: str):
    """An instance of dataclass ``cls`` from plain data; ``where`` prefixes keys in errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            prefix = f"{where}." if where else ""
            hint = difflib.get_close_matches(str(key), names, n=1)
            dym = f" (did you mean {prefix + hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown key {shown(prefix + str(key))}{dym}; "
                              f"valid keys{' of ' + where if where else ''}: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {shown(item)}: expected section.key=value")
    key, raw = item.split("=", 1)
    if len(item) > MAX_BYTES:
        raise ConfigError(f"--set {shown(item)}: longer than {MAX_BYTES >> 20} MiB")
    try:
        value = load_text(raw) if raw != "" else ""
    except ConfigError as e:
        raise ConfigError(f"--set {shown(item)}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {shown(item)}: cannot parse value: {' '.join(str(e).split())[:200]}") from None
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to plain data."""
    for item in overrides:
        path, value = parse_override(item)
        node = values
        try:
            for part in path[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(path[-1])] = value
            else:
                node[path[-1]] = value
        except (AttributeError, IndexError, TypeError, ValueError):
            raise ConfigError(f"--set {shown(item)}: {shown('.'.join(path))[1:-1]} does not name a config value "
                              "(sections are mappings, views is a list indexed from 0)") from None
    return values


def read_yaml(path: str | Path) -> dict:
    """The mapping in a config file: UTF-8, at most MAX_BYTES, bounded (see load_text)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES >> 20} MiB; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        values = load_text(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return values or {}


def yaml_value(value) -> str:
    """One value as inline YAML, the form ``--set`` parses back to the same value."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
