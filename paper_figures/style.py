"""One look for every figure: Okabe-Ito colours, one fixed colour per method, saving PNG + PDF.

The Okabe-Ito palette (Okabe & Ito, "Color Universal Design", 2008) stays distinguishable under
the common colour-vision deficiencies. Every figure and notebook takes a method's colour from
`color(method)`, so "apo" is the same blue everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
    "grey": "#999999",
}

# method (simulator name, trainer loss name or evaluator label) -> colour; defined once here
METHOD_COLORS = {
    "base": OKABE_ITO["black"],
    "grpo": OKABE_ITO["vermillion"],
    "dr_grpo": OKABE_ITO["vermillion"],
    "dapo": OKABE_ITO["vermillion"],
    "w_reinforce": OKABE_ITO["yellow"],
    "grpo_kl": OKABE_ITO["orange"],
    "grpo_kl_full": OKABE_ITO["purple"],
    "kl_on_wrong": OKABE_ITO["sky"],
    "entropy": OKABE_ITO["yellow"],
    "apo": OKABE_ITO["blue"],
    "apo_push_only": OKABE_ITO["green"],
    "apo_old_mass": OKABE_ITO["sky"],  # the other readings of r_anchor: APO's hues, told apart by line
    "apo_old_token": OKABE_ITO["blue"],  # style too (LINESTYLES)
    "topk_kl_on_wrong": OKABE_ITO["grey"],
    "apo_inclusive": OKABE_ITO["grey"],
    "npg": OKABE_ITO["grey"],
}

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
}

LINESTYLES = {"npg": ":", "base": "--", "apo_inclusive": "--", "dr_grpo": "--", "grpo_kl_full": "-",
              "apo_old_mass": "--", "apo_old_token": (0, (1, 1)), "topk_kl_on_wrong": "-."}


def family(method: str) -> str:
    """'apo@beta=0.3' -> 'apo', 'grpo_kl@0.05' -> 'grpo_kl', 'apo-tiny' -> 'apo' (best effort)."""
    name = method.split("@")[0].split("[")[0]
    if name in METHOD_COLORS:
        return name
    for key in sorted(METHOD_COLORS, key=len, reverse=True):  # longest prefix first: grpo_kl before grpo
        if name.startswith(key):
            return key
    return name


def color(method: str) -> str:
    """The method's fixed colour (grey for unknown names)."""
    return METHOD_COLORS.get(family(method), OKABE_ITO["grey"])


def label(method: str) -> str:
    """Readable legend label; variants keep their suffix (apo@K=4 -> 'APO (rectified clip) K=4')."""
    fam = family(method)
    base = METHOD_LABELS.get(fam, method)
    suffix = method[len(fam):].lstrip("@_-")
    return f"{base} {suffix}" if suffix and method != fam else base


def linestyle(method: str):
    return LINESTYLES.get(method, LINESTYLES.get(family(method), "-"))


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
    c = kw.pop("color", color(method))
    ax.plot(x, mean, color=c, ls=kw.pop("ls", linestyle(method)), lw=kw.pop("lw", 1.8),
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
