"""One configuration system: a dataclass per command, overridable from YAML and the command line.

Every field becomes a flag (`--batch-size 32`), documented by its `help` metadata; `--config
FILE.yaml` sets values first, flags win. Unknown flags, unknown YAML keys and values of the wrong
type are errors that name the option.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def field(default, help: str, choices: Sequence[Any] | None = None, **kw):  # noqa: A002
    """A dataclass field with its command-line help (and optional choices)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _converter(tp):
    origin = typing.get_origin(tp)
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if origin in (list, tuple):
        (inner,) = set(typing.get_args(tp)) - {Ellipsis}
        conv = _converter(inner)
        return lambda s: [conv(v) for v in str(s).split(",") if v != ""]
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        conv = _converter(inner)
        return lambda s: None if str(s).lower() in ("none", "") else conv(s)
    raise TypeError(f"unsupported config field type {tp}")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(_flag(f.name), dest=f.name, type=_converter(hints[f.name]),
                            default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                            metavar=None if f.metadata.get("choices") else f.name.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {default})")
    parser.add_argument("--config", dest="_config", default=None, metavar="FILE.yaml",
                        help="YAML file of option values; command-line flags override it")


def from_namespace(cls: type[T], ns: argparse.Namespace, parser: argparse.ArgumentParser) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    values: dict[str, Any] = {}
    path = getattr(ns, "_config", None)
    if path:
        import yaml
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            parser.error(f"--config: cannot read {path}: {e.strerror}")
        except yaml.YAMLError as e:
            parser.error(f"--config: {path} is not valid YAML: {' '.join(str(e).split())}")
        if not isinstance(loaded, dict):
            parser.error(f"--config: {path} must hold a mapping of option: value")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in names:
                parser.error(f"--config: unknown option {key!r} in {path}")
            # Through the flag's own parser, as text: `epochs: 2.5`, `epochs: true` or an empty
            # `epochs:` is an error, as `--epochs 2.5` is, not a silent int(2.5), True or None.
            if isinstance(value, (list, tuple)):
                text = ",".join(map(str, value))
            else:
                text = "" if value is None else str(value)
            try:
                value = _converter(hints[name])(text)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                parser.error(f"--config: bad value for {key!r}: {e}")
            choices = fields[name].metadata.get("choices")
            if choices and value not in choices:
                parser.error(f"--config: {key!r} must be one of {list(choices)}, got {value!r}")
            values[name] = value
    values.update({k: v for k, v in vars(ns).items() if k in names})
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate:
        try:
            validate()
        except ValueError as e:
            parser.error(str(e))
    return cfg


def parse(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__)
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv), parser)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def require(condition: bool, message: str) -> None:
    """For validate() methods: a ValueError that the parser reports as a usage error."""
    if not condition:
        raise ValueError(message)
