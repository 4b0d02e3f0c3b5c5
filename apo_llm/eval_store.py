"""The evaluator's output folder: per_problem.jsonl (append-only, resume key (model, problem_id))
and run_config.json (the sampling settings a resumed run must keep).

    per_problem.jsonl   one line per (model label, problem): n, c, greedy_correct, ... flushed after
                        every problem batch; a torn last line (an interrupted write) is cut off
    run_config.json     the SAMPLING_KEYS of the first run; a rerun with different ones is refused
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

PER_PROBLEM_FILE = "per_problem.jsonl"
SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "run_config.json"
PLOT_FILE = "pass_at_k.png"
BASE_LABEL = "base"
# Settings that change what a (model, problem) line means: a resumed run must keep them.
SAMPLING_KEYS = ("model", "dataset", "split", "n", "temperature", "top_p", "max_new_tokens", "seed",
                 "reward", "correct_threshold", "chat_template")

REQUIRED_KEYS = ("model", "problem_id", "n", "c")


def read_records(path: str | Path) -> list[dict]:
    """All records of per_problem.jsonl. A torn last line (an interrupted write) is dropped with a
    warning and cut from the file so appends start on a clean line; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")  # the last item is b"" when the file ends with a newline
    records, offset, good_end = [], 0, 0
    for i, line in enumerate(lines):
        next_offset = offset + len(line) + 1
        if line.strip():
            try:
                rec = json.loads(line)
                missing = [k for k in REQUIRED_KEYS if k not in rec]
                if missing:
                    raise ValueError(f"missing keys {missing}")
            except ValueError as err:
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise ValueError(f"{path}: line {i + 1} is not a valid record ({err}); fix or remove it") from None
                warnings.warn(f"{path}: ignoring a torn last line ({len(line)} bytes); its problems will be redone")
                with open(path, "r+b") as fh:
                    fh.truncate(good_end)
                return records
            records.append(rec)
            good_end = min(next_offset, len(raw))
        offset = next_offset
    if raw and not raw.endswith(b"\n"):
        with open(path, "ab") as fh:  # complete last record without its newline: close the line
            fh.write(b"\n")
    return records



def check_run_config(out_dir: Path, cfg: Any) -> None:
    """Write run_config.json on the first run; refuse a resume whose sampling settings differ."""
    mine = {key: getattr(cfg, key) for key in SAMPLING_KEYS}
    path = out_dir / RUN_CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"out: {out_dir} holds results made with other settings ({detail}); use a new --out")
    else:
        path.write_text(json.dumps(mine, indent=2) + "\n")

