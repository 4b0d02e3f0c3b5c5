"""The one command-line parser of the project: typed dataclasses in, flags and YAML files out.

Every entry point (`python -m apo_llm.train`, `apo_llm.evaluate`, `apo_toy.run`, the miniature,
`paper_figures`, the benchmarks) declares what it takes as a dataclass whose fields carry their help
text (`option(default, help)`) and calls `parse_command`. The flag style is the same everywhere:

    --field VALUE  |  --field=VALUE          a top-level field (`--batch_size 64`)
    --section.field VALUE                    a field of a nested dataclass section (`--train.lr 2e-5`)
    --flag                                   a bare boolean field means true (`--quick`)
    --items a b c  |  --items a,b,c          a list field takes the tokens up to the next flag
    --config FILE.yaml                       defaults < the file (and its `base:` chain) < flags

Flag names are the field names, underscores and all, as in the YAML files and in TRL's
HfArgumentParser; a dash spelling (`--batch-size`) is accepted for one release with a deprecation
line. Every mistake raises `UserError` with one line that names the flag or field; the entry points
print it as `error: ...` and exit with code 2. Why home-made rather than a library: docs/architecture.md.

Only the standard library and PyYAML are imported here, so `apo_toy` (which must not import
transformers, peft or datasets) parses its command line with it too.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class UserError(ValueError):
    """A user-fixable error; str(e) is one line naming the culprit (file, flag or config field)."""


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text (shown by --help). `meta`: `choices` (a str field's
    allowed values), `allow_inf` (+-inf is a meaningful setting, refused elsewhere like NaN)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def hints_of(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --------------------------------------------------------------------------------------------
# One value: a YAML value or a command-line string -> the field's type
# --------------------------------------------------------------------------------------------


def convert(key: str, value: Any, hint: Any, meta: Optional[dict] = None) -> Any:
    """Coerce `value` to the type `hint` of field `key`; UserError names the key."""
    meta = meta or {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        return convert(key, value, [a for a in args if a is not type(None)][0], meta)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: choose from {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is bool:
        return _to_bool(key, value)
    if hint is int:
        return _to_int(key, value)
    if hint is float:
        return _to_float(key, value, meta.get("allow_inf", False))
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{key}: expected a string, got {value!r}")
        out = str(value)
        if "choices" in meta and out not in meta["choices"]:
            raise UserError(f"{key}: choose from {', '.join(meta['choices'])}, got {out!r}")
        return out
    if hint is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        item_meta = {"choices": meta["choices"]} if "choices" in meta else {}
        return [convert(f"{key}[{i}]", v, args[0], item_meta) for i, v in enumerate(value)] if args else list(value)
    return value


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise UserError(f"{key}: expected a boolean (true/false), got {value!r}")


def _to_int(key: str, value: Any) -> int:
    if not isinstance(value, bool):
        try:
            f = float(value) if isinstance(value, str) else value
            if isinstance(f, float) and f.is_integer():
                return int(f)
            if isinstance(f, int):
                return f
        except (TypeError, ValueError):
            pass
    raise UserError(f"{key}: expected an integer, got {value!r}")


def _to_float(key: str, value: Any, allow_inf: bool) -> float:
    if isinstance(value, bool):
        raise UserError(f"{key}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}: expected a number, got {value!r}") from None
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        # a NaN compares False everywhere and would disable range checks
        raise UserError(f"{key}: expected a finite number, got {value!r}")
    return out


# --------------------------------------------------------------------------------------------
# A whole dataclass from a nested mapping {field: value, section: {field: value}}
# --------------------------------------------------------------------------------------------


def build(cls: type[T], raw: dict, prefix: str = "") -> T:
    """An instance of `cls` from a nested mapping; unknown keys and ill-typed values are one-line
    UserErrors naming `section.field`. A nested dataclass's own ValueError (its __post_init__
    checks) is re-raised as a UserError with its class name replaced by the section name."""
    hints = hints_of(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in hints:
            what = "config section" if prefix == "" and _has_sections(cls) else "field"
            why = " (YAML reads an unquoted on/off/yes/no key as a boolean: quote it)" if isinstance(key, bool) else ""
            raise UserError(f"{name}: unknown {what}{why}; choose from {sorted(hints)}")
        if is_section(hints[key]):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{name}: expected a mapping of fields, got {value!r}")
            kwargs[key] = build(hints[key], value, f"{name}.")
        else:
            kwargs[key] = convert(name, value, hints[key], dict(fields[key].metadata))
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except ValueError as e:  # "LossConfig.kl_coef=...": name it as the config key
        raise UserError(str(e).replace(f"{cls.__name__}.", prefix, 1) if prefix else str(e)) from None


def _has_sections(cls: type) -> bool:
    return any(is_section(h) for h in hints_of(cls).values())


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a section's fields one by one; lists whole)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# YAML files with `base:` chains
# --------------------------------------------------------------------------------------------


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, with its `base: other.yaml` (relative to the file) merged under it;
    bases may chain; a cycle, or a base that is not a mapping, is a one-line error naming the files."""
    p = Path(path)
    data = _read_yaml(p)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise UserError(f"config: {p}: base must be a path to another YAML file, got {base!r}")
    base_path = (p.parent / base).resolve()
    chain = _chain + (p.resolve(),)
    if base_path in chain:
        raise UserError(f"config: {p}: base cycle " + " -> ".join(str(x) for x in chain + (base_path,)))
    if not base_path.is_file():
        raise UserError(f"config: {p}: base file not found: {base_path}")
    return merge(load_yaml(base_path, chain), data)


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise UserError(f"config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"config: {p}:{where}: YAML syntax error ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config: cannot read {p} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {p} must hold a mapping")
    return data


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def flag_kinds(cls: type, prefix: str = "") -> dict[str, Any]:
    """{'section.field' or 'field': its type hint} for every leaf field of `cls`."""
    out = {}
    for name, hint in hints_of(cls).items():
        if is_section(hint):
            out.update(flag_kinds(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


def _is_list(hint: Any) -> bool:
    hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
        if typing.get_origin(hint) in (Union, types.UnionType) else hint
    return hint is list or typing.get_origin(hint) is list


def parse_argv(cls: type, argv: Sequence[str], aliases: Optional[dict[str, str]] = None,
               warn=None) -> tuple[Optional[str], dict, bool]:
    """(config path, nested {field: raw value}, help requested?) from argv; nothing is converted yet."""
    kinds, aliases = flag_kinds(cls), dict(aliases or {})
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    sectioned = _has_sections(cls)
    config_path, raw, i, argv = None, {}, 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return config_path, raw, True
        if not arg.startswith("--"):
            hint = "--section.field VALUE" if sectioned else "--field VALUE"
            raise UserError(f"{arg}: unexpected argument; use --config FILE or {hint}")
        key, eq, val = arg[2:].partition("=")
        key = _canonical(key, kinds, aliases, sectioned, warn)
        i += 1
        values = [val] if eq else []
        if not eq:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
                if key == "config" or not _is_list(kinds.get(key)):
                    break
        if key == "config":
            if not values:
                raise UserError("config: missing value")
            config_path = values[0]
            continue
        if not values and kinds[key] is bool:
            values = ["true"]
        elif not values and not _is_list(kinds[key]):
            raise UserError(f"{key}: missing value")
        # a list takes every token given (one token may itself be "a,b" or "[a, b]"); a scalar its one
        _put(raw, key, (values[0] if len(values) == 1 else values) if _is_list(kinds[key]) else values[0])
    return config_path, raw, False


def _canonical(key: str, kinds: dict, aliases: dict, sectioned: bool, warn) -> str:
    """The field a flag names: itself, an alias, or (deprecated) its dash spelling."""
    if key == "config" or key in kinds:
        return key
    if key in aliases:
        return aliases[key]
    under = key.replace("-", "_")
    if under in kinds or under in aliases:
        warn(f"warning: --{key} is deprecated; use --{under} (the dash spelling goes in the next release)")
        return aliases.get(under, under)
    section, dot, name = key.partition(".")
    if sectioned and not dot:
        raise UserError(f"{key}: expected --section.field (sections: {sorted({k.split('.')[0] for k in kinds})})")
    if sectioned and not any(k.startswith(section + ".") for k in kinds):
        raise UserError(f"{section}: unknown config section (command line); choose from "
                        f"{sorted({k.split('.')[0] for k in kinds if '.' in k})}")
    known = sorted(k.split(".", 1)[1] for k in kinds if k.startswith(section + ".")) if dot else sorted(kinds)
    raise UserError(f"{key}: unknown {'field' if dot else 'option'}; choose from {known}")


def _put(raw: dict, key: str, value: Any) -> None:
    *sections, name = key.split(".")
    for s in sections:
        raw = raw.setdefault(s, {})
    raw[name] = value


def parse_command(cls: type[T], argv: Optional[Sequence[str]] = None, *, prog: str, description: str = "",
                  aliases: Optional[dict[str, str]] = None, config_path: Optional[str] = None) -> T:
    """An instance of `cls` from the command line: its defaults < YAML (`--config` or `config_path`) <
    flags. `-h/--help` prints `help_text` and exits 0; mistakes raise UserError."""
    path, raw, want_help = parse_argv(cls, sys.argv[1:] if argv is None else argv, aliases)
    if want_help:
        print(help_text(cls, prog, description, aliases))
        raise SystemExit(0)
    path = path or config_path
    merged = merge(load_yaml(path) if path else {}, raw)
    return build(cls, merged)


def help_text(cls: type, prog: str, description: str = "", aliases: Optional[dict[str, str]] = None,
              overrides: Optional[dict[str, str]] = None) -> str:
    """The --help page: one line per flag with its default and help text, grouped by section."""
    sectioned = _has_sections(cls)
    shape = "--section.field VALUE" if sectioned else "--field VALUE"
    lines = [f"usage: {prog} [--config FILE.yaml] [{shape} ...]"]
    if description:
        lines += ["", description]
    lines += ["", "Precedence: defaults < YAML < command line. Fields:"]
    if aliases:
        lines.append("Short forms: " + ", ".join(f"--{a} = --{t}" for a, t in aliases.items()))
    default = cls()
    for name, hint in hints_of(cls).items():
        if is_section(hint):
            lines.append(f"\n[{name}]")
            lines += _help_lines(getattr(default, name), f"{name}.", overrides or {})
    flat = [f for f in dataclasses.fields(cls) if not is_section(hints_of(cls)[f.name])]
    if flat:
        lines += [""] + _help_lines(default, "", overrides or {}, flat)
    return "\n".join(lines)


def _help_lines(obj: Any, prefix: str, overrides: dict, fields=None) -> list[str]:
    out = []
    for f in fields or dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        text = overrides.get(key, f.metadata.get("help", ""))
        out.append(f"  --{key} (default {getattr(obj, f.name)!r}): {text}")
    return out
