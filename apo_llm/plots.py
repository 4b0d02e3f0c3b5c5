"""PNG curves of a training run from its metrics.jsonl: `python -m apo_llm.plots RUN_DIR`.

One axis per quantity (quantities of different scales never share an axis: APO's r_anchor is
~1000 where the pull is ~0.1), every step curve drawn raw and faint with its moving average on
top, and the diagnostics the README reads (held-out pass@k, apo/neg_clipped_frac, the manifold
mass) in the first rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

# (title, metric key, y-scale) per panel, in reading order; panels whose metric is absent are left out.
# "eval" stands for every eval/pass@k key found (one panel, they share the [0, 1] scale).
PANELS = [
    ("reward (training rollouts)", "reward", "linear"),
    ("held-out pass@k", "eval", "linear"),
    ("APO: share of A<0 tokens clipped (apo/neg_clipped_frac)", "apo/neg_clipped_frac", "linear"),
    ("APO: safe-manifold mass (apo/manifold_mass)", "apo/manifold_mass", "linear"),
    ("APO: sampled token outside Top-K", "apo/outside_topk_frac", "linear"),
    ("APO: r_anchor mean (A<0 tokens)", "apo/r_anchor_mean", "log"),
    ("APO: pull term (A<0 tokens)", "apo/pull", "linear"),
    ("KL(pi_old || pi_ref), k3", "kl", "linear"),
    ("entropy of pi_old", "entropy", "linear"),
    ("groups with zero reward variance", "frac_reward_zero_std", "linear"),
    ("completion length (tokens)", "completions/mean_length", "linear"),
    ("truncated completions", "completions/clipped_ratio", "linear"),
    ("PPO clip fraction, low", "clip_ratio/low_mean", "linear"),
    ("PPO clip fraction, high", "clip_ratio/high_mean", "linear"),
    ("grad norm", "grad_norm", "linear"),
]


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train step records, eval records) from metrics.jsonl."""
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (evals if any(k.startswith("eval/") for k in rec) else steps).append(rec)
    return steps, evals


def smooth(y: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` steps (shorter at the start), NaN-aware."""
    y = np.asarray(y, dtype=float)
    out = np.empty_like(y)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1): i + 1]
        seg = seg[np.isfinite(seg)]
        out[i] = seg.mean() if seg.size else np.nan
    return out


def _series(src: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in src if key in r and r[key] is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _panels(steps: list[dict], evals: list[dict]) -> list[tuple[str, list[str], str, list[dict]]]:
    out = []
    for title, key, scale in PANELS:
        if key == "eval":
            keys = sorted({k for e in evals for k in e if k.startswith("eval/pass@")},
                          key=lambda k: int(k.split("@")[1]))
            if keys:
                out.append((title, keys, scale, evals))
        elif any(key in r for r in steps):
            out.append((title, [key], scale, steps))
    return out


def plot_run(run_dir: str | Path, window: int = 0) -> list[Path]:
    """Write curves.png into run_dir; returns the written paths. window 0: about a tenth of the steps."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir / "metrics.jsonl")
    panels = _panels(steps, evals)
    if not panels:
        return []
    window = window or max(3, len(steps) // 10)
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 2.9 * rows), squeeze=False)
    for ax, (title, keys, scale, src) in zip(axes.flat, panels):
        for i, k in enumerate(keys):
            xs, ys = _series(src, k)
            color = f"C{i}"
            if src is evals:  # a few points: markers, no smoothing
                ax.plot(xs, ys, marker="o", ms=4, color=color, label=k.removeprefix("eval/"))
            else:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8, label="per step")
                ax.plot(xs, smooth(ys, window), color=color, lw=1.8, label=f"mean of {window} steps")
        if scale == "log" and all(v > 0 for k in keys for v in _series(src, k)[1]):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: faint = per step, solid = moving mean", fontsize=10)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


if __name__ == "__main__":
    for p in plot_run(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
