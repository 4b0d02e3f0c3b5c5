"""The statistics of the miniature, pure functions of per-problem (n, c) counts: pass@k curves,
the crossover k*, the paired gap to the base with its standard error over problems, the share of
problems whose c/n fell or rose. Counts are {problem_id: (n, c)} per evaluation label."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from apo_llm.metrics import pass_at_k


def counts(records: Sequence[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """{label: {problem_id: (n, c)}}; the last record of a (label, problem) pair wins."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for r in records:
        out.setdefault(r["model"], {})[r["problem_id"]] = (int(r["n"]), int(r["c"]))
    return out


def passk_curve(nc: dict[str, tuple[int, int]], ks: Sequence[int]) -> np.ndarray:
    """Mean over problems of the unbiased pass@k, one value per k."""
    n = np.array([v[0] for v in nc.values()])
    c = np.array([v[1] for v in nc.values()])
    return np.array([float(np.mean(pass_at_k(n, c, k))) for k in ks])


def crossover_k(arm: np.ndarray, base: np.ndarray, ks: Sequence[int]) -> Optional[int]:
    """Smallest k with arm pass@k < base pass@k (1e-9 slack for rounding); None if never."""
    below = np.nonzero(arm < base - 1e-9)[0]
    return int(ks[below[0]]) if below.size else None


def gap_vs_base(runs: Sequence[dict[str, tuple[int, int]]], base: dict[str, tuple[int, int]],
                k: int) -> tuple[float, float]:
    """Paired gap to the base at one k: per problem, the arm's pass@k (mean over its seeds) minus the
    base's; returns (mean over problems, standard error over problems). The s.e. is the spread of the
    problems, the unit both models share, so it says whether the gap exceeds problem-level noise."""
    ids = sorted(base)
    nc = np.array([[r[i] for i in ids] for r in [base, *runs]])  # [1 + seeds, problems, (n, c)]
    per = pass_at_k(nc[..., 0], nc[..., 1], k)  # [1 + seeds, problems]
    d = per[1:].mean(0) - per[0]
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def gain_over_null(arm: Sequence[float], null: Sequence[float]) -> tuple[float, float]:
    """An arm's gain over the null (GRPO) in one score (pass@k at one k, each seed's mean over the
    shared problems): (mean over the arm's seeds minus mean over the null's, Welch standard error
    sqrt(s_arm^2 / n_arm + s_null^2 / n_null) with ddof 1). The spread is over training seeds, the
    randomness that separates two methods on the same problems; NaN when either has one seed."""
    a, b = np.asarray(arm, dtype=float), np.asarray(null, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float(a.mean() - b.mean()), float("nan")
    return float(a.mean() - b.mean()), float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def p_shift(nc: dict[str, tuple[int, int]], base: dict[str, tuple[int, int]]) -> tuple[float, float]:
    """(share of shared problems whose c/n fell below the base's, share whose c/n rose)."""
    ids = [i for i in nc if i in base]
    d = np.array([nc[i][1] / nc[i][0] - base[i][1] / base[i][0] for i in ids])
    return float(np.mean(d < 0)), float(np.mean(d > 0))


def gap_ks(n: int) -> list[int]:
    """The k at which the paired gap to base is reported: 1, n / 4 and n."""
    return sorted({1, max(1, n // 4), n})

