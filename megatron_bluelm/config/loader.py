"""Build a :class:`RunConfig` from a YAML recipe and dotted command-line overrides.

    python -m megatron_bluelm.stages.pretrain --config examples/pretrain_tiny.yaml --parallel.tp 2 \\
        --training.train_steps=100 --model.preset bluelm-2.5-3b

Every key is checked against the dataclass fields: an unknown key fails with a "did you mean"
suggestion, a value of the wrong type fails naming the key. Nothing heavy is imported here.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig


def _did_you_mean(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or fail naming ``where``."""
    base, optional = _unwrap_optional(tp)
    # "none"/"null" on the command line mean None only where None is allowed ("none" is also a
    # legitimate string value, e.g. training.recompute: none).
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    if dataclasses.is_dataclass(base):
        raise ConfigError(f"{where}: is a section; set its fields, e.g. {where}.<field>")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(base) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or base is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if base is Any:
        return value
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        if value in choices:
            return value
        as_text = str(value).lower() if isinstance(value, bool) else str(value)
        if as_text in choices:  # e.g. YAML reads `recompute: none` as the string, `off` as False
            return as_text
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}"
                          f"{_did_you_mean(as_text, [str(c) for c in choices])}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        return str(value)
    return value


def _apply_mapping(obj, mapping: dict, prefix: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {mapping!r}")
    types_ = _field_types(type(obj))
    for key, value in mapping.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_:
            raise ConfigError(f"unknown config key {where!r}{_did_you_mean(str(key), list(types_))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, value or {}, where)
        else:
            setattr(obj, key, _coerce(value, types_[key], where))


def set_dotted(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set ``cfg.<a>.<b>`` from the string ``'a.b'``; unknown parts fail with a suggestion."""
    parts = dotted.split(".")
    obj = cfg
    for depth, part in enumerate(parts):
        types_ = _field_types(type(obj))
        where = ".".join(parts[: depth + 1])
        if part not in types_:
            raise ConfigError(f"unknown config key {where!r}{_did_you_mean(part, list(types_))}")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"{where}: is a section; set one of its fields")
            setattr(obj, part, _coerce(value, types_[part], where))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where}: is a value, not a section")


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``['--a.b', '1', '--c.d=x']`` -> ``[('a.b', '1'), ('c.d', 'x')]``."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override --{key} has no value")
            value = argv[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML recipe at ``path`` <- command-line ``overrides`` (dotted)."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        try:
            _apply_mapping(cfg, mapping, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for key, value in parse_overrides(list(overrides)):
        set_dotted(cfg, key, value)
    return cfg


def to_dict(cfg) -> dict:
    """Plain nested dict (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)
