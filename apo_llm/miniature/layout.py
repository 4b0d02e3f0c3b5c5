"""A sweep directory on disk: what lives where, written whole or not at all, and the guard that
keeps one directory to one set of settings.

    <out>/sizes.json                     the sizes that train a run (Sizes minus arms/seeds/splits)
    <out>/runs/<arm>-s<seed>/            one trainer run dir (adapter/, checkpoints/step-*, metrics.jsonl)
    <out>/runs/<arm>-s<seed>/FAILED      the first line is the error; a rerun skips it (--retry_failed)
    <out>/eval{SUFFIX}/settings.json     the evaluation settings of the split
    <out>/eval{SUFFIX}/per_problem.jsonl one line per evaluated (label, problem): the resume unit
    <out>/results{SUFFIX}.json|.md       the summary of a reported split; <out>/curves.json

SUFFIX is "" for test, "_test_hard", "_validation" (design.SUFFIX). A sweep made by an earlier
version is resumed as it is, so these names and keys are fixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .design import SUFFIX
from .stats import counts


def check_settings(path: Path, settings: dict, sweep: Path) -> None:
    """A sweep directory keeps its evaluation settings: mixing two would compare unlike numbers."""
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"out: {sweep} holds a sweep made with other settings "
                             f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())}); use another --out")
    else:
        write_atomic(path, json.dumps(settings, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Whole file or none: two sweep processes over disjoint --arms may share a directory, and a
    reader must never see a half-written settings or results file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_counts(out: Path, split: str) -> dict[str, dict[str, tuple[int, int]]]:
    from apo_llm.evaluate import PER_PROBLEM_FILE, read_records  # the evaluator owns its record format

    return counts(read_records(out / f"eval{SUFFIX[split]}" / PER_PROBLEM_FILE))


def train_steps(run_dir: Path) -> list[dict]:
    """The per-step training records of a run (metrics.jsonl lines with a reward)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "reward" in r]

