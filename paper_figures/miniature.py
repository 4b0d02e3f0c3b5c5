"""The miniature's figures, drawn from what a sweep wrote (results*.json, curves.json).

    llm_miniature{SUFFIX}_passk     pass@k at the validation-selected step and its gap to base
    llm_miniature{SUFFIX}_frontier  pass@1 vs pass@k (selected step filled, final step hollow)
    llm_miniature_curves            entropy, KL, manifold mass, clipped push share, validation pass@1

The sweep itself (training, evaluation, selection, statistics) is apo_llm.miniature; nothing here
computes a number the sweep did not write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from apo_llm.miniature.design import SPLITS, SUFFIX


def _style(arm: str) -> dict:
    """Colour and line style from apo_toy.palette (a colour per family, a stroke per variant)."""
    from apo_toy import palette

    st = palette.style(arm)
    return {"color": st["color"], "ls": st["linestyle"]}


def _marker(arm: str) -> str:
    """Frontier markers (apo_toy.palette): the arms that share a colour differ here."""
    from apo_toy import palette

    return palette.style(arm)["marker"]


def figures(out_dir: Path, res: dict) -> list[Path]:
    """llm_miniature{SUFFIX}_passk (pass@k at the selected step and its gap to base, seed bands) and
    llm_miniature{SUFFIX}_frontier (pass@1 vs pass@k: selected step filled, final step hollow)."""
    import matplotlib.pyplot as plt

    from . import style

    style.setup()
    ks = np.array(res["ks"])
    base = np.array(res["base"]["pass@k"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(ks, base, color="black", ls="--", lw=1.8, label="base")
    ax2.axhline(0, color="black", ls="--", lw=1)
    for arm, a in res["arms"].items():
        st = _style(arm)
        cur = np.array(a["selected"]["pass@k"])
        lbl = f"{arm} ({len(a['seeds'])} seed{'s' if len(a['seeds']) > 1 else ''})"
        style.band(ax, ks, cur, arm, lbl=lbl, **st)
        style.band(ax2, ks, cur - base, arm, lbl=lbl, **st)
    for a_ in (ax, ax2):
        a_.set_xscale("log", base=2)
        a_.set_xlabel("k (log scale)")
    split = res.get("split", "test")
    tag = SUFFIX[split]
    ax.set_ylabel(f"pass@k at the validation-selected step ({split})")
    ax2.set_ylabel("pass@k − base pass@k")
    ax.set_title("pass@k, mean ± std over seeds (base: black dashed)")
    ax2.set_title("gain over the base model")
    ax2.legend(fontsize=6, ncol=2)
    paths = style.save(fig, out_dir, f"llm_miniature{tag}_passk")

    n = int(ks[-1])
    # pass@n is often at the ceiling: a second panel at k = n / 8 keeps room to move
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, k in zip(axes, (n, max(1, n // 8))):
        _frontier(ax, res, base, k)
    axes[1].legend(fontsize=6, ncol=2)
    return paths + style.save(fig, out_dir, f"llm_miniature{tag}_frontier")


def _frontier(ax, res: dict, base: np.ndarray, k: int) -> None:
    """pass@1 against pass@k: each arm at its selected step (filled, mean +- std) and final step (hollow)."""
    i = k - 1
    ax.scatter([base[0]], [base[i]], color="black", marker="*", s=140, zorder=5, label="base")
    off = []  # collapsed arms (mean pass@1 under half the base's) would squeeze the others into a corner
    for arm, a in res["arms"].items():
        sel, fin = np.array(a["selected"]["pass@k"]), np.array(a["final"]["pass@k"])
        if sel[:, 0].mean() < 0.5 * base[0]:
            off.append(f"{arm} ({sel[:, 0].mean():.3f}, {sel[:, i].mean():.3f})")
            continue
        col = _style(arm)["color"]
        xs, ys = (sel[:, 0].mean(), fin[:, 0].mean()), (sel[:, i].mean(), fin[:, i].mean())
        ax.plot(xs, ys, color=col, lw=0.8, alpha=0.6)
        hollow = {"facecolors": "none", "edgecolors": col} if _marker(arm) in Line2D.filled_markers else \
            {"color": col, "alpha": 0.5}  # a line marker ("x") has no face to leave empty
        ax.scatter([xs[1]], [ys[1]], marker=_marker(arm), s=40, **hollow)
        ax.errorbar(xs[0], ys[0], xerr=sel[:, 0].std(), yerr=sel[:, i].std(),
                    color=col, marker=_marker(arm), ms=7, capsize=2, label=arm)
    if off:
        ax.text(0.02, 0.02, "not drawn, pass@1 < base/2:\n" + "\n".join(off), transform=ax.transAxes,
                fontsize=7, va="bottom", ha="left", color="0.3")
    ax.set_xlabel(f"pass@1 ({res.get('split', 'test')})")
    ax.set_ylabel(f"pass@{k}")
    ax.set_title(f"pass@1 vs pass@{k}: selected step (filled), final (hollow)")


def fig_curves(out_dir: Path, cur: dict) -> list[Path]:
    """llm_miniature_curves: one axis per quantity (CURVE_KEYS, then validation pass@1), one line
    per arm (seed mean, +-1 std band). A quantity the trainer does not log for an arm is absent."""
    import matplotlib.pyplot as plt

    from . import style

    style.setup()
    keys = [*cur["keys"], "validation pass@1"]
    titles = {"entropy": "entropy (sampled tokens)", "kl": "KL(old ‖ ref), k3 (logged when a loss needs ref)",
              "apo/manifold_mass": "manifold mass M_S (APO arms)",
              "clip_grad_frac/neg": "clipped share of the push on A < 0\n(= apo/neg_clipped_grad_frac)",
              "validation pass@1": "validation pass@1 (what selection reads)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for ax, key in zip(axes, keys):
        for arm, entry in cur["arms"].items():
            if key in entry:
                style.band(ax, entry[key]["steps"], np.array(entry[key]["runs"]), arm, lbl=arm, lw=1.2, **_style(arm))
        ax.set_title(titles.get(key, key), fontsize=9)
        ax.set_xlabel("step")
    if "kl" in keys:
        axes[keys.index("kl")].set_yscale("symlog", linthresh=1e-2)
    axes[-1].legend(fontsize=6, ncol=2)
    return style.save(fig, out_dir, "llm_miniature_curves")


def figures_from(sweep_dir: Path, out_dir: Path) -> tuple[list[Path], dict]:
    """`python -m paper_figures --miniature DIR`: the figures of a finished sweep (every split it has
    results for, and the curves), and its headline numbers {split: {arm: ...}} at the selected step."""
    paths, info = [], {}
    for split in SPLITS:
        path = Path(sweep_dir) / f"results{SUFFIX[split]}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        n = res["ks"][-1]
        info[split] = {arm: {"pass@1": a["selected"]["mean"][0], f"pass@{n}": a["selected"]["mean"][-1],
                             "k_star": a["selected"]["k_star"], "stop_step": a["stop_step"]}
                       for arm, a in res["arms"].items()}
        info[split]["base"] = {"pass@1": res["base"]["pass@k"][0], f"pass@{n}": res["base"]["pass@k"][-1]}
        paths += figures(out_dir, res)
    if not info:
        raise ValueError(f"--miniature: {sweep_dir} has no results.json (run python -m apo_llm.miniature)")
    cpath = Path(sweep_dir) / "curves.json"
    if cpath.is_file():
        paths += fig_curves(out_dir, json.loads(cpath.read_text()))
    return paths, info



def draw_sweep(out_dir: Path, results: dict[str, dict], cur: dict) -> list[Path]:
    """Every figure of a sweep just run ({split: results} and the curves of apo_llm.miniature.run_sweep);
    each split's results get their paths under "figures" (the curves go with the first split's)."""
    paths = []
    for res in results.values():
        res["figures"] = [str(p) for p in figures(out_dir, res)]
        paths += res["figures"]
    if results and cur["arms"]:
        extra = [str(p) for p in fig_curves(out_dir, cur)]
        next(iter(results.values()))["figures"] += extra
        paths += extra
    return [Path(p) for p in paths]
