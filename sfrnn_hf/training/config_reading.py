"""From a YAML file and `section.key=value` overrides to typed, checked values; knows no section (`config.py` does).

A value is read as YAML, then made what its field's type means where YAML 1.1 reads it otherwise (`1e-3` is a string
to YAML, a bare `no` is false), checked against the type (a `Literal` or an enum: its choices, with "did you mean")
and the field's validators. Every error is a `ConfigError` naming the key and the value given.
"""

import difflib
import enum
import importlib.resources
import math
import os
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from huggingface_hub.dataclasses import type_validator
from huggingface_hub.errors import StrictDataclassClassValidationError


class ConfigError(ValueError):
    """A bad configuration value, key or path: raised before any data is prepared or any step is taken."""


_SECRET_KEY = re.compile(r"token(?!iz|s)|secret|password|api_key", re.IGNORECASE)  # `hub_token`; not `tokenizer`, `*_tokens_*`


def is_secret(key) -> bool:
    """Whether a setting named `key` (`hub_token`, `HF_TOKEN`, `training.trainer_args.hub_token`...) holds a secret."""
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in `sfrnn_hf/training/configs/`."""
    folder = importlib.resources.files(__package__) / "configs"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = importlib.resources.files(__package__) / "configs" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return str(shipped)
    close = difflib.get_close_matches(name_or_path, shipped_configs(), n=3)
    hint = f" Did you mean {close}?" if close else f" Shipped configs: {shipped_configs()}."
    raise ConfigError(f"Config file {name_or_path!r} not found (neither a file nor a shipped config).{hint}")


def read_yaml(source: str) -> dict:
    """The sections of config file `source`."""
    with open(source) as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            reason = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"Config {source} is not valid YAML{where}: {reason}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config {source} must be a mapping of sections, got {type(raw).__name__}.")
    return raw


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`["training.seed=1"]` -> `[(["training", "seed"], 1)]`."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value (e.g. model.gradient_mode=bptt).")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if len(path) < 2 or not all(path):
            raise ConfigError(f"Override key {key!r} must be section.key (e.g. training.learning_rate), got {key!r}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            reason = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"Override {item!r}: the value {raw!r} is not valid YAML ({reason}).") from None
        parsed.append((path, value))
    return parsed


def apply_override(tree: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        if tree.get(part) is None:
            tree[part] = {}
        if not isinstance(tree[part], dict):
            raise ConfigError(f"Cannot set {'.'.join(path)}: {part} is not a mapping.")
        tree = tree[part]
    tree[path[-1]] = value


def did_you_mean(value, allowed) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_key(section: str, key: str, allowed, listed=None, also: str = "") -> ConfigError:
    """The error for `section.key`, not among `allowed` (the message lists `listed`, by default all of them)."""
    return ConfigError(f"Unknown key {section}.{key}.{did_you_mean(key, allowed)} "
                       f"Allowed keys of `{section}`: {sorted(allowed if listed is None else listed)}{also}.")


def _options(annotation) -> tuple:
    return get_args(annotation) if get_origin(annotation) in (types.UnionType, Union) else (annotation,)


def _yaml_reading(key: str, value, options: tuple):
    """`value` as a field of these type `options` means it: `1e-3` and `30` are floats, a bare `no` (false) is the
    string a strategy or `report_to` means, one string is a one-item list."""
    if float in options and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if str in options and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run_name: 2024`, an all-digit `hub_token`
    if value is False and (key.endswith("_strategy") or key == "report_to"):
        return "none" if key == "report_to" else "no"
    if isinstance(value, str) and str not in options and any(get_origin(option) is list for option in options):
        return [value]
    return value


def checked(name: str, value, annotation, validators=()):
    """YAML's `value` for a field named `name` of type `annotation`, checked by its type and `validators`. (An error
    about a secret does not show its value.)"""
    try:
        return _checked(name, value, annotation, validators)
    except ConfigError:
        if not is_secret(name):
            raise
        raise ConfigError(f"`{name}` must be {annotation} (its value is not shown: it is a secret).") from None


def _checked(name: str, value, annotation, validators):
    options = _options(annotation)
    if value is None and type(None) not in options and annotation is not Any:
        raise ConfigError(f"`{name}` may not be null.")
    typed = _yaml_reading(name.rsplit(".", 1)[-1], value, options)
    if isinstance(typed, float) and not math.isfinite(typed):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}.")
    allowed = [choice for option in options for choice in (
        get_args(option) if get_origin(option) is Literal else
        [member.value for member in option] if isinstance(option, enum.EnumMeta) else [])]
    if allowed and typed not in allowed and not isinstance(typed, enum.Enum):
        raise ConfigError(f"`{name}` must be one of {allowed}, got {value!r}.{did_you_mean(typed, allowed)}")
    try:
        type_validator(name, typed, annotation)
    except TypeError:
        expected = " or ".join(getattr(option, "__name__", str(option)) for option in options)
        raise ConfigError(f"`{name}` must be {expected}, got {value!r}.") from None
    for validator in validators:
        try:
            validator(typed)
        except ValueError as cause:  # (it names the value)
            raise ConfigError(f"`{name}` {cause}.") from None
    return typed


def strict_section(cls, section: str, values):
    """`cls` (a `huggingface_hub` strict dataclass) from its YAML mapping: each value `checked` against its field, then
    the class validators. (Not by `HfArgumentParser`, which hands a field's metadata, where a validated field keeps its
    validator, to argparse.)"""
    if not isinstance(values or {}, dict):
        raise ConfigError(f"Section `{section}` must be a mapping, got {values!r}.")
    hints = get_type_hints(cls)
    typed = {}
    for key, value in (values or {}).items():
        if key not in hints:
            raise unknown_key(section, key, hints)
        typed[key] = checked(f"{section}.{key}", value, hints[key], cls.__validators__[key][1:])
    try:
        return cls(**typed)
    except StrictDataclassClassValidationError as error:
        raise ConfigError(str(error.__cause__)) from None
