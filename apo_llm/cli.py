"""One-line user errors for the command-line entry points.

A `UserError` is a mistake the user can fix (a config file, a field, a path, a data file); its
message is one line that names the file or field. The entry points print it as `error: ...` on
stderr and exit with code 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")


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
