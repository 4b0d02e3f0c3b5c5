"""Preemption: SIGTERM (what SLURM and Kubernetes send) and SIGINT (Ctrl-C) end a run cleanly.

The first signal only sets a flag (`Preemption.requested`); the training loop of either engine
looks at it between steps, so the step under way is finished, a checkpoint of the last completed
step is written when it is newer than the newest one, one line says what was saved and how to
resume, and the process exits with the conventional code 128 + signal number (143 for SIGTERM,
130 for SIGINT). A second signal exits at once with the same code (the newest checkpoint on disk
stays valid: checkpoints are written atomically).

Requeue: the resume command is the job's own command with `--resume auto`, which also starts
afresh when no checkpoint exists yet (train.prepare_run_dir), so a scheduler can requeue the same
command line whatever moment the job was stopped at.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from typing import Optional, Sequence

from apo_llm.cli import world_size

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Context manager installing the SIGTERM / SIGINT handlers (main thread only) for its block."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            print(f"error: second {signal.Signals(signum).name}: exiting now (the newest checkpoint on disk is "
                  f"intact)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"received {self.name}: finishing the current step, then saving a checkpoint and exiting "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def exit(self, what: str, command: str) -> None:
        """Print the one line (`what` was saved; how to resume) and exit with 128 + signum."""
        print(f"preempted by {self.name}: {what}; resume with: {command}", file=sys.stderr, flush=True)
        raise SystemExit(self.exit_code)


def resume_command(argv: Optional[Sequence[str]] = None, module: str = "apo_llm.train") -> str:
    """This job's command line with `--resume auto` (any other resume / overwrite flag dropped)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(args):
        key = args[i].split("=", 1)[0]
        if key in ("--resume", "--checkpoint.resume", "--logging.overwrite"):
            takes_value = "=" not in args[i] and i + 1 < len(args) and not args[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        out.append(args[i])
        i += 1
    launcher = "python" if world_size() == 1 else "<the same launcher>"
    return f"{launcher} -m {module} " + " ".join(shlex.quote(a) for a in out + ["--resume", "auto"])
