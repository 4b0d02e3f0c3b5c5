"""The command-line entry points' shared pieces: one-line user errors and the checks they share.

A `UserError` is a mistake the user can fix (a config file, a field, a path, a data file); its
message is one line that names the file or field. The entry points print it as `error: ...` on
stderr and exit with code 2, without a traceback. Anything else is a bug and keeps its traceback.
The flags themselves are parsed by apo_llm.options (one parser for every entry point).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence, TypeVar

from apo_llm.options import UserError, help_text, parse_command

T = TypeVar("T")

# The lowest sampling temperature any command accepts: logits / T with |logits| ~ 1e2 stays far
# from float32 overflow, and generation at this T is already greedy in effect. 1e-40 passed `> 0`
# and produced inf - inf = NaN in the softmax only after the model had loaded.
MIN_TEMPERATURE = 1e-3


# the one user-error class of the project (apo_llm.options); re-exported for the entry points
__all__ = ["UserError", "MIN_TEMPERATURE", "fail", "run_or_exit", "quiet_progress_unless_tty", "looks_local",
           "parse_hiding_internal", "parse_ks", "check_out_dir", "check_shared_fields", "check_model_spec",
           "world_size"]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` (one line) to stderr and exit with `code` (2: a user error)."""
    # one write of the whole line: print() writes the text and its newline separately, and two ranks
    # failing at once then interleave ("...another nameerror: ...")
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


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


def world_size() -> int:
    """Processes of this launch (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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
# Internal flags, and the checks the evaluator and Top-K coverage configs share
# --------------------------------------------------------------------------------------------


def parse_hiding_internal(cls: type[T], public: type, argv: Optional[Sequence[str]] = None, *, prog: str,
                          description: str = "") -> T:
    """options.parse_command(cls), but --help lists only the fields of `public` (a base class of
    `cls`): the subclass adds the flags a script passes to its own worker processes or that only
    the tests use, which a user is never offered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(public, prog, description))
        raise SystemExit(0)
    return parse_command(cls, argv, prog=prog, description=description)


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
