"""Figures of `python -m apo_toy.run`: curves.png, pass_at_k.png and (frontier preset) frontier.png.

Readability rules (issue 7 of the tracker): one legend per figure, outside the panels; where the
absolute curves of many methods coincide, a second row shows each method minus GRPO on the same
seed, mean with a band of +- one std over seeds; titles give the real seed count; no value
labels inside the panels (numbers go to table.md / frontier.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import palette
from .palette import family  # the one family rule (paper_figures/style.py uses it too)
from .measures import PASS_KS
from .table import Table

CURVE_KEYS = ("pass@1", "pass@256", "coverage", "manifold_mass", "entropy")
NULL = "grpo"
# every arm's colour / line style / marker: apo_toy/palette.py (one palette for every figure)


def _plt():
    import matplotlib.pyplot as plt  # the backend is the caller's (library code never sets it)

    return plt


def color(method: str) -> str:
    """The family's fixed colour (apo_toy.palette)."""
    return palette.color(method)


def steps_matrix(runs: Table, method: str, key: str, seeds: list) -> tuple[np.ndarray, np.ndarray]:
    """steps [S] and values [n_seeds, S] of one method (NaN where a seed lacks a step)."""
    sub = runs.where(method=method)
    steps = np.array(sorted(set(sub.column("step").astype(int).tolist())))
    vals = np.full((len(seeds), len(steps)), np.nan)
    for r in sub.rows:
        vals[seeds.index(r["seed"]), int(np.searchsorted(steps, r["step"]))] = r.get(key, np.nan)
    return steps, vals


def _look(st: dict, n_points: int) -> dict:
    """matplotlib kwargs of a palette look; markers thinned to about 8 per curve."""
    return {"color": st["color"], "ls": st["linestyle"], "marker": st["marker"], "ms": 4,
            "markevery": max(1, n_points // 8)}


def _band(ax, x, vals, st, label=None, lw=1.4, z=2):
    mean, sd = np.nanmean(vals, 0), np.nanstd(vals, 0)
    ax.plot(x, mean, **_look(st, len(x)), lw=lw, label=label, zorder=z)
    if vals.shape[0] > 1:
        ax.fill_between(x, mean - sd, mean + sd, color=st["color"], alpha=0.15, lw=0, zorder=z - 1)


def plot_curves(table: Table, out: Path, preset: str, methods: Optional[Sequence[str]] = None) -> Path:
    """Top row: absolute (mean over seeds, GRPO black on top); bottom row: method - GRPO per seed, +- std."""
    plt = _plt()
    runs = Table(r for r in table.rows if r["method"] != "base")
    base = table.where(method="base")
    methods = list(methods or runs.unique("method"))
    seeds = runs.unique("seed")
    has_null = NULL in methods
    looks = palette.styles(["base"] + methods)
    fig, axes = plt.subplots(2 if has_null else 1, len(CURVE_KEYS), figsize=(4 * len(CURVE_KEYS), 7 if has_null else 3.8),
                             squeeze=False)
    for j, key in enumerate(CURVE_KEYS):
        ax = axes[0, j]
        for m in methods:
            steps, v = steps_matrix(runs, m, key, seeds)
            is_null = m == NULL
            ax.plot(steps, np.nanmean(v, 0), **_look(looks[m], len(steps)), lw=2.6 if is_null else 1.3,
                    zorder=5 if is_null else 2, label=m)
        if len(base):
            ax.axhline(np.nanmean(base.column(key)), color="grey", ls="--", lw=1, label="base (reference)")
        ax.set_title(key)
        if has_null:
            ax2 = axes[1, j]
            s0, v0 = steps_matrix(runs, NULL, key, seeds)
            for m in methods:
                if m == NULL:
                    continue
                steps, v = steps_matrix(runs, m, key, seeds)
                common = np.intersect1d(steps, s0)
                d = v[:, np.searchsorted(steps, common)] - v0[:, np.searchsorted(s0, common)]  # [seeds, S] same seed
                _band(ax2, common, d, looks[m])
            ax2.axhline(0.0, color="#000000", lw=1.2)
            ax2.set_title(f"{key} minus GRPO (same seed)")
            ax2.set_xlabel("step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    n = len(seeds)
    fig.suptitle(f"apo_toy preset {preset!r}: mean over {n} seed{'s' if n != 1 else ''}"
                 + (" (bands: +- 1 std over seeds)" if n > 1 else ""))
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pass_at_k(table: Table, out: Path, preset: str, methods: Optional[Sequence[str]] = None) -> Path:
    """Left: final pass@k vs k (absolute, base dashed); right: minus GRPO on the same seed, +- std."""
    plt = _plt()
    runs = Table(r for r in table.rows if r["method"] != "base")
    fin, base = runs.final(), table.where(method="base")
    methods = list(methods or runs.unique("method"))
    seeds = fin.unique("seed")
    ks = np.array(PASS_KS)

    def mat(rows: Table) -> np.ndarray:  # [seeds, len(ks)]
        by = {r["seed"]: r for r in rows.rows}
        return np.array([[by[s].get(f"pass@{k}", np.nan) if s in by else np.nan for k in ks] for s in seeds])

    has_null = NULL in methods
    looks = palette.styles(["base"] + methods)
    fig, axes = plt.subplots(1, 2 if has_null else 1, figsize=(12 if has_null else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    for m in methods:
        ax.plot(ks, np.nanmean(mat(fin.where(method=m)), 0), **_look(looks[m], len(ks)), lw=2.6 if m == NULL else 1.3,
                zorder=5 if m == NULL else 2, label=m)
    if len(base):
        ax.plot(ks, np.nanmean(mat(base), 0), color="grey", ls="--", marker="s", ms=3, label="base (reference)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k (exact)", title="final pass@k")
    if has_null:
        ax2 = axes[0, 1]
        ref = mat(fin.where(method=NULL))
        for m in methods:
            if m != NULL:
                _band(ax2, ks, mat(fin.where(method=m)) - ref, looks[m])
        if len(base):
            ax2.plot(ks, np.nanmean(mat(base) - ref, 0), color="grey", ls="--", marker="s", ms=3)
        ax2.axhline(0.0, color="#000000", lw=1.2)
        ax2.set_xscale("log", base=2)
        ax2.set(xlabel="k", ylabel="pass@k minus GRPO", title="final pass@k minus GRPO (same seed)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    n = len(seeds)
    fig.suptitle(f"{preset}: mean over {n} seed{'s' if n != 1 else ''}")
    fig.tight_layout()
    path = out / "pass_at_k.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_frontier(table: Table, rows: list[dict], out: Path, preset: str = "frontier") -> Path:
    """frontier.png in `out` (`frontier_figure`)."""
    plt = _plt()
    fig = frontier_figure(table, rows, preset)
    path = out / "frontier.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def frontier_figure(table: Table, rows: list[dict], preset: str = "frontier"):
    """pass@1 vs pass@256 and vs coverage (GRPO's seed-mean trajectory as the null curve, each family's
    strengths joined in sweep order), and the iso-pass@1 gain per arm with its standard error."""
    plt = _plt()
    runs = Table(r for r in table.rows if r["method"] != "base")
    seeds = runs.unique("seed")
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.5), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    fams: dict = {}
    for r in rows:
        if r["method"] != NULL:
            fams.setdefault(family(r["method"]), []).append(r)
    for ax, key in zip(axes[:2], ("pass@256", "coverage")):
        steps, x = steps_matrix(runs, NULL, "pass@1", seeds)
        _, y = steps_matrix(runs, NULL, key, seeds)
        ax.plot(np.nanmean(x, 0), np.nanmean(y, 0), color="#000000", lw=2.2, marker=".", ms=5, zorder=6,
                label=f"GRPO trajectory (steps 0-{int(steps[-1])}, every {int(steps[1] - steps[0])})")
        for fam, rs in fams.items():
            ax.plot([r["pass@1"] for r in rs], [r[key] for r in rs], color=color(rs[0]["method"]), lw=1.2,
                    marker="o", ms=6, mec="white", mew=0.6, zorder=4, label=fam)
            ax.scatter([rs[-1]["pass@1"]], [rs[-1][key]], s=70, facecolor="none", edgecolor=color(rs[0]["method"]),
                       zorder=4)  # ring: the strongest setting of the sweep
        final = next(r for r in rows if r["method"] == NULL)
        ax.scatter([final["pass@1"]], [final[key]], marker="*", s=260, color="#000000", edgecolor="white", zorder=7,
                   label="GRPO final step")
        ax.set(xlabel="held-out pass@1", ylabel=f"held-out {key}",
               title=f"pass@1 vs {key} (mean over {len(seeds)} seeds)")
        ax.grid(alpha=0.3)
    ax = axes[2]
    arms = [r for r in rows if r["method"] != NULL]
    yy = np.arange(len(arms))[::-1]
    g = np.array([r["gain_pass@256"] for r in arms])
    se = np.nan_to_num(np.array([r["gain_pass@256_se"] for r in arms]))
    ax.barh(yy, g, xerr=se, color=[color(r["method"]) for r in arms], alpha=0.85, error_kw={"lw": 0.8})
    ax.set_yticks(yy, [r["label"] + ("" if r["range"] == "in" else f" [{r['range']}]") for r in arms], fontsize=7)
    ax.axvline(0.0, color="#000000", lw=1.2)
    ax.set(xlabel="pass@256 minus GRPO's trajectory at the same pass@1 (mean ± s.e. over seeds)",
           title="iso-pass@1 gain over GRPO early-stopped")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"{preset}: the accuracy-diversity frontier against GRPO's own trajectory (black: seed mean per "
                 "step; the gains use each seed's own curve); a ring marks each family's strongest setting")
    fig.tight_layout()
    return fig
