"""Selection: the one rule that picks a run's stopping step and each group's arm for more seeds.

It reads the validation split only, and every arm, GRPO (the null) included, goes through it:
`select_best` accepts nothing but `ValidationScores`, which only `validation_scores` builds, from
the validation split's (n, c) records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .design import VALIDATION, Sizes, eval_steps, label_of, run_name
from .layout import split_counts
from .stats import passk_curve


@dataclass(frozen=True)
class ValidationScores:
    """Validation pass@1 per candidate (a step of one run, or an arm of a group): all that selection
    sees. Built only by `validation_scores` from the validation split's (n, c) records."""

    scores: dict  # candidate -> validation pass@1, in candidate order (earlier steps first)
    split: str = VALIDATION


def select_best(val: ValidationScores) -> Any:
    """THE selection rule: the candidate with the highest validation pass@1; a tie goes to the first
    (the earlier step, the arm listed first). It refuses anything but validation scores."""
    if not isinstance(val, ValidationScores) or val.split != VALIDATION:
        raise ValueError(f"selection: reads the {VALIDATION!r} split only, got {getattr(val, 'split', val)!r}")
    if not val.scores:
        raise ValueError("selection: no candidate has validation scores")
    best = None
    for cand, score in val.scores.items():
        if best is None or score > val.scores[best]:
            best = cand
    return best


def validation_scores(val_counts: dict, scores_of: dict) -> ValidationScores:
    """ValidationScores from {candidate: [labels]} over the validation (n, c) records: each
    candidate's pass@1 is the mean over its labels (the seeds of an arm) of the mean over problems."""
    out = {}
    for cand, labels in scores_of.items():
        out[cand] = float(np.mean([passk_curve(val_counts[lab], [1])[0] for lab in labels]))
    return ValidationScores(out)


def complete(by: dict, label: str, problems: int) -> bool:
    return len(by.get(label, {})) >= problems


def stop_steps(out: Path, sz: Sizes, val_counts: Optional[dict] = None) -> dict[str, int]:
    """{run: its stopping step}: for every run whose checkpoints all have validation numbers,
    select_best over its validation pass@1 per step (GRPO's runs like every other)."""
    by = split_counts(out, VALIDATION) if val_counts is None else val_counts
    runs = sorted({lab.split("@")[0] for lab in by if "@" in lab})
    steps, chosen = eval_steps(sz), {}
    for run in runs:
        labels = {step: label_of(run, step) for step in steps}
        if all(complete(by, lab, sz.val_problems) for lab in labels.values()):
            chosen[run] = select_best(validation_scores(by, {s: [lab] for s, lab in labels.items()}))
    return chosen


def group_picks(out: Path, sz: Sizes) -> dict[tuple[str, ...], Optional[str]]:
    """{group: the arm select_best picks for more seeds, or None while a group arm's first `seeds`
    seeds lack validation numbers}. An arm whose runs all failed is not a candidate."""
    by = split_counts(out, VALIDATION)
    stops = stop_steps(out, sz, by)
    picks: dict[tuple[str, ...], Optional[str]] = {}
    for group in sz.more_seeds_for:
        if len(group) == 1:  # nothing to choose: GRPO, the null, always gets its extra seeds
            picks[group] = group[0]
            continue
        cands, ready = {}, True
        for arm in group:
            runs = [run_name(arm, s) for s in range(sz.seeds)]
            ok = [r for r in runs if r in stops]
            failed = [r for r in runs if (out / "runs" / r / "FAILED").is_file()]
            if len(ok) + len(failed) < len(runs):
                ready = False
            elif ok:
                cands[arm] = [label_of(r, stops[r]) for r in ok]  # each seed at its own stopping step
        picks[group] = select_best(validation_scores(by, cands)) if ready and cands else None
    return picks


def seeds_of(arm: str, sz: Sizes, picks: dict) -> int:
    return sz.more_seeds if arm in picks.values() else sz.seeds

