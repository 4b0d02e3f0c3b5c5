"""The frontier study: every method's strength sweep against GRPO's own trajectory (docs/simulator.md).

A regulariser that ends at lower held-out pass@1 than GRPO but higher pass@256 has not broken the
accuracy-diversity trade-off: GRPO stopped earlier (or run at a lower learning rate) also has lower
pass@1 and higher pass@256. The null curve is therefore GRPO's own trajectory (pass@1(t),
pass@256(t)), seed by seed, and a method is better only where it lies above it at equal pass@1.

Iso-pass@1 gain of one arm on one seed: y_method - y_GRPO(x_method), where x = held-out pass@1 at
the arm's final step, y = held-out pass@256 (or coverage), and y_GRPO(x) interpolates GRPO's
trajectory on the same seed (same suite) linearly in x over its "record" points: the steps where
GRPO's pass@1 reaches a new maximum (the trajectory as an early-stopping rule would see it), step 0
(the base policy) included. Outside GRPO's range the gain is measured against the nearest end
(the base policy below it, GRPO's best pass@1 point above it) and the arm is flagged `below` /
`above`: `above` with a positive gain means the arm dominates every GRPO stopping point.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .table import Table, markdown

GAIN_KEYS = ("pass@256", "coverage")


def grpo_record(table: Table, seed: int, null: str = "grpo", y: str = "pass@256") -> tuple[np.ndarray, np.ndarray]:
    """(pass@1, y) at GRPO's record steps on one seed, increasing in pass@1; base (step 0) first."""
    sub = sorted(table.where(method=null, seed=seed).rows, key=lambda r: r["step"])
    if not sub:
        raise ValueError(f"frontier: no rows of the null method {null!r} on seed {seed}")
    xs, ys = [], []
    for r in sub:  # step 0 of the method's rows is the base policy
        if not xs or r["pass@1"] > xs[-1]:
            xs.append(r["pass@1"])
            ys.append(r[y])
    return np.asarray(xs), np.asarray(ys)


def iso_gain(x: float, y: float, xs: np.ndarray, ys: np.ndarray) -> tuple[float, str]:
    """y - y_null(x) by linear interpolation on the record curve, and where x lies: in / below / above."""
    where = "below" if x < xs[0] else ("above" if x > xs[-1] else "in")
    return float(y - np.interp(x, xs, ys)), where  # np.interp holds the end values outside the range


def frontier_rows(table: Table, null: str = "grpo", labels: Optional[dict] = None) -> list[dict]:
    """One row per arm (the null included): final means over seeds and the iso-pass@1 gains (mean, std)."""
    runs = Table(r for r in table.rows if r["method"] != "base")
    fin = runs.final()
    seeds = fin.where(method=null).unique("seed")
    if not seeds:
        raise ValueError(f"frontier: no rows of the null method {null!r} (its trajectory is the null curve)")
    curves = {(s, k): grpo_record(runs, s, null, k) for s in seeds for k in GAIN_KEYS}
    out = []
    for m in fin.unique("method"):
        sub = [r for r in fin.where(method=m).rows if r["seed"] in seeds]
        row = {"method": m, "label": (labels or {}).get(m, m), "n_seeds": len(sub)}
        for k in ("pass@1",) + GAIN_KEYS:
            col = np.array([r[k] for r in sub])
            row[k], row[k + "_std"] = float(col.mean()), float(col.std())
        for k in GAIN_KEYS:
            gains = [iso_gain(r["pass@1"], r[k], *curves[(r["seed"], k)]) for r in sub]
            g = np.array([v for v, _ in gains])
            row[f"gain_{k}"], row[f"gain_{k}_std"] = float(g.mean()), float(g.std())
            row[f"gain_{k}_se"] = float(g.std(ddof=1) / math.sqrt(len(g))) if len(g) > 1 else float("nan")
            ranges = {w for _, w in gains}  # the same for every key: the pass@1 axis is shared
        row["range"] = ",".join(sorted(ranges))
        out.append(row)
    return out


def frontier_markdown(rows: list[dict], cost: str = "") -> str:
    """The frontier table: final held-out pass@1 / pass@256 / coverage and the iso-pass@1 gains."""
    header = ["arm", "n", "pass@1", "pass@256", "coverage", "iso-pass@1 gain pass@256", "iso-pass@1 gain coverage",
              "pass@1 vs GRPO range"]
    lines = []
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in ("pass@1",) + GAIN_KEYS]
        gains = [f"{r[f'gain_{k}']:+.4f} ± {r[f'gain_{k}_se']:.4f}" for k in GAIN_KEYS]
        lines.append([r["label"], r["n_seeds"], *cells, *gains, r["range"]])
    note = ("\nmean ± std over seeds (values); gains: mean ± standard error over seeds of the per-seed gain over "
            "GRPO's own trajectory at the arm's pass@1 (apo_toy/frontier.py). range: in = inside GRPO's "
            "pass@1 range, below = under the base policy's pass@1, above = beyond GRPO's best pass@1 (gain "
            "against that end point).\n")
    return markdown(header, lines) + note + (f"\n{cost}\n" if cost else "")
