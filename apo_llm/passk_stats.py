"""pass@k statistics from saved per-problem counts (n, c), and their tables and plot.

    pass@k   = 1 - C(n-c, k) / C(n, k)     (apo_llm.metrics.pass_at_k, unbiased) per problem,
    mean, SE = over problems, SE = std(ddof=1) / sqrt(P) (it does not include the within-problem
               sampling noise),
    paired   = pass@k(model) - pass@k(reference) per problem, then mean and SE of the differences.

Pure functions of the records of `per_problem.jsonl` (apo_llm.eval_store); the evaluator
(apo_llm.evaluate) and the trainer's closing report (`training_report`) both use them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from apo_llm.metrics import pass_at_k

def mean_se(values: Sequence[float]) -> dict:
    """Mean and standard error across problems, SE = std(ddof=1) / sqrt(P) (None for P < 2)."""
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return {"mean": float(x.mean()), "se": se}


def summarize(records: Sequence[dict], ks: Sequence[int], *, labels: Optional[Sequence[str]] = None,
              problem_ids: Optional[Sequence[str]] = None) -> dict:
    """Per model label: unbiased pass@k for each k, greedy pass@1, mean@n, each with an SE.

    Only records whose problem is in `problem_ids` count (when given), so a rerun with a smaller
    --limit summarizes just those problems. The last record of a (model, problem) pair wins.
    """
    keep = None if problem_ids is None else set(problem_ids)
    by_label: dict[str, dict[str, dict]] = {}
    for rec in records:
        if keep is None or rec["problem_id"] in keep:
            by_label.setdefault(rec["model"], {})[rec["problem_id"]] = rec
    order = list(labels) if labels is not None else list(by_label)
    out: dict[str, dict] = {}
    for label in order:
        recs = list(by_label.get(label, {}).values())
        if not recs:
            continue
        n = np.array([r["n"] for r in recs])
        c = np.array([r["c"] for r in recs])
        bad = [k for k in ks if k > n.min()]
        if bad:
            raise ValueError(f"k: {bad} exceed the saved n={int(n.min())} samples per problem of model {label!r}")
        entry = {"problems": len(recs), "n": int(n.min()),
                 "pass@k": {str(k): mean_se(np.atleast_1d(pass_at_k(n, c, k))) for k in ks}}
        if all("greedy_correct" in r for r in recs):
            entry["greedy_pass@1"] = mean_se([float(r["greedy_correct"]) for r in recs])
        if all("mean_reward" in r for r in recs):
            entry["mean@n"] = mean_se([r["mean_reward"] for r in recs])
        if all("n_truncated" in r for r in recs):
            entry["truncated_frac"] = float(sum(r["n_truncated"] for r in recs) / n.sum())
        out[label] = entry
    return out


def paired_deltas(records: Sequence[dict], ks: Sequence[int], reference: str, labels: Sequence[str],
                  problem_ids: Optional[Sequence[str]] = None) -> dict:
    """pass@k(label) - pass@k(reference) per problem, averaged over the problems both have.

    Paired differences remove the between-problem variance, so their SE is the right one for
    "is the apo adapter better than the grpo one / the base" (much smaller than either SE alone).
    """
    keep = None if problem_ids is None else set(problem_ids)
    table: dict[str, dict[str, tuple[int, int]]] = {}
    for rec in records:
        if keep is None or rec["problem_id"] in keep:
            table.setdefault(rec["model"], {})[rec["problem_id"]] = (rec["n"], rec["c"])
    out = {}
    for label in labels:
        shared = sorted(set(table.get(label, {})) & set(table.get(reference, {})))
        if label == reference or not shared:
            continue
        n1, c1 = np.array([table[label][p] for p in shared]).T
        n0, c0 = np.array([table[reference][p] for p in shared]).T
        out[label] = {"reference": reference, "problems": len(shared),
                      "pass@k": {str(k): mean_se(np.atleast_1d(pass_at_k(n1, c1, k) - pass_at_k(n0, c0, k)))
                                 for k in ks}}
    return out


NOISE_SE = 2.0  # a change smaller than 2 standard errors is reported as "within noise"


def verdict(stat: dict) -> str:
    """'up' / 'down' when |mean| >= NOISE_SE s.e., else 'within noise' (no s.e.: 'no s.e.')."""
    if stat["se"] is None:
        return "no s.e."
    if abs(stat["mean"]) < NOISE_SE * stat["se"]:
        return "within noise"
    return "up" if stat["mean"] > 0 else "down"


def held_out_change(first: dict, last: dict, n: int, ks: Sequence[int]) -> dict:
    """Two held-out evaluations of the same problems at the same sampling seed (the trainer's
    `eval/...` records with per-problem correct counts under "correct"): pass@k of each (mean ± s.e.
    over problems) and the paired per-problem change last - first (mean ± s.e.), by summarize and
    paired_deltas. Returns {k: {"first", "last", "change", "verdict"}}."""
    a, b = f"step {first['step']}", f"step {last['step']}"
    recs = [{"model": lab, "problem_id": str(i), "n": n, "c": int(c)}
            for lab, ev in ((a, first), (b, last)) for i, c in enumerate(ev["correct"])]
    s = summarize(recs, ks, labels=[a, b])
    d = paired_deltas(recs, ks, a, [b])[b]["pass@k"]
    return {k: {"first": s[a]["pass@k"][str(k)], "last": s[b]["pass@k"][str(k)], "change": d[str(k)],
                "verdict": verdict(d[str(k)])} for k in ks}


def training_report(steps: Sequence[dict], evals: Sequence[dict], n: int, window: int = 5) -> str:
    """The trainer's closing summary: the training reward of the first vs the last `window` steps
    (mean ± s.e. over steps) and every held-out pass@k at the first and last evaluation with the
    paired change and its s.e., each with a plain word; says so when nothing moved beyond noise."""
    lines = []
    rewards = [r["reward"] for r in steps if r.get("reward") is not None]
    if len(rewards) >= 2 * window:
        r0, r1 = mean_se(rewards[:window]), mean_se(rewards[-window:])
        diff = {"mean": r1["mean"] - r0["mean"], "se": math.hypot(r0["se"], r1["se"])}
        lines.append(f"training reward (mean of the first vs last {window} steps ± s.e. over steps): "
                     f"{_fmt(r0)} -> {_fmt(r1)}, change {_fmt(diff, signed=True)}: {verdict(diff)}")
    evals = [e for e in evals if "correct" in e]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        ks = sorted(int(k.split("@")[1]) for k in first if k.startswith("eval/pass@"))
        change = held_out_change(first, last, n, ks)
        lines.append(f"held-out ({len(first['correct'])} problems x {n} samples, ± s.e. over problems), "
                     f"step {first['step']} -> {last['step']}:")
        lines += [f"  pass@{k}: {_fmt(c['first'])} -> {_fmt(c['last'])}, paired change "
                  f"{_fmt(c['change'], signed=True)}: {c['verdict']}" for k, c in change.items()]
        if all(c["verdict"] == "within noise" for c in change.values()):
            lines.append("held-out pass@k did not change beyond noise: a run this short shows the pipeline, "
                         "not a method's effect; the comparison of methods with its uncertainty is "
                         "`python -m apo_llm.miniature` (docs/results.md)")
    return "\n".join(lines)


def _fmt(stat: Optional[dict], signed: bool = False) -> str:
    if not stat:
        return "-"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return mean + ("" if stat["se"] is None else f" ± {stat['se']:.3f}")


def markdown_table(summary: dict, ks: Sequence[int]) -> str:
    """One row per model: problems, greedy pass@1, mean@n, pass@k for each k (mean ± SE)."""
    head = ["model", "problems", "greedy pass@1", "mean@n"] + [f"pass@{k}" for k in ks] + ["truncated"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in summary.items():
        cells = [label, str(e["problems"]), _fmt(e.get("greedy_pass@1")), _fmt(e.get("mean@n"))]
        cells += [_fmt(e["pass@k"].get(str(k))) for k in ks]
        cells.append("-" if "truncated_frac" not in e else f"{100 * e['truncated_frac']:.1f}%")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_deltas(deltas: dict, ks: Sequence[int]) -> str:
    """Paired differences to the reference model, one row per other model (mean ± SE)."""
    head = ["model - reference", "problems"] + [f"Δ pass@{k}" for k in ks]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, d in deltas.items():
        cells = [f"{label} - {d['reference']}", str(d["problems"])] + [_fmt(d["pass@k"][str(k)], signed=True) for k in ks]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_pass_at_k(summary: dict, ks: Sequence[int], path: str | Path, title: str = "") -> None:
    """pass@k against k on a log2 axis, one curve per model, error bars = 1 SE across problems."""
    import matplotlib.pyplot as plt  # the backend is the caller's: a notebook keeps its inline plots

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, e in summary.items():
        stats = [e["pass@k"][str(k)] for k in ks]
        ax.errorbar(ks, [s["mean"] for s in stats], yerr=[s["se"] or 0.0 for s in stats],
                    marker="o", capsize=3, label=f"{label} (P={e['problems']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (unbiased)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
