"""PNG curves of a training run from its metrics.jsonl: `python -m apo_llm.plots RUN_DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (title, [metric keys]) per panel; panels whose metrics are absent are left out
PANELS = [
    ("reward (train rollouts)", ["reward"]),
    ("held-out pass@k", None),  # filled with the eval/pass@k keys found
    ("groups with zero reward variance", ["frac_reward_zero_std"]),
    ("completion length", ["completions/mean_length"]),
    ("truncated completions", ["completions/clipped_ratio"]),
    ("entropy of pi_old", ["entropy"]),
    ("KL(pi_old || pi_ref), k3", ["kl"]),
    ("clip fractions", ["clip_ratio/low_mean", "clip_ratio/high_mean"]),
    ("APO safe-manifold mass", ["apo/manifold_mass"]),
    ("APO sampled token outside Top-K", ["apo/outside_topk_frac"]),
    ("APO r_anchor / pull (A<0 tokens)", ["apo/r_anchor_mean", "apo/pull"]),
    ("grad norm", ["grad_norm"]),
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


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write curves.png (one panel per metric group) into run_dir; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir / "metrics.jsonl")
    panels = []
    for title, keys in PANELS:
        if keys is None:
            keys = sorted({k for e in evals for k in e if k.startswith("eval/pass@")},
                          key=lambda k: int(k.split("@")[1]))
            src = evals
        else:
            src = steps
        keys = [k for k in keys if any(k in r for r in src)]
        if keys:
            panels.append((title, keys, src))
    if not panels:
        return []
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, keys, src) in zip(axes.flat, panels):
        for k in keys:
            xs = [r["step"] for r in src if k in r]
            ys = [r[k] for r in src if k in r]
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    name = run_dir.name
    fig.suptitle(f"{name}", fontsize=10)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


if __name__ == "__main__":
    for p in plot_run(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
