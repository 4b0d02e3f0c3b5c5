"""Figures from the tree simulator (apo_toy): every number goes through apo_llm.objectives.policy_loss.

Each `fig_*` function runs its experiment at the given `Sizes`, draws one figure, saves it as
PNG + PDF and returns the written paths together with a small dict of the plotted final numbers
(the CLI prints them, so a run's log states what its figures show).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apo_toy import PASS_KS, SimConfig, SuiteSpec, get_method, get_preset, run_methods
from apo_toy.node import squeeze_step
from apo_toy.plots import steps_matrix
from apo_toy.presets import APO_READINGS, Table, rsc_methods

from . import style


@dataclass
class Sizes:
    """How big the simulator experiments are (full: the committed figures; quick: the CI test)."""

    n_prompts: int = field(default=32, metadata={"help": "prompts (trees) per suite"})
    steps: int = field(default=200, metadata={"help": "RL steps per run"})
    seeds: int = field(default=3, metadata={"help": "seeds (suites) per method: the error bands"})
    eval_every: int = field(default=5, metadata={"help": "measure every n steps"})
    init_steps: int = field(default=100, metadata={"help": "GRPO collapse steps before the recovery runs"})
    coupled_steps: int = field(default=150, metadata={"help": "RL steps of the coupled model (pass@k figure)"})
    coupled_seeds: int = field(default=5, metadata={"help": "seeds of the coupled model (pass@k figure)"})


FULL = Sizes()
QUICK = Sizes(n_prompts=6, steps=12, seeds=2, eval_every=4, init_steps=10, coupled_steps=12,
              coupled_seeds=2)

MAIN_METHODS = ("grpo", "grpo_kl", "grpo_kl_full", "kl_on_wrong", "apo")


def _spec(sz: Sizes) -> SuiteSpec:
    return SuiteSpec(n_prompts=sz.n_prompts)


def _curves(table, method: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [seeds, S]) of one method's measured steps."""
    return steps_matrix(table, method, key, table.where(method=method).unique("seed"))


def _final(table, method: str, key: str) -> np.ndarray:
    """Final value of `key` per seed."""
    return table.final().where(method=method).column(key)


# --------------------------------------------------------------------------------------------
# 1. Negative squeezing at one node (docs/theory.md section 2)
# --------------------------------------------------------------------------------------------


def fig_squeezing(out: Path, sz: Sizes) -> tuple[list[Path], dict]:
    import matplotlib.pyplot as plt

    # a peaky node: mode 0.55, a rare *valid* token (index 5), the wrong token ybar (index 3)
    pi = torch.tensor([0.55, 0.15, 0.10, 0.06, 0.05, 0.03, 0.025, 0.02, 0.015, 0.01], dtype=torch.float64)
    pi = pi / pi.sum()  # a proper distribution (the numbers above sum to 1.01)
    ybar, valid = 3, 5
    eta = 0.3
    z1 = squeeze_step(pi, ybar, eta)
    pi1 = torch.softmax(z1, -1)
    measured = (pi1.log() - pi.log()).numpy()
    sq = float((pi**2).sum())
    first_order = (eta * (pi - sq + pi[ybar])).numpy()
    first_order[ybar] = -eta * (1 + sq - 2 * float(pi[ybar]))
    thr = sq - float(pi[ybar])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    idx = np.arange(len(pi))
    a1.bar(idx - 0.2, pi.numpy(), 0.4, color=style.OKABE_ITO["grey"], label="before")
    a1.bar(idx + 0.2, pi1.numpy(), 0.4, color=style.OKABE_ITO["blue"], label=f"after one step (eta={eta})")
    a1.set_xticks(idx, [f"{i}" + ("\nwrong" if i == ybar else "\nvalid" if i == valid else "") for i in idx])
    a1.set_xlabel("token k (sorted by pi)")
    a1.set_ylabel("probability pi_k")
    a1.set_title("Pushing down a wrong token: freed mass goes to the mode")
    a1.legend()
    cols = [style.OKABE_ITO["vermillion"] if i == ybar else style.OKABE_ITO["green"] if i == valid
            else style.OKABE_ITO["sky"] for i in idx]
    a2.bar(idx, measured, color=cols, label="measured change")
    a2.plot(idx, first_order, "k_", ms=18, mew=2, label="eta (pi_k - ||pi||^2 + pi_ybar)")
    a2.axhline(0, color="k", lw=0.8)
    gain_cut = np.interp(thr, pi.numpy()[::-1], idx[::-1].astype(float))
    a2.axvline(gain_cut, color=style.OKABE_ITO["orange"], ls="--",
               label=f"threshold ||pi||^2 - pi_ybar = {thr:.3f}")
    a2.set_xticks(idx)
    a2.set_xlabel("token k (sorted by pi)")
    a2.set_ylabel("change of log-probability (nats)")
    a2.set_title("Only tokens above the threshold gain")
    a2.legend(loc="lower right", fontsize=7)
    info = {"threshold": thr, "dlogpi_mode": float(measured[0]), "dlogpi_rare_valid": float(measured[valid])}
    return style.save(fig, out, "squeezing"), info


# --------------------------------------------------------------------------------------------
# 2-4. RSC trajectories, pass@k curves, accuracy-diversity frontier
# --------------------------------------------------------------------------------------------


def run_main(sz: Sizes, mode: str = "exact"):
    """GRPO vs KL variants vs APO on the default tabular suite (the rsc_tabular preset's arms)."""
    cfg = SimConfig(mode=mode, steps=sz.steps, eval_every=sz.eval_every)
    return run_methods(_spec(sz), MAIN_METHODS, cfg, seeds=sz.seeds, preset="rsc_tabular")


def fig_rsc(out: Path, sz: Sizes, table) -> tuple[list[Path], dict]:
    import matplotlib.pyplot as plt

    panels = [("pass@1", "Pass@1 (success probability)"), ("pass@256", "Pass@256"),
              ("coverage", "share of base-valid leaves kept"), ("distinct@256", "distinct correct leaves in 256 samples")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    info = {}
    base = table.where(method="base")
    for ax, (key, ylab) in zip(axes, panels):
        for m in MAIN_METHODS:
            steps, vals = _curves(table, m, key)
            style.band(ax, steps, vals, m)
            info[f"{m}/{key}"] = float(np.nanmean(vals[:, -1]))
        b = base.column(key)
        ax.axhline(float(np.mean(b)), color=style.color("base"), ls="--", lw=1.2, label=style.label("base"))
        info[f"base/{key}"] = float(np.mean(b))
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylab)
        ax.set_title(key)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"Recursive Space Contraction in the tabular tree model (exact dynamics, {sz.n_prompts} prompts, "
                 f"b=10, D=3; mean +- std over {sz.seeds} suites)", fontsize=11)
    return style.save(fig, out, "rsc_trajectories"), info


def run_coupled(sz: Sizes):
    """The coupled `rsc` preset (shared parameters, held-out prompts) at figure sizes."""
    p = get_preset("rsc")
    spec = dataclasses.replace(p.spec, n_train=sz.n_prompts, n_heldout=2 * sz.n_prompts)
    cfg = dataclasses.replace(p.cfg, steps=sz.coupled_steps, eval_every=sz.coupled_steps)
    return run_methods(spec, rsc_methods(), cfg, seeds=sz.coupled_seeds, preset="rsc")


def fig_passk(out: Path, sz: Sizes, table) -> tuple[list[Path], dict]:
    """Held-out pass@k of the coupled model: base vs every arm, k on a log axis, crossover k* marked."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    info = {}
    base = np.array([table.where(method="base").column(f"pass@{k}") for k in PASS_KS])  # [k, seeds]
    arms = [m if isinstance(m, str) else m.name for m in rsc_methods()]
    for m in ["base"] + arms:
        vals = base if m == "base" else np.array([_final(table, m, f"pass@{k}") for k in PASS_KS])
        mean, std = vals.mean(1), vals.std(1)
        ls, mk = style.linestyle(m), style.marker(m)  # a variant keeps its family's colour, not its stroke
        a1.errorbar(PASS_KS, mean, yerr=std, color=style.color(m), ls=ls, marker=mk, ms=4, capsize=3,
                    label=style.label(m))
        info[m] = {f"pass@{k}": float(v) for k, v in zip(PASS_KS, mean)}
        if m == "base":
            continue
        d = vals - base  # paired by suite
        a2.errorbar(PASS_KS, d.mean(1), yerr=d.std(1), color=style.color(m), ls=ls, marker=mk, ms=4, capsize=3,
                    label=style.label(m))
        kstar = _final(table, m, "crossover_k")  # NaN where a seed has no crossover up to k = 1024
        info[m]["crossover_k_median"] = float(np.nanmedian(kstar)) if np.isfinite(kstar).any() else None
        info[m]["seeds_with_crossover"] = int(np.isfinite(kstar).sum())
        if m in ("grpo", "apo") and np.isfinite(kstar).any():
            for a in (a1, a2):
                a.axvline(float(np.nanmedian(kstar)), color=style.color(m), ls=":", lw=1.2)
            a2.annotate(f"k* {style.label(m).split(' ')[0]} = {np.nanmedian(kstar):g}", (np.nanmedian(kstar), 0),
                        textcoords="offset points", xytext=(3, 6 if m == "grpo" else -12), fontsize=7,
                        color=style.color(m))
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(PASS_KS, [str(k) for k in PASS_KS])
        a.set_xlabel("k (samples per held-out prompt)")
    a1.set_ylabel("pass@k = 1 - (1 - p)^k, mean over held-out prompts")
    a1.set_title(f"Held-out pass@k after {sz.coupled_steps} steps (coupled model)")
    a1.legend(loc="lower right", fontsize=7)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_ylabel("pass@k(method) - pass@k(base)")
    a2.set_title("Gain over the base (paired by suite); dotted: median crossover k*")
    fig.suptitle(f"Pass@K crossover: trained on {sz.n_prompts} prompts, measured on {2 * sz.n_prompts} held-out "
                 f"prompts (exact dynamics, mean +- std over {sz.coupled_seeds} suites)", fontsize=10)
    return style.save(fig, out, "passk_curves"), info


QUICK_FRONTIER_ARMS = ("grpo", "grpo@lr_x0.5", "grpo_kl@0.05", "topk_kl_on_wrong@0.1", "apo@beta=0.1",
                       "apo_old_mass@beta=0.1", "apo_old_token@beta=0.1")


def run_sweep(sz: Sizes, quick: bool = False):
    """The `frontier` preset (coupled rsc suite, strength sweeps, GRPO's trajectory as the null), at figure
    sizes; quick: a subset of the arms on small suites. The committed figure reads a full run instead
    (`python -m paper_figures --frontier DIR`, DIR from `python -m apo_toy.run --preset frontier`)."""
    p = get_preset("frontier")
    arms = [m for m in p.methods if not quick or m.name in QUICK_FRONTIER_ARMS]
    spec = dataclasses.replace(p.spec, n_train=8, n_heldout=8) if quick else p.spec
    cfg = dataclasses.replace(p.cfg, steps=sz.coupled_steps, eval_every=max(1, sz.coupled_steps // 30))
    return run_methods(spec, arms, cfg, seeds=sz.coupled_seeds, preset="frontier")


def read_frontier(run_dir: Path):
    """The Table of a finished `python -m apo_toy.run --preset frontier --out run_dir`."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: --frontier {run_dir} has no metrics.jsonl")
    return Table(json.loads(line) for line in open(path))


def fig_frontier(out: Path, sz: Sizes, table) -> tuple[list[Path], dict]:
    """Every arm's final held-out (pass@1, pass@256 / coverage) against GRPO's own trajectory, and the
    iso-pass@1 gains (apo_toy/frontier.py; drawn by apo_toy.plots.frontier_figure)."""
    from apo_toy.frontier import frontier_rows
    from apo_toy.plots import frontier_figure

    rows = frontier_rows(table)
    fig = frontier_figure(table, rows)
    info = {r["method"]: {k: r[k] for k in ("pass@1", "pass@256", "coverage", "gain_pass@256", "gain_pass@256_se",
                                            "gain_coverage", "n_seeds")} for r in rows}
    return style.save(fig, out, "frontier"), info


# --------------------------------------------------------------------------------------------
# 5. Elastic recovery
# --------------------------------------------------------------------------------------------

RECOVERY_METHODS = ("grpo", "grpo_kl", "grpo_kl_full", *APO_READINGS, "apo_push_only")  # recovery_methods() minus two


def fig_recovery(out: Path, sz: Sizes) -> tuple[list[Path], dict]:
    """Start every arm from the same GRPO-collapsed policy and watch the squeezed branches."""
    import matplotlib.pyplot as plt

    cfg = SimConfig(mode="exact", steps=sz.steps, eval_every=sz.eval_every, init_steps=sz.init_steps)
    table = run_methods(_spec(sz), RECOVERY_METHODS, cfg, seeds=sz.seeds, preset="recovery")
    panels = [("branch_rare_in", "P(rare valid leaf inside Top-K)"), ("branch_secondary", "P(secondary valid leaf)"),
              ("coverage", "share of base-valid leaves kept"), ("pass@1", "Pass@1")]
    # top row: absolute means (they nearly coincide); bottom row: each arm minus GRPO on the same
    # suite, mean +- std over suites, where the differences are visible
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    info = {}
    base = table.where(method="base")
    for j, (key, ylab) in enumerate(panels):
        ax, dax = axes[0, j], axes[1, j]
        _, grpo = _curves(table, "grpo", key)
        for m in RECOVERY_METHODS:
            steps, vals = _curves(table, m, key)
            ax.plot(steps, vals.mean(0), color=style.color(m), ls=style.linestyle(m), marker=style.marker(m),
                    markevery=max(1, len(steps) // 8), ms=4, lw=2.6 if m == "grpo" else 1.4,
                    zorder=5 if m == "grpo" else 2, label=style.label(m))
            if m != "grpo":
                style.band(dax, steps, vals - grpo, m)
            info[f"{m}/{key}"] = [float(np.nanmean(vals[:, 0])), float(np.nanmean(vals[:, -1]))]
        ax.axhline(float(np.mean(base.column(key))), color=style.color("base"), ls="--", lw=1.2,
                   label=style.label("base"))
        dax.axhline(0.0, color=style.color("grpo"), lw=1.4)
        ax.set_ylabel(ylab)
        dax.set_ylabel("minus GRPO (same suite)")
        dax.set_xlabel(f"RL step after {sz.init_steps} GRPO collapse steps")
        if key.startswith("branch"):
            ax.set_yscale("log")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4,
               frameon=False)
    fig.suptitle("Elastic recovery: every arm starts from the same GRPO-collapsed policy "
                 f"(exact dynamics; bottom: minus GRPO, mean +- std over {sz.seeds} suites)", fontsize=11)
    return style.save(fig, out, "elastic_recovery"), info


# --------------------------------------------------------------------------------------------
# 6. Ablations: clip placement and anchoring
# --------------------------------------------------------------------------------------------


HATCH = {"apo@K=2": "//", "apo@K=4": ".."}  # K variants share APO's colour


def fig_ablation(out: Path, sz: Sizes) -> tuple[list[Path], dict]:
    """Rectified vs push-only clipping, exclusive vs inclusive anchoring, K; sampled, 4 PPO epochs."""
    import matplotlib.pyplot as plt

    arms = [get_method("grpo"), get_method("apo"), get_method("apo_push_only"), get_method("apo_inclusive"),
            get_method("apo", name="apo@K=2", apo_k=2), get_method("apo", name="apo@K=4", apo_k=4)]
    cfg = SimConfig(mode="sampled", steps=sz.steps, eval_every=sz.eval_every, epochs=4)
    table = run_methods(_spec(sz), arms, cfg, seeds=sz.seeds, preset="ablation")
    names = [a.name for a in arms]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    info = {}
    x = np.arange(len(names))
    for ax, key, ylab in ((axes[0], "pass@1", "Pass@1"), (axes[1], "coverage", "share of base-valid leaves kept"),
                          (axes[2], "distinct@256", "distinct correct leaves in 256 samples")):
        vals = [_final(table, m, key) for m in names]
        bars = ax.bar(x, [v.mean() for v in vals], yerr=[v.std() for v in vals], capsize=3,
                      color=[style.color(m) for m in names], edgecolor="white")
        for bar, m in zip(bars, names):
            bar.set_hatch(HATCH.get(m, ""))
        ax.axhline(float(np.mean(table.where(method="base").column(key))), color="k", ls="--", lw=1,
                   label="base")
        ax.set_xticks(x, [style.label(m).replace(" (", "\n(") for m in names], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylab)
        ax.set_title(f"final {key}")
        info.update({f"{m}/{key}": float(v.mean()) for m, v in zip(names, vals)})
    axes[0].legend(loc="lower right")
    ax = axes[3]
    for m in names[1:]:
        steps, vals = _curves(table, m, "apo/neg_clipped_frac")
        ok = steps > 0
        style.band(ax, steps[ok], vals[:, ok], m, lbl=style.label(m))
        info[f"{m}/neg_clipped_frac"] = float(np.nanmean(vals[:, ok]))
    ax.set_xlabel("RL step")
    ax.set_ylabel("clipped share of A<0 tokens")
    ax.set_title("How often negative tokens are clipped")
    ax.legend(fontsize=6)
    fig.suptitle(f"APO ablations: clip placement, anchoring, K (sampled dynamics, G=8, 4 PPO epochs; "
                 f"mean +- std over {sz.seeds} seeds)", fontsize=11)
    return style.save(fig, out, "ablation_clip_anchoring"), info


def quick_sizes(**kw) -> Sizes:
    return dataclasses.replace(QUICK, **kw)
