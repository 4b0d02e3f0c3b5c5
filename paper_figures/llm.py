"""Figures from LLM-scale outputs: Top-K coverage, trainer runs (metrics.jsonl), evaluator summaries.

Inputs are the files the other tools write; nothing here recomputes a metric they already logged:
    topk_coverage.json          apo_llm.topk_coverage (or computed here with its Python API)
    <run>/metrics.jsonl         apo_llm.train (train step records and eval/pass@k records)
    <run>/config.yaml           apo_llm.train (the loss name picks the colour)
    <eval>/summary.json         apo_llm.evaluate (pass@k with standard errors per model label)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import style


def compute_topk_report(out_dir: Path, quick: bool, limit: Optional[int] = None) -> dict:
    """Top-K coverage of the tiny model on synthetic test solutions (apo_llm.topk_coverage API)."""
    from apo_llm.tiny import ensure_tiny_model
    from apo_llm.topk_coverage import CoverageConfig, run_coverage

    model = ensure_tiny_model(quick=quick)
    cfg = CoverageConfig(model=str(model), dataset="synthetic", split="test", limit=limit or (32 if quick else 256),
                         k="1,2,4,8,16", buckets="8,24", device="cpu", out=str(out_dir))
    return run_coverage(cfg)


def fig_topk(out: Path, report: dict, source: str) -> tuple[list[Path], dict]:
    import matplotlib.pyplot as plt

    from apo_llm.topk_coverage import PAPER_COVERAGE

    ks = [int(k) for k in report["ks"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ks, [100 * report["coverage"][str(k)] for k in ks], "o-", lw=2, color=style.OKABE_ITO["blue"],
            label=f"{source}: all {report['tokens']} solution tokens")
    markers = iter(["s", "^", "v", "D"])
    pal = iter([style.OKABE_ITO["sky"], style.OKABE_ITO["green"], style.OKABE_ITO["purple"], style.OKABE_ITO["orange"]])
    for b in report["buckets"]:
        if b["tokens"]:
            ax.plot(ks, [100 * b["coverage"][str(k)] for k in ks], ls="--", marker=next(markers), color=next(pal),
                    ms=4, label=f"positions {b['positions']} ({b['tokens']} tokens)")
    paper = sorted(PAPER_COVERAGE.items())
    ax.plot([k for k, _ in paper], [100 * v for _, v in paper], "x:", color=style.OKABE_ITO["black"], ms=8,
            label="paper: Qwen2.5-Math-7B on MATH")
    lows = [report["coverage"][str(k)] for k in ks] + [v for _, v in paper]
    lows += [b["coverage"][str(k)] for b in report["buckets"] if b["tokens"] for k in ks]
    bottom = max(0.0, 100 * min(lows) - 5)
    ax.axvline(8, color=style.OKABE_ITO["grey"], lw=0.8)
    ax.text(8.3, bottom + 0.55 * (100 - bottom), "K = 8 (APO default)", fontsize=8, color=style.OKABE_ITO["grey"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (size of the reference Top-K)")
    ax.set_ylabel("true next token inside TopK(pi_ref) (%)")
    ax.set_ylim(bottom, 100.5)
    ax.set_title("Top-K coverage of reference solutions (teacher forcing)")
    ax.legend(loc="lower right", fontsize=7)
    info = {f"coverage@{k}": report["coverage"][str(k)] for k in ks}
    return style.save(fig, out, "topk_coverage"), info


def _read_jsonl(path: Path) -> tuple[list[dict], list[dict]]:
    steps, evals = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if any(k.startswith("eval/") for k in rec) else steps).append(rec)
    return steps, evals


def _run_label(run_dir: Path) -> tuple[str, str]:
    """(legend label, method family for the colour) of a trainer run directory."""
    loss = None
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        loss = (yaml.safe_load(cfg.read_text()) or {}).get("loss", {}).get("name")
    fam = style.family(loss or run_dir.name)
    return f"{run_dir.name} ({loss})" if loss else run_dir.name, fam


def fig_training(out: Path, run_dirs: Sequence[Path]) -> tuple[list[Path], dict]:
    """Reward, held-out pass@k, entropy and APO manifold mass per training run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    info = {}
    seen_fams: dict[str, int] = {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"--train-runs: {run_dir} has no metrics.jsonl (is it an apo_llm.train output dir?)")
        steps, evals = _read_jsonl(path)
        lbl, fam = _run_label(run_dir)
        ls = ["-", "--", ":", "-."][seen_fams.get(fam, 0) % 4]
        seen_fams[fam] = seen_fams.get(fam, 0) + 1
        c = style.color(fam)
        x = [r["step"] for r in steps]
        axes[0].plot(x, [r.get("reward", np.nan) for r in steps], color=c, ls=ls, label=lbl)
        axes[2].plot(x, [r.get("entropy", np.nan) for r in steps], color=c, ls=ls, label=lbl)
        if any("apo/manifold_mass" in r for r in steps):
            axes[3].plot(x, [r.get("apo/manifold_mass", np.nan) for r in steps], color=c, ls=ls, label=lbl)
        if evals:
            ks = sorted({int(k.split("@")[1]) for r in evals for k in r if k.startswith("eval/pass@")})
            for j, k in enumerate(ks):
                axes[1].plot([r["step"] for r in evals], [r.get(f"eval/pass@{k}", np.nan) for r in evals],
                             color=c, ls=ls, marker="os^vD"[j % 5], ms=4, label=f"{lbl} pass@{k}")
            info[run_dir.name] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    titles = [("reward", "mean reward of the rollouts"), ("held-out pass@k", "pass@k (unbiased)"),
              ("entropy of pi_old", "nats per token"), ("APO safe-manifold mass", "pi_theta mass on TopK(pi_ref)")]
    for ax, (t, yl) in zip(axes, titles):
        ax.set_title(t)
        ax.set_xlabel("RL step")
        ax.set_ylabel(yl)
        if ax.lines:
            ax.legend(fontsize=7)
    return style.save(fig, out, "training_curves"), info


def fig_eval(out: Path, eval_dirs: Sequence[Path]) -> tuple[list[Path], dict]:
    """pass@k against k with 1 SE error bars, one curve per (eval dir, model label)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    info = {}
    all_ks: set = set()
    for d in map(Path, eval_dirs):
        path = d / "summary.json"
        if not path.is_file():
            raise ValueError(f"--eval-dirs: {d} has no summary.json (is it an apo_llm.evaluate output dir?)")
        payload = json.loads(path.read_text())
        ks = [int(k) for k in payload["ks"]]
        all_ks.update(ks)
        for lab, entry in payload["models"].items():
            mean = [entry["pass@k"][str(k)]["mean"] for k in ks]
            se = [entry["pass@k"][str(k)]["se"] or 0.0 for k in ks]
            name = lab if len(eval_dirs) == 1 else f"{d.name}/{lab}"
            ax.errorbar(ks, mean, yerr=se, color=style.color(lab), ls=style.linestyle(lab), marker=style.marker(lab),
                        ms=4, capsize=3, label=f"{name} ({entry['problems']} problems, n={entry['n']})")
            info[name] = dict(zip([f"pass@{k}" for k in ks], mean))
    ks = sorted(all_ks)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (unbiased), +-1 SE over problems")
    ax.set_title("Held-out pass@k of base and trained adapters")
    ax.legend(fontsize=7)
    return style.save(fig, out, "eval_passk"), info
