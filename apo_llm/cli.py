"""The command-line entry points' shared pieces: one-line user errors, dataclass-driven flags.

A `UserError` is a mistake the user can fix (a config file, a field, a path, a data file); its
message is one line that names the file or field. The entry points print it as `error: ...` on
stderr and exit with code 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

T = TypeVar("T")

# The lowest sampling temperature any command accepts: logits / T with |logits| ~ 1e2 stays far
# from float32 overflow, and generation at this T is already greedy in effect. 1e-40 passed `> 0`
# and produced inf - inf = NaN in the softmax only after the model had loaded.
MIN_TEMPERATURE = 1e-3


class UserError(ValueError):
    """A user-fixable error; str(e) is one line naming the culprit (file or config field)."""


def fail(message: str) -> NoReturn:
    """Print `error: message` (one line) to stderr and exit with code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_or_exit(fn: Callable[[], T], catch: tuple = (UserError,)) -> T:
    """fn(), with `catch` exceptions turned into a one-line message and exit code 2."""
    try:
        return fn()
    except catch as e:
        fail(str(e))


def quiet_progress_unless_tty() -> bool:
    """Turn off the transformers / huggingface_hub progress bars when stderr is not a terminal
    (redirected logs would fill with carriage-return redraws). Returns whether stderr is a TTY."""
    tty = sys.stderr.isatty()
    if not tty:
        try:
            from huggingface_hub.utils import disable_progress_bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            disable_progress_bars()
        except ImportError:  # pragma: no cover - both ship with the project's dependencies
            pass
    return tty


def looks_local(spec: str) -> bool:
    """A path-like spec (absolute, ./ ../ ~, a backslash, more than one '/', or 'dir/x' with an existing
    ./dir): never a hub id.

    Hub ids are `name` or `org/name`; anything else that does not exist locally can fail at once
    instead of after the hub client's retries.
    """
    path = Path(spec).expanduser()
    # 'runs/x' where ./runs exists is a local path too (a hub org is rarely also a folder here)
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or path.exists()
            or ("/" in spec and path.parent.is_dir()))


# --------------------------------------------------------------------------------------------
# Dataclass-driven flags (apo_llm.evaluate, apo_llm.topk_coverage) and the checks they share
# --------------------------------------------------------------------------------------------


def cli_field(default: Any, help_: str, **meta: Any) -> Any:
    """A dataclass field with CLI help text (build_parser turns each field into one --flag)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_, **meta})
    return field(default=default, metadata={"help": help_, **meta})


def build_parser(cls: type, description: str, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per dataclass field, help text from the field metadata;
    `prog` is the command as typed (`python -m apo_llm.evaluate`), shown in the usage line."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_)
        elif "nargs" in f.metadata:
            parser.add_argument(flag, nargs=f.metadata["nargs"], default=default, help=help_)
        else:
            kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(f.type), str)
            shown = help_ if "default" in help_ else f"{help_} (default: {default})"
            parser.add_argument(flag, type=kind, default=default, help=shown)
    return parser


def parse_ks(spec: str | Sequence[int]) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (sorted, unique); every k must be an integer >= 1."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    ks = []
    for item in items:
        try:
            k = int(str(item).strip())
        except ValueError:
            raise ValueError(f"k: {item!r} is not an integer (expected e.g. '1,4,16')") from None
        if k < 1:
            raise ValueError(f"k: every k must be >= 1, got {k}")
        ks.append(k)
    if not ks:
        raise ValueError("k: give at least one k")
    return sorted(set(ks))


def check_out_dir(out: str) -> None:
    """--out must be a directory (or not exist yet): checked before any compute."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"out: {out!r} is an existing file, not a directory")


def check_shared_fields(cfg) -> None:
    """The checks the evaluator and the Top-K coverage configs share (limit, threads, chat_template, out)."""
    check_out_dir(cfg.out)
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"limit: must be >= 1 when given, got {cfg.limit}")
    if cfg.threads < 0:
        raise ValueError(f"threads: must be >= 0, got {cfg.threads}")
    if cfg.chat_template not in ("auto", "on", "off"):
        raise ValueError(f"chat_template: must be auto, on or off, got {cfg.chat_template!r}")


def check_model_spec(spec: Optional[str]) -> None:
    """A --model that is neither a local directory nor (with the hub reachable) a hub id: ValueError now."""
    if spec is None or Path(spec).expanduser().is_dir():
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if looks_local(spec) or offline or re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", spec) is None:
        raise ValueError(f"model: {spec!r} is not a local model directory"
                         + (" (and HF_HUB_OFFLINE is set, so it cannot be a hub id)" if offline else ""))
