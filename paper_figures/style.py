"""One look for every figure: the palette of apo_toy/palette.py, readable labels, saving PNG + PDF.

Every figure and notebook takes a method's colour, line style and marker from apo_toy.palette
(Okabe-Ito colours first), so "apo" is the same blue everywhere and a variant (apo@beta=0.2) keeps
its family's colour with its own stroke.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from apo_toy import palette

# colours, line styles and markers: apo_toy/palette.py, the one palette of every figure and notebook
OKABE_ITO = palette.OKABE_ITO

METHOD_LABELS = {
    "base": "base (reference)",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "dapo": "DAPO",
    "w_reinforce": "W-REINFORCE",
    "grpo_kl": "GRPO + k3 KL (forward pull)",
    "grpo_kl_full": "GRPO + reverse KL (full)",
    "kl_on_wrong": "KL-on-Wrong (k3)",
    "entropy": "GRPO + entropy",
    "apo": "APO (rectified clip)",
    "apo_push_only": "APO (push-only clip)",
    "apo_old_mass": "APO C (r_anchor / M_S(old))",
    "apo_old_token": "APO H (r_anchor per token / pi_old)",
    "topk_kl_on_wrong": "Top-K KL on wrong",
    "apo_inclusive": "APO (inclusive anchors)",
    "npg": "natural PG (yardstick)",
    "grpo_low_lr": "GRPO, lower lr",
}

# a method's family ('apo@beta=0.3' -> 'apo', 'grpo@lr_x0.5' -> 'grpo_low_lr'): the one rule, apo_toy.palette's
family = palette.family


def color(method: str) -> str:
    """The method's fixed colour (apo_toy.palette; grey for unknown names)."""
    return palette.color(method)


def linestyle(method: str):
    return palette.style(method)["linestyle"]


def marker(method: str) -> str:
    return palette.style(method)["marker"]


def label(method: str) -> str:
    """Readable legend label; variants keep their suffix (apo@K=4 -> 'APO (rectified clip) K=4')."""
    fam, suffix = palette.split(method)
    base = METHOD_LABELS.get(fam, method)
    return f"{base} {suffix}" if suffix and method != fam else base


def setup() -> None:
    """Readable defaults (call before creating figures). The backend is left alone: library code never
    sets it, so a notebook keeps its inline figures; headless, matplotlib falls back to Agg itself."""
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 150, "font.size": 10, "axes.titlesize": 11,
        "axes.labelsize": 10, "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False,
    })


def band(ax, x: Sequence[float], runs: np.ndarray, method: str, lbl: Optional[str] = None, **kw) -> None:
    """Mean over seeds (rows of `runs`, [seeds, steps]) with a +-1 std band."""
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    mean, std = runs.mean(0), runs.std(0)
    look = palette.style(method)
    c = kw.pop("color", look["color"])
    kw.setdefault("marker", look["marker"])
    kw.setdefault("markevery", max(1, len(x) // 8))
    kw.setdefault("ms", 4)
    ax.plot(x, mean, color=c, ls=kw.pop("ls", look["linestyle"]), lw=kw.pop("lw", 1.8),
            label=lbl if lbl is not None else label(method), **kw)
    if runs.shape[0] > 1:
        ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.18, lw=0)


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write out_dir/name.png and out_dir/name.pdf; returns both paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, bbox_inches="tight")  # legends placed outside the axes stay in the file
    plt.close(fig)
    return paths
