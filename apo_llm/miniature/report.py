"""The summary of a sweep: per arm and reported split, at the validation-selected and at the final
step, pass@k (seed mean and spread), k*, the paired gap to the base, the share of problems whose
c/n fell or rose, training diagnostics (results{SUFFIX}.json / .md), and the per-step curves
(curves.json). The numbers come from the (n, c) records and the training logs alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from . import selection
from .design import (BASE, CURVE_KEYS, DIAG_KEYS, NULL_ARM, SPLITS, SUFFIX, VALIDATION, Sizes, eval_steps, label_of,
                     run_name)
from .layout import split_counts, train_steps, write_atomic
from .selection import complete, seeds_of
from .stats import crossover_k, gain_over_null, gap_ks, gap_vs_base, p_shift, passk_curve


def diagnostics(run_dir: Path) -> dict[str, float]:
    """Mean of DIAG_KEYS over the second half of the training steps (metrics.jsonl)."""
    late = train_steps(run_dir)
    late = late[len(late) // 2:]
    return {k: float(np.mean([r[k] for r in late if k in r])) for k in DIAG_KEYS if any(k in r for r in late)}


def arm_stats(labs: Sequence[str], by: dict, base: dict, base_curve: np.ndarray, ks: list, n: int) -> dict:
    """pass@k per seed, seed mean / std, k*, p fell / rose and the paired gap of one arm at one point."""
    cur = np.array([passk_curve(by[lab], ks) for lab in labs])  # [seeds, k]
    shifts = [p_shift(by[lab], base) for lab in labs]
    mean = cur.mean(0)
    return {"pass@k": cur.tolist(), "mean": mean.tolist(), "std": cur.std(0).tolist(),
            "k_star": crossover_k(mean, base_curve, ks),
            "share_p_fell": float(np.mean([a for a, _ in shifts])),
            "share_p_rose": float(np.mean([b for _, b in shifts])),
            # {k: [mean, s.e.]} of the paired per-problem gap to base (JSON keys are strings)
            "gap": {str(k): gap_vs_base([by[lab] for lab in labs], base, k) for k in gap_ks(n)}}


def summarize(out: Path, sz: Sizes, split: str = "test") -> dict:
    """results{SUFFIX}.json: per arm its stopping steps (from validation) and, at the selected and at
    the final step, the pass@k curves and the comparisons with base on `split`."""
    if split not in SPLITS:
        raise ValueError(f"split: reported splits are {SPLITS}, got {split!r}")
    ks = list(range(1, sz.n + 1))
    by = split_counts(out, split)
    if len(by.get(BASE, {})) < sz.problems:
        raise ValueError(f"out: {out} has no complete evaluation of the base model on {split!r} yet (rerun the sweep)")
    stops, picks = selection.stop_steps(out, sz), selection.group_picks(out, sz)
    base_curve = passk_curve(by[BASE], ks)
    res: dict = {"split": split, "ks": ks, "sizes": dataclasses.asdict(sz), "base": {"pass@k": base_curve.tolist()},
                 "arms": {}, "stop_steps": stops, "failed": {}, "validation": validation_table(out, sz),
                 "seed_groups": [{"group": list(g), "picked": a} for g, a in picks.items()]}
    for arm in sz.arms:
        seeds = []
        for s in range(seeds_of(arm, sz, picks)):
            run = run_name(arm, s)
            if (out / "runs" / run / "FAILED").is_file():
                res["failed"][run] = (out / "runs" / run / "FAILED").read_text().splitlines()[0]
            points = (label_of(run, stops[run]), label_of(run, sz.steps)) if run in stops else ()
            if points and all(complete(by, lab, sz.problems) for lab in points):
                seeds.append(s)  # not (fully) evaluated yet: no numbers
        if not seeds:
            continue
        runs = [run_name(arm, s) for s in seeds]
        res["arms"][arm] = {
            "seeds": seeds, "stop_step": [stops[r] for r in runs],
            "selected": arm_stats([label_of(r, stops[r]) for r in runs], by, by[BASE], base_curve, ks, sz.n),
            "final": arm_stats([label_of(r, sz.steps) for r in runs], by, by[BASE], base_curve, ks, sz.n),
            "diagnostics": _mean_dicts([diagnostics(out / "runs" / r) for r in runs]),
        }
    add_gain_over_null(res, ks, sz.n)
    write_atomic(out / f"results{SUFFIX[split]}.json", json.dumps(res, indent=1) + "\n")
    write_atomic(out / f"results{SUFFIX[split]}.md", markdown(res, sz) + "\n")
    return res


def add_gain_over_null(res: dict, ks: list, n: int) -> None:
    """Each arm's but GRPO's "vs_null" at both points: {k: [gain, Welch s.e. over seeds]} against GRPO
    at the same point (its own validation-selected step, or its final step), at k of gap_ks(n)."""
    null = res["arms"].get(NULL_ARM)
    if null is None:
        return
    for arm, a in res["arms"].items():
        if arm == NULL_ARM:
            continue
        for point in ("selected", "final"):
            arm, ref = np.array(a[point]["pass@k"]), np.array(null[point]["pass@k"])  # [seeds, k]
            a[point]["vs_null"] = {str(k): gain_over_null(arm[:, ks.index(k)], ref[:, ks.index(k)])
                                   for k in gap_ks(n)}


def _mean_dicts(ds: Sequence[dict]) -> dict:
    return {k: float(np.mean([d[k] for d in ds if k in d])) for k in sorted({k for d in ds for k in d})}


def validation_table(out: Path, sz: Sizes) -> dict[str, dict[int, float]]:
    """{run: {step: validation pass@1}} of every run evaluated at every step (the picture's data)."""
    by = split_counts(out, VALIDATION)
    table: dict[str, dict[int, float]] = {}
    for lab, nc in by.items():
        if "@" in lab and len(nc) >= sz.val_problems:
            run, step = lab.split("@")
            table.setdefault(run, {})[int(step)] = float(passk_curve(nc, [1])[0])
    return table


def curves(out: Path, sz: Sizes, arms: Sequence[str]) -> dict:
    """curves.json: per arm and CURVE_KEYS the per-step values of each seed's training log
    ({"steps": [...], "runs": [[...] per seed]}), and per arm the validation pass@1 per step."""
    val = validation_table(out, sz)
    res: dict = {"keys": list(CURVE_KEYS), "arms": {}}
    for arm in arms:
        logs = [r for r in (train_steps(out / "runs" / run_name(arm, s)) for s in range(sz.more_seeds)) if r]
        if not logs:
            continue
        entry = {}
        for key in CURVE_KEYS:
            rows = [[float(x[key]) for x in log] for log in logs if all(key in x for x in log)]
            m = min(map(len, rows), default=0)
            if m:
                entry[key] = {"steps": [int(x["step"]) for x in logs[0][:m]], "runs": [r[:m] for r in rows]}
        vs = [val[r] for r in (run_name(arm, s) for s in range(sz.more_seeds)) if r in val]
        if vs:
            steps = sorted(set.intersection(*(set(v) for v in vs)))
            entry["validation pass@1"] = {"steps": steps, "runs": [[v[t] for t in steps] for v in vs]}
        res["arms"][arm] = entry
    write_atomic(out / "curves.json", json.dumps(res) + "\n")
    return res


def markdown(res: dict, sz: Sizes) -> str:
    """The README table: one row per arm; at the validation-selected step pass@k (seed mean +- std),
    the paired gap to base (+- s.e. over problems) and the gain over GRPO (+- s.e. over seeds), then
    the same at the final step."""
    kg, n = max(1, sz.n // 4), sz.n
    head = (f"| arm | seeds | stop step | pass@1 | pass@{kg} | pass@{n} | pass@1 − base | pass@{kg} − base "
            f"| pass@1 − grpo | pass@{n} − grpo | k* | final: pass@1 | final: pass@{kg} − base "
            f"| final: pass@{n} − grpo | final k* | clip_grad_frac/neg | KL(old‖ref) |")
    rows = [head, "|" + "---|" * 17]
    base = res["base"]["pass@k"]
    rows.append(f"| base | - | - | {base[0]:.3f} | {base[kg - 1]:.3f} | {base[n - 1]:.3f} |" + " - |" * 11)

    def gap(st, k, key="gap"):
        if key not in st:
            return "-"  # GRPO's own row, or a summary without GRPO
        return "{:+.3f} ± {:.3f}".format(*st[key][str(k)])

    for arm, a in res["arms"].items():
        d, sel, fin = a["diagnostics"], a["selected"], a["final"]
        cells = [f"{sel['mean'][k - 1]:.3f} ± {sel['std'][k - 1]:.3f}" for k in (1, kg, n)]
        ksel = sel["k_star"] if sel["k_star"] is not None else "none"
        kfin = fin["k_star"] if fin["k_star"] is not None else "none"
        ncf = f"{d['clip_grad_frac/neg']:.3f}" if "clip_grad_frac/neg" in d else "-"
        kl = f"{d['kl']:.4f}" if "kl" in d else "-"
        rows.append(f"| {arm} | {len(a['seeds'])} | {', '.join(map(str, a['stop_step']))} | " + " | ".join(cells)
                    + f" | {gap(sel, 1)} | {gap(sel, kg)} | {gap(sel, 1, 'vs_null')} | {gap(sel, n, 'vs_null')}"
                    + f" | {ksel} | {fin['mean'][0]:.3f} ± {fin['std'][0]:.3f} | {gap(fin, kg)}"
                    + f" | {gap(fin, n, 'vs_null')} | {kfin} | {ncf} | {kl} |")
    for run, msg in res["failed"].items():
        rows.append(f"| {run} | FAILED: {msg[:120]} |")
    groups = "; ".join(f"best of {{{', '.join(g['group'])}}}: {g['picked'] or 'not yet known'}"
                       for g in res["seed_groups"])
    rows += ["", f"Stopping step: the highest validation pass@1 among steps {eval_steps(sz)} "
             f"({sz.val_problems} validation problems x {sz.val_n} samples), per run, every arm alike. "
             f"Seeds: {sz.seeds} per arm; {sz.more_seeds} for {groups} (picked on validation). "
             "\"− base\": paired per-problem gap ± s.e. over problems; \"− grpo\": gain over GRPO at the same "
             "point ± Welch s.e. over seeds."]
    return "\n".join(rows)
