"""One configuration system: a dataclass per command, overridable from YAML and the command line.

Every field becomes a flag (`--batch-size 32`), documented by its `help` metadata; `--config
FILE.yaml` sets values first, flags win; a YAML file may extend another (`base: other.yaml`, a path
relative to the file: its keys override the base's). Unknown flags, unknown YAML keys and values of the wrong
type are errors that name the option, in one line (exit status 2). A bool field is a switch in every
spelling (`--resume`, `--resume false`, `--no-resume`); --help lists the fields by topic
(HELP_GROUPS). `--print-config` prints the resolved options as YAML and exits 0 (every command:
they all parse here).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")


def field(default, help: str, choices: Sequence[Any] | None = None, **kw):  # noqa: A002
    """A dataclass field with its command-line help (and optional choices)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


AUTO = "auto"
# A switch with a third value: `--resume auto` decides at run time (resume when there is a checkpoint).
BoolOrAuto = typing.Union[bool, typing.Literal["auto"]]
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parse_bool_or_auto(text: str):
    if str(text).lower() == AUTO:
        return AUTO
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}") from None


def _converter(tp):
    origin = typing.get_origin(tp)
    if tp is bool:
        return _parse_bool
    if tp == BoolOrAuto:
        return _parse_bool_or_auto
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


class BoolAction(argparse.Action):
    """A switch in every spelling: `--resume` (bare: true), `--resume true|false` (and yes/no,
    on/off, 1/0; `auto` where the option has it) and `--no-resume`."""

    def __init__(self, option_strings, dest, with_auto: bool = False, **kw):
        kw["type"] = _parse_bool_or_auto if with_auto else _parse_bool
        super().__init__(option_strings, dest, nargs="?", **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value (alone it means {self.option_strings[0]} false)")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


def add_bool_argument(parser, name: str, default, help: str, with_auto: bool = False,  # noqa: A002
                      dest: Optional[str] = None) -> None:
    """--NAME [true|false] and --no-NAME (see BoolAction); name with underscores or dashes."""
    flag = _flag(name.replace("-", "_"))
    parser.add_argument(flag, "--no-" + flag[2:], dest=dest or name.replace("-", "_"), action=BoolAction,
                        with_auto=with_auto, default=default, help=help,
                        metavar="true|false|auto" if with_auto else "true|false")


class SwitchHelpFormatter(argparse.HelpFormatter):
    """A switch reads `--resume [true|false], --no-resume` in --help, not its metavar twice."""

    def _format_action_invocation(self, action):
        if isinstance(action, BoolAction):
            return f"{action.option_strings[0]} [{action.metavar}], {action.option_strings[1]}"
        return super()._format_action_invocation(action)


class HelpFormatter(SwitchHelpFormatter):
    """--help of a command with dozens of options: a one-line usage, then the options by topic."""

    def _format_usage(self, usage, actions, groups, prefix):
        # The usage line names the command and points to --help (the options fill a page below).
        return f"{prefix or 'usage: '}{self._prog} [OPTIONS]\n\n"


# --help lists the options by topic, in this order. A field not named here is listed under "other".
HELP_GROUPS = {
    "data": ("dataset", "data_path", "workers", "fewshot", "partition", "channel_order", "relabel_subset",
             "augment", "randaugment", "color_jitter", "crop_scale", "erase_prob", "mixup_alpha", "mixup_prob",
             "n_local", "local_landmarks", "shuffle", "perturb_std", "photometric", "landmark_source", "seed",
             "checkpoint", "landmark_cnn", "bins", "orl", "folds"),
    "model": ("model", "landmarks", "init", "landmark_init", "weight_init", "num_classes", "loss", "scale",
              "margin", "out_dim", "head_hidden", "head_bottleneck", "student_temp"),
    "optimisation": ("batch_size", "pretrain_batch_size", "lr", "weight_decay", "cnn_weight_decay",
                     "cnn_head_weight_decay", "layer_decay", "cnn_lr_scale", "clip_grad", "clip_mode",
                     "decay_tokens", "accum_steps", "accum_across_epochs", "lr_rule", "drift_lambdas"),
    "schedule": ("epochs", "supervised_epochs", "pretrain_epochs", "finetune_epochs", "warmup_epochs", "min_lr",
                 "weight_decay_end", "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                 "warmup_teacher_temp_epochs", "freeze_last_layer", "drift_epochs", "stop_after"),
    "checkpoints and logging": ("out_dir", "resume", "overwrite", "keep_checkpoints", "save_every", "log_every",
                                "progress", "tensorboard", "eval", "val_bins", "val_every"),
    "distributed": ("dist_timeout", "partial_fc", "sample_rate"),
    "speed": ("device", "amp", "threads", "backend", "fast_dropout", "deterministic"),
}


def help_group(name: str) -> str:
    for group, names in HELP_GROUPS.items():
        if name in names:
            return group
    return "other"


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per field of cls, in --help under its topic (HELP_GROUPS), and --config / --print-config."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    topics = [g for g in [*HELP_GROUPS, "other"] if any(help_group(f.name) == g for f in fields)]
    groups = {g: parser.add_argument_group(g) for g in topics}
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group, text = groups[help_group(f.name)], f.metadata.get('help', '')
        if "(default:" not in text:  # a help that explains its default says it once
            text += f" (default: {default})"
        if hints[f.name] in (bool, BoolOrAuto):
            add_bool_argument(group, f.name, argparse.SUPPRESS, text, with_auto=hints[f.name] == BoolOrAuto)
            continue
        group.add_argument(_flag(f.name), dest=f.name, type=_converter(hints[f.name]),
                           default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                           metavar=None if f.metadata.get("choices") else f.name.upper(), help=text)
    parser.add_argument("--config", dest="_config", default=None, metavar="FILE.yaml",
                        help="YAML file of option values; command-line flags override it")
    parser.add_argument("--print-config", dest="_print_config", action="store_true",
                        help="print every option as resolved (defaults < --config file < flags) as "
                             "YAML that --config reads back, and exit 0 without running")


BASE_KEY = "base"


class ConfigFileError(ValueError):
    """A --config file (or a base it names) that cannot be read, parsed or resolved."""


@dataclasses.dataclass
class ConfigFile:
    """A --config file resolved through its bases. values: option name (underscores) -> value;
    source: option name -> (the file that set it, the key as written there); files: the chain,
    the deepest base first."""
    values: dict
    source: dict
    files: list


def _merge(base: dict, override: dict) -> dict:
    """base's keys overridden by override's; mappings in both merge key by key."""
    out = dict(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_mappings else value
    return out


def _read_mapping(path: str) -> dict:
    import yaml
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ConfigFileError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigFileError(f"{path} must hold a mapping of option: value")
    return loaded


def load_config_file(path: str, _chain: tuple = ()) -> ConfigFile:
    """A --config file's options: its keys over those of the file its `base:` key names (a path
    relative to the file; a base may have its own), mappings merged key by key; `batch-size` and
    `batch_size` are one option. A missing base or a cycle of bases is a ConfigFileError."""
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join([*_chain[_chain.index(real):], real])
        raise ConfigFileError(f"the base files of {path} form a cycle: {cycle}")
    raw = _read_mapping(path)
    has_base, base = BASE_KEY in raw, raw.pop(BASE_KEY, None)
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    source = {str(k).replace("-", "_"): (path, str(k)) for k in raw}
    if not has_base:
        return ConfigFile(values, source, [path])
    if not isinstance(base, str) or not base.strip():
        raise ConfigFileError(f"{path}: 'base' must name a YAML file (relative to {path}), got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise ConfigFileError(f"{path}: its base {base!r} does not exist (looked for {base_path}: a base "
                              "path is relative to the file that names it)")
    parent = load_config_file(base_path, (*_chain, real))
    return ConfigFile(_merge(parent.values, values), {**parent.source, **source}, parent.files + [path])


def _config_values(cls, path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options a --config file (through its bases) sets, each through its flag's parser."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    try:
        loaded = load_config_file(path)
    except ConfigFileError as e:
        parser.error(f"--config: {e}")
    values: dict[str, Any] = {}
    for name, value in loaded.values.items():
        where, key = loaded.source[name]
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            parser.error(f"--config: unknown option {key!r} in {where}{hint}")
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
    return values


def from_namespace(cls: type[T], ns: argparse.Namespace, parser: argparse.ArgumentParser,
                   validate: bool = True) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    path = getattr(ns, "_config", None)
    values = _config_values(cls, path, parser) if path else {}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if validate and check:
        try:
            check()
        except ValueError as e:
            parser.error(str(e))
    return cfg


def build_parser(cls, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    from .cli import ArgumentParser
    parser = ArgumentParser(prog=prog, description=description or cls.__doc__, formatter_class=HelpFormatter)
    add_arguments(parser, cls)
    return parser


def parse(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    """The options of a command: defaults < --config file < flags, validated. A bad option is one
    line on stderr and exit status 2 (cli.ArgumentParser); --print-config prints and exits 0. The
    command line is kept on the result (command_line), for messages that tell how to run it again."""
    parser = build_parser(cls, prog, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    if getattr(ns, "_print_config", False):
        print_config(from_namespace(cls, ns, parser, validate=False), ns, prog or parser.prog)
        sys.exit(0)
    cfg = from_namespace(cls, ns, parser)
    set_command_line(cfg, parser.prog, argv)
    return cfg


def set_command_line(cfg, prog: str, argv: Sequence[str]) -> None:
    """Remember the command that made cfg (not an option: dataclasses.asdict leaves it out)."""
    cfg.__dict__["command_line"] = (prog, list(argv))


def command_with(cfg, *flags: str, drop: Sequence[str] = ()) -> Optional[str]:
    """The command line that made cfg with the options in `drop` (and their values) removed and
    `flags` added, quoted for a shell; None when cfg was not made by parse."""
    import shlex
    made = cfg.__dict__.get("command_line")
    if made is None:
        return None
    prog, argv = made
    names = {_flag(d) for d in drop} | {"--no-" + _flag(d)[2:] for d in drop}
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            if arg.lower() in TRUE_WORDS + FALSE_WORDS + (AUTO,):
                continue
        if arg.split("=", 1)[0] in names:
            skip_value = "=" not in arg and not arg.startswith("--no-")
            continue
        kept.append(arg)
    return shlex.join([*prog.split(), *kept, *flags])


def _sources(cfg, ns: argparse.Namespace) -> dict[str, str]:
    """Where each non-default value came from: "flag" or the --config file that set it."""
    out = {}
    flags = {k for k in vars(ns) if not k.startswith("_")}
    path = getattr(ns, "_config", None)
    source = load_config_file(path).source if path else {}
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in flags:
            out[f.name] = "flag"
        elif getattr(cfg, f.name) != default:
            out[f.name] = "from " + source.get(f.name, (path, None))[0]
    return out


def format_config(cfg, ns: argparse.Namespace | None = None, prog: str = "") -> str:
    """The options as YAML, one `key: value` line each, in the dataclass's order; a comment marks
    values that differ from the default (set by a --config file, or a base it names, or a flag)."""
    import yaml
    path = getattr(ns, "_config", None) if ns is not None else None
    files = " < ".join(load_config_file(path).files) if path else "no --config file"
    lines = [f"# {prog}: resolved options (defaults < {files} < flags)"]
    sources = _sources(cfg, ns) if ns is not None else {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, (list, tuple, dict)):  # one line: [a, b]
            line = f"{key}: " + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        else:
            line = yaml.safe_dump({key: value}, default_flow_style=False, width=10**6).rstrip("\n")
        src = sources.get(key)
        if src:
            line += "  # " + src
        lines.append(line)
    derived = getattr(cfg, "derived", None)  # values the options imply, for a reader (comments)
    if derived:
        lines += ["# " + d for d in derived()]
    return "\n".join(lines) + "\n"


def print_config(cfg, ns: argparse.Namespace | None = None, prog: str = "") -> None:
    """--print-config: the YAML on stdout. A config that would not run here (a missing data or
    checkpoint path, say: recipes name cluster paths) is still printed, with the reason on stderr."""
    sys.stdout.write(format_config(cfg, ns, prog))
    sys.stdout.flush()
    check = getattr(cfg, "validate", None)
    if check:
        try:
            check()
        except ValueError as e:
            print(f"# note: not runnable as is: {e}", file=sys.stderr)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def require(condition: bool, message: str) -> None:
    """For validate() methods: a ValueError that the parser reports as a usage error."""
    if not condition:
        raise ValueError(message)
