"""Typed run configs: a dataclass as command-line flags and YAML keys, every value converted to its field's type.

A nested dataclass field (TrainConfig.lora: LoraConfig) is flattened: its fields are flags and top-level keys of
their own (--r, --targets, r: 8), and YAML may also give them as a mapping under the field's name (lora: {r: 8}).
Booleans are --x / --no-x; lists repeat the flag (--export kohya --export peft); mappings are YAML (--rank-pattern
'{q_proj: 16}'); an optional value is `null` (or `none` on the command line). A bad value or an unknown key is one
LoraError naming the key, what it expects and where it came from.

(jsonargparse and transformers' HfArgumentParser were weighed: the first spells flags --lora.r / --max_steps and
booleans `--x true`, the second has no unions, mappings or nested dataclasses and does not convert YAML values.)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from lorakit.core.errors import LoraError


def fields(cls) -> dict[str, tuple[Any, str | None]]:
    """{key: (type, the nested field it belongs to or None)} of a config class, nested dataclasses flattened."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({k: (t, f.name) for k, (t, _) in fields(tp).items()})
        else:
            out[f.name] = (tp, None)
    return out


def add_flags(parser: argparse.ArgumentParser, cls):
    """One --flag per field (defaults left unset, so a --config file can fill them), and --config."""
    for key, (tp, _) in fields(cls).items():
        flag = "--" + key.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(tp) is list or list in map(typing.get_origin, typing.get_args(tp)):
            parser.add_argument(flag, action="append", default=None, metavar=key.upper(),
                                help=f"{describe(tp)}; repeat the flag")
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
            parser.add_argument(flag, default=None, choices=choices, metavar=None if choices else key.upper(),
                                help=None if choices or tp is str else describe(tp))
    parser.add_argument("--config", help="a YAML file with the same keys (flags given here win)")


def from_args(args: argparse.Namespace, cls):
    """The config `cls` from a --config YAML file overlaid with the flags given."""
    values = read_yaml(args.config, cls) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config")}
    return build(cls, {**values, **flags}, {**{k: args.config for k in values}, **{k: "--" for k in flags}})


def read_yaml(path: str, cls) -> dict:
    """The keys of a YAML config file (a mapping), nested mappings of nested configs flattened."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LoraError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LoraError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise LoraError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise LoraError(f"{path} holds a {type(values).__name__}; a config is a mapping of keys to values (lr: 1e-4)")
    flat, nested = {}, {f.name for f in dataclasses.fields(cls)} - set(fields(cls))  # e.g. lora
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in nested and isinstance(value, dict):
            flat.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def build(cls, values: dict | None = None, source: str | dict[str, str] = "config", **kw):
    """`cls` from flat keys, `values` and keyword arguments (build(TrainConfig, r=4, lr=1e-3)), each value converted
    to its field's type; `source` names where the values (or each key's value) came from: a file, or "--" for flags."""
    known, values = fields(cls), {**(values or {}), **kw}
    parts: dict[str | None, dict] = {}
    for key, value in values.items():
        where = source.get(key, "config") if isinstance(source, dict) else source
        if key not in known:
            raise LoraError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        tp, owner = known[key]
        if str in typing.get_args(tp) and list in map(typing.get_origin, typing.get_args(tp)):
            value = names(value)
        name = f"--{key.replace('_', '-')}" if where == "--" else f"{where}: key {key!r}"
        parts.setdefault(owner, {})[key] = convert(value, tp, name)
    top = dict(parts.get(None, {}))
    for f in dataclasses.fields(cls):
        if f.name in parts:
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            try:
                top[f.name] = dataclasses.replace(base, **parts[f.name])
            except LoraError as e:
                where = {source.get(k, "config") for k in parts[f.name]} if isinstance(source, dict) else {source}
                raise LoraError(f"{' and '.join(sorted(where)).replace('--', 'the flags')}: {e}") from None
    return cls(**top)


def names(value):
    """A list-or-string value (targets, exclude): names, repeated or comma-separated, or one keyword or pattern."""
    if not isinstance(value, list | str) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        return value
    items = [x.strip() for v in ([value] if isinstance(value, str) else value) for x in v.split(",") if x.strip()]
    one = len(items) == 1 and (items[0] == "all-linear" or re.search(r"[\\.*+?()\[\]|^$]", items[0]))
    return items[0] if one else items


def convert(value, tp, name: str):
    """`value` as type `tp` (int, float, bool, str, None, Literal, list, dict and unions of them), or a LoraError."""
    try:
        return _convert(value, tp)
    except (TypeError, ValueError):
        raise LoraError(f"{name}: expected {describe(tp)}, got {value!r}") from None


def _convert(value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        # a value already of a plain member type stays; a string is tried as a scalar first, then as itself
        plain = [a for a in args if a is not type(None) and typing.get_origin(a) is None]
        if any(type(value) is a for a in plain if a is not str) or (isinstance(value, str) and str in plain and
                                                                     not any(a in (bool, int, float) for a in plain)):
            return value
        order = sorted((a for a in args if a is not type(None)), key=lambda a: (a is str, typing.get_origin(a) is list))
        for arg in order:
            try:
                return _convert(value, arg)
            except (TypeError, ValueError):
                pass
        raise ValueError
    if origin is Literal:
        if value in args:
            return value
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value) if not isinstance(value, str) else int(value.strip())
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_convert(v, args[0]) for v in items]
    if origin is dict:
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp}")


def describe(tp, short: bool = False) -> str:
    """What a value of type `tp` looks like, in words (for errors and --help)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        words = [describe(a, short) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return describe(args[0], True).upper() if short else f"a list of {describe(args[0], True)}s"
    if origin is dict:
        return f"a mapping of {describe(args[0], True)} to {describe(args[1], True)}"
    return {int: "integer", float: "number", bool: "true or false", str: "string"}.get(tp, str(tp)) if short else \
        {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# settings where 0 or less means nothing sensible (a division by zero, no training step, no image)
POSITIVE = {"lr", "lora_plus_ratio", "text_lr", "ti_lr", "epochs", "max_steps", "batch_size", "grad_accum",
            "max_length", "num_beams", "resolution", "num_validation_images", "validation_steps"}


def check(cfg):
    """Convert every field of the config `cfg` to its type in place (TrainConfig(lr="1e-4") is 1e-4), or a LoraError
    naming the first that cannot be."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise LoraError(f"{type(cfg).__name__}.{f.name}: expected a {tp.__name__}, got {value!r}")
            continue
        setattr(cfg, f.name, convert(value, tp, f"{type(cfg).__name__}.{f.name}"))
        if f.name in POSITIVE and getattr(cfg, f.name) is not None and getattr(cfg, f.name) <= 0:
            raise LoraError(f"{type(cfg).__name__}.{f.name} (--{f.name.replace('_', '-')}) must be more than 0, "
                            f"got {getattr(cfg, f.name)!r}")
