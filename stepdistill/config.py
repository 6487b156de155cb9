"""One config system for every recipe: a typed dataclass is the schema, the CLI and YAML fill it.

Each field becomes ``--field_name``: a boolean one also takes the bare form (``--use_lora`` for
``--use_lora true``), a tuple is comma-separated (``--steps 1,2,4``) unless declared
``one_per_argument`` (prompts: ``--validation_prompts "a cat, sitting" "a dog"``). The field's
``help`` metadata is its help text, and its declared range (``field(1, "...", at_least=1)``, ``greater_than``,
``below``, ``choices``) is shown there and checked by :func:`check_ranges` before ``validate()``.
``--config run.yaml`` (or the name of a preset) loads values first and flags given on the command
line override them. Unknown flags and unknown YAML keys are errors, and ``validate()`` on the
dataclass (when it has one) runs before any model is loaded, so a bad value fails in the first
second with a message that names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message says what to change."""


def field(
    default: Any, help: str, *, at_least: float | None = None, greater_than: float | None = None,
    below: float | None = None, choices: tuple | None = None, aliases: tuple[str, ...] = (),
    one_per_argument: bool = False, **kwargs: Any,
) -> Any:
    """A dataclass field with its help text and its allowed values (both shown by ``--help``): ``x ≥ at_least``,
    ``x > greater_than``, ``x < below``, ``x in choices`` (``None`` passes every range of an optional field);
    ``aliases`` are other flag names for it (``("num_samples",)`` → ``--num_samples``); a tuple field with
    ``one_per_argument`` takes each value as its own argument instead of comma-separated (prompts)."""
    rules = {key: value for key, value in (("at_least", at_least), ("greater_than", greater_than), ("below", below),
                                           ("choices", choices)) if value is not None}
    metadata = {"help": help, "rules": rules, "aliases": aliases, "one_per_argument": one_per_argument}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _rules_text(rules: dict) -> str:
    parts = []
    if "at_least" in rules and "below" in rules:
        parts.append(f"in [{rules['at_least']}, {rules['below']})")
    elif "at_least" in rules:
        parts.append(f"≥ {rules['at_least']}")
    if "greater_than" in rules:
        parts.append(f"> {rules['greater_than']}")
    if "below" in rules and "at_least" not in rules:
        parts.append(f"< {rules['below']}")
    if "choices" in rules:
        parts.append("one of " + ", ".join(str(c) for c in rules["choices"]))
    return " and ".join(parts)


def check_ranges(config: Any) -> None:
    """Raise :class:`ConfigError` naming the first flag whose value breaks its declared range."""
    for f in dataclasses.fields(config):
        rules, value = f.metadata.get("rules", {}), getattr(config, f.name)
        if value is None or not rules:
            continue
        values = value if isinstance(value, tuple) else (value,)
        broken = any(
            ("at_least" in rules and v < rules["at_least"]) or ("greater_than" in rules and not v > rules["greater_than"])
            or ("below" in rules and not v < rules["below"]) or ("choices" in rules and v not in rules["choices"])
            for v in values
        )
        if broken:
            shown = repr(value) if isinstance(value, str) else value
            raise ConfigError(f"--{f.name} must be {_rules_text(rules)} (got {shown})")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The type behind an annotation (a scalar or ``tuple[scalar, ...]``) and whether ``None`` is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation}")
        return _base_type(args[0])[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (got {text!r})")


def _element_type(kind: Any) -> type | None:
    """``int`` for ``tuple[int, ...]``; ``None`` for a scalar type."""
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0]
    return None


def _converter(kind: Any, optional: bool):
    element = _element_type(kind)
    scalar = _parse_bool if (element or kind) is bool else (element or kind)

    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if element is not None:
            return tuple(scalar(part) for part in text.split(",") if part.strip())
        return scalar(text)

    return convert


def _arity(kind: Any, one_per_argument: bool) -> dict:
    """argparse's ``nargs`` for a field: a bare boolean flag means true, a ``one_per_argument`` tuple takes
    one value per argument, everything else one (comma-separated for a tuple)."""
    if kind is bool:
        return {"nargs": "?", "const": True}
    if one_per_argument:
        return {"nargs": "+"}
    return {}


def _help_text(metadata: dict, default: Any) -> str:
    """A flag's help, its default (unless the help already says it in words) and its allowed range."""
    text, rules = metadata.get("help", ""), metadata.get("rules")
    notes = ([] if "(default:" in text else [f"default: {default}"]) + ([_rules_text(rules)] if rules else [])
    return f"{text} ({'; '.join(notes)})" if notes else text


def _type_name(kind: Any, one_per_argument: bool) -> str:
    element = _element_type(kind)
    if one_per_argument:
        return element.__name__.upper()
    return f"{element.__name__.upper()},..." if element else kind.__name__.upper()


def _coerce(name: str, kind: Any, optional: bool, value: Any) -> Any:
    """Check a YAML value against the field's type (ints are accepted where floats are expected)."""
    if value is None and optional:
        return None
    element = _element_type(kind)
    if element is not None:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} must be a list of {element.__name__} (got {value!r})")
        return tuple(_coerce(name, element, False, item) for item in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads exponents without a dot, such as ``1e-4``, as strings.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key {name!r} must be float (got {value!r})") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {name!r} must be {kind.__name__} (got {value!r})")
    return value


def parse(
    config_cls: type[C], argv: list[str] | None = None, prog: str | None = None,
    presets: dict[str, Path] | None = None,
) -> C:
    """Build ``config_cls`` from ``--config`` YAML and command-line flags, then validate it.
    ``--config`` takes a YAML file or the name of one of ``presets`` (``--config dmd2_4step``)."""
    hints = typing.get_type_hints(config_cls)
    parser = argparse.ArgumentParser(prog=prog, description=config_cls.__doc__, allow_abbrev=False)
    presets = presets or {}
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of field values" + (f", or a preset: {', '.join(sorted(presets))}" if presets
                                                            else "") + "; flags override it")
    for f in dataclasses.fields(config_cls):
        kind, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        one_per_argument = f.metadata.get("one_per_argument", False)
        parser.add_argument(
            f"--{f.name}", *(f"--{alias}" for alias in f.metadata.get("aliases", ())),
            dest=f.name,
            type=_element_type(kind) if one_per_argument else _converter(kind, optional),
            **_arity(kind, one_per_argument),
            default=argparse.SUPPRESS,
            metavar=_type_name(kind, one_per_argument),
            help=_help_text(f.metadata, default),
        )
    args = {name: tuple(value) if isinstance(value, list) else value
            for name, value in vars(parser.parse_args(sys.argv[1:] if argv is None else argv)).items()}
    values: dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path is not None:
        if not config_path.is_file() and str(config_path) in presets:
            config_path = presets[str(config_path)]
        values.update(_load_yaml(config_path, config_cls, hints, presets))
    values.update(args)
    try:
        config = config_cls(**values)
        check_ranges(config)
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    return config


def _load_yaml(path: Path, config_cls: type, hints: dict[str, Any], presets: dict[str, Path]) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"error: --config {path} does not exist" + (
            f" and is not a preset ({', '.join(sorted(presets))})" if presets else ""))
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: --config {path} is not readable YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of field names to values")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise SystemExit(f"error: --config {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    try:
        return {name: _coerce(name, *_base_type(hints[name]), value) for name, value in loaded.items()}
    except ConfigError as error:
        raise SystemExit(f"error: --config {path}: {error}") from None


def require_writable_dir(path: str | Path, flag: str) -> None:
    """Fail unless ``path`` is a directory we can write, or could be created as one (nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable; give a directory you can write to")


def as_json(config: Any) -> dict[str, Any]:
    """The config as :func:`save` writes it and ``json`` reads it back (tuples as lists, paths as text)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def save(config: Any, path: str | Path) -> None:
    """Write the resolved config as JSON beside the run's outputs."""
    Path(path).write_text(json.dumps(as_json(config), indent=2) + "\n")
