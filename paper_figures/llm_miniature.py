"""The paper's experiment in miniature on a CPU: every arm on the tiny Llama, held-out pass@k, seeds.

    python -m paper_figures.llm_miniature [--quick] [--out DIR] [--arms A B ...] [--seeds N] ...

For each arm (ARMS) and seed: train a LoRA adapter with `apo_llm.train` on the synthetic training
pool, then sample n completions per held-out problem of each held-out split (never trained on)
with the evaluator's `evaluate_model` (same problem batches and sampling seeds for every model:
common random numbers). From the per-problem (n, c) it reports, per arm (seed mean and spread):

    pass@k for k = 1 ... n   unbiased estimator, metrics.pass_at_k (docs/theory.md section 9)
    k*                       the smallest k at which the arm's seed-mean pass@k is below the base's
                             (1: below at every k; None: never below)
    share p fell / rose      share of held-out problems whose c/n is below / above the base's
    diagnostics              step-mean of the trainer's metrics over the second half of training
                             (reward, entropy, kl, apo/* such as apo/neg_clipped_frac)

Held-out splits (SPLITS; each has its own eval dir, results file and figures, suffix SUFFIX[split]):
"test" is drawn like the training pool (1-3 events per problem); "test_hard" has 4 events per
problem, one more than any training problem, so the base model's pass@256 stays below 1 there.

GRPO's checkpoints are also evaluated (GRPO's own trajectory, the null of the frontier figure:
an arm only beats GRPO if it lies above that curve, not just above GRPO's end point).

Resumable: each (arm, seed) trains in its own run directory (a finished one is skipped, an
interrupted one resumes from its last checkpoint) and every evaluated (label, problem) is a line
of eval/per_problem.jsonl (the evaluator's resume unit). Rerunning the same command continues.
An arm that fails (e.g. a reading the trainer cannot compute yet) is recorded in FAILED and
counted in the summary, not retried silently (`--retry-failed` retries it) and not dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from apo_llm.metrics import pass_at_k

# arm -> trainer config overrides {section: {field: value}}. KL coefficients: 1e-3 is the value
# LLM recipes use (verl / TRL examples), 0.1 a strong one; kl_on_wrong applies its KL on A < 0 only.
ARMS: dict[str, dict] = {
    "grpo": {"loss": {"name": "grpo"}},
    "grpo_kl_1e-3": {"loss": {"name": "grpo_kl", "kl_coef": 1e-3}},
    "grpo_kl_0.1": {"loss": {"name": "grpo_kl", "kl_coef": 0.1}},
    "kl_on_wrong": {"loss": {"name": "kl_on_wrong", "kl_coef": 0.1}},
    "apo_ref": {"loss": {"name": "apo", "apo_anchor_norm": "ref"}},
    "apo_old_mass": {"loss": {"name": "apo", "apo_anchor_norm": "old_mass"}},
    "apo_old_token": {"loss": {"name": "apo", "apo_anchor_norm": "old_token"}},
    "psr": {"loss": {"name": "grpo"}, "train": {"advantage": "psr"}},
    "nsr": {"loss": {"name": "grpo"}, "train": {"advantage": "nsr"}},
}
BASE = "base"
NULL_ARM = "grpo"  # its checkpoints are evaluated: the trajectory the frontier compares against
DIAG_KEYS = ("reward", "entropy", "kl", "grad_norm", "clip_ratio/low_mean", "apo/neg_clipped_frac",
             "apo/manifold_mass", "apo/r_anchor_mean", "apo/outside_topk_frac", "apo/pull")


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the sweep's cost. `train` entries are trainer config overrides."""

    arms: tuple[str, ...]
    seeds: int
    steps: int
    problems: int  # held-out problems
    n: int  # samples per held-out problem (pass@k up to k = n)
    trajectory_points: int  # GRPO checkpoints evaluated per seed (besides its end)
    tiny_quick: bool
    train: dict
    splits: tuple[str, ...] = ("test", "test_hard")  # held-out synthetic splits (of SPLITS), each evaluated at n


SUFFIX = {"test": "", "test_hard": "_test_hard"}  # eval{s}/, results{s}.json, llm_miniature{s}_*.png
SPLITS = tuple(SUFFIX)


# 120 steps, four times the demo's 30: at 30 steps no arm narrows the tiny model measurably (README)
FULL = Sizes(arms=tuple(ARMS), seeds=3, steps=120, problems=40, n=256, trajectory_points=3, tiny_quick=False,
             train={})
# CI: the quick tiny model, three arms (one with a "." in its name), one seed, a few steps;
# n = 32 so pass@k runs to k = 32 only
QUICK = Sizes(arms=("grpo", "apo_ref", "grpo_kl_0.1"), seeds=1, steps=2, problems=4, n=32, trajectory_points=1,
              tiny_quick=True,
              train={"train": {"prompts_per_step": 4, "mini_batch_size": 32, "micro_batch_size": 32},
                     "data": {"synthetic_n": 16}, "rollout": {"max_new_tokens": 48}})


# --------------------------------------------------------------------------------------------
# Training one (arm, seed)
# --------------------------------------------------------------------------------------------


def run_config(out: Path, arm: str, seed: int, sz: Sizes, threads: int):
    """The trainer's RunConfig of one arm and seed (the embedded defaults + sizes + the arm)."""
    from apo_llm.config import build_config

    if arm not in ARMS:
        raise ValueError(f"arms: unknown arm {arm!r}; choose from {sorted(ARMS)}")
    every = max(1, sz.steps // (sz.trajectory_points + 1)) if arm == NULL_ARM else 0
    over: dict[str, dict] = {
        "model": {"tiny_quick": sz.tiny_quick},
        "train": {"steps": sz.steps, "seed": seed, "num_threads": threads},
        "data": {"seed": seed},
        "eval": {"every": 0},  # held-out evaluation is the sweep's own, at n samples
        "logging": {"output_dir": str(out / "runs"), "run_name": f"{arm}-s{seed}", "plots": False,
                    "progress": False},
        "checkpoint": {"every": every, "keep_last": sz.steps},
    }
    for extra in (sz.train, ARMS[arm]):
        for section, values in extra.items():
            over.setdefault(section, {}).update(values)
    return build_config(cli=over)


def train_one(out: Path, arm: str, seed: int, sz: Sizes, threads: int, retry: bool = False) -> Optional[str]:
    """Train (or resume, or skip when finished); returns an error message when the arm failed.
    A recorded failure (FAILED) is returned again unless `retry`."""
    from apo_llm.checkpoint import latest_checkpoint
    from apo_llm.train import train

    cfg = run_config(out, arm, seed, sz, threads)
    run_dir = cfg.run_dir
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return None
    failed = run_dir / "FAILED"
    if failed.is_file():
        if not retry:
            return failed.read_text().splitlines()[0]
        failed.unlink()
    if latest_checkpoint(run_dir) is not None:
        cfg.checkpoint.resume = "auto"
    elif run_dir.exists():
        cfg.logging.overwrite = True  # interrupted before its first checkpoint: nothing to keep
    try:
        train(cfg)
    except Exception as err:  # recorded and counted; the sweep goes on with the other arms
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:400]
        run_dir.mkdir(parents=True, exist_ok=True)
        failed.write_text(msg + "\n\n" + traceback.format_exc())
        return msg
    return None


def adapters_of(out: Path, arm: str, seed: int, steps: int) -> dict[str, Path]:
    """{label: adapter dir}: the final adapter, and for NULL_ARM its checkpoints before `steps`."""
    run_dir = out / "runs" / f"{arm}-s{seed}"
    found = {}
    if arm == NULL_ARM:
        for ck in sorted((run_dir / "checkpoints").glob("step-*")):
            if (ck / "COMPLETE").is_file() and int(ck.name.split("-")[1]) < steps:
                found[f"{arm}-s{seed}@{int(ck.name.split('-')[1])}"] = ck / "adapter"
    final = run_dir / "adapter"
    if (final / "adapter_config.json").is_file():
        found[f"{arm}-s{seed}"] = final
    return found


# --------------------------------------------------------------------------------------------
# Held-out evaluation (the evaluator's sampling and resume unit)
# --------------------------------------------------------------------------------------------


def eval_settings(sz: Sizes, threads: int, split: str):
    from apo_llm.evaluate import EvalConfig

    # batch_size = n: one problem per generate call, so every model sees the same per-problem seeds
    return EvalConfig(dataset="synthetic", split=split, n=sz.n, k="1", temperature=1.0, max_new_tokens=
                      int(sz.train.get("rollout", {}).get("max_new_tokens", 64)), limit=sz.problems,
                      batch_size=sz.n, seed=1234, threads=threads)


def evaluate_all(out: Path, adapters: dict[str, Path], sz: Sizes, threads: int) -> None:
    """Sample what each split's per_problem.jsonl lacks for the base model and every adapter."""
    for split in sz.splits:
        _evaluate_split(out, adapters, sz, threads, split)


def _evaluate_split(out: Path, adapters: dict[str, Path], sz: Sizes, threads: int, split: str) -> None:
    from peft import PeftModel

    from apo_llm.evaluate import (PER_PROBLEM_FILE, format_prompts, load_eval_problems, model_context,
                                  read_records, evaluate_model)
    from apo_llm.modeling import load_model_and_tokenizer, peft_trl_deprecation_quiet
    from apo_llm.tiny import ensure_tiny_model

    cfg = eval_settings(sz, threads, split)
    problems, _ = load_eval_problems(cfg.dataset, cfg.split, cfg.limit)
    ev_dir = out / f"eval{SUFFIX[split]}"
    ev_dir.mkdir(parents=True, exist_ok=True)
    settings = {**{k: getattr(cfg, k) for k in ("dataset", "split", "n", "temperature", "max_new_tokens", "seed")},
                "limit": sz.problems, "tiny_quick": sz.tiny_quick}
    check_settings(ev_dir / "settings.json", settings, out)
    out_file = ev_dir / PER_PROBLEM_FILE
    done = {(r["model"], r["problem_id"]) for r in read_records(out_file)}
    todo = [lab for lab in [BASE, *adapters] if any((lab, p.id) not in done for p in problems)]
    if not todo:
        return
    path = ensure_tiny_model(quick=sz.tiny_quick)
    base, tok = load_model_and_tokenizer(str(path), dtype="float32", device="cpu")
    prompts = format_prompts(tok, [p.prompt for p in problems], "auto")
    model = None
    for label in todo:
        if label == BASE:
            base.eval()
            evaluate_model(label, base, tok, problems, prompts, cfg, "synthetic", done, out_file)
            continue
        name = re.sub(r"[^0-9A-Za-z_-]", "_", label)  # torch module names refuse "." (grpo_kl_0.1)
        if model is None:
            with peft_trl_deprecation_quiet():
                model = PeftModel.from_pretrained(base, str(adapters[label]), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(adapters[label]), adapter_name=name, is_trainable=False)
        model.eval()
        with model_context(model, name):
            evaluate_model(label, model, tok, problems, prompts, cfg, "synthetic", done, out_file)


def check_settings(path: Path, settings: dict, sweep: Path) -> None:
    """A sweep directory keeps its evaluation settings: mixing two would compare unlike numbers."""
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"out: {sweep} holds a sweep made with other settings "
                             f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())}); use another --out")
    else:
        write_atomic(path, json.dumps(settings, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Whole file or none: two sweep processes over disjoint --arms may share a directory, and a
    reader must never see a half-written settings or results file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Summary: pass@k, k*, share of problems whose p fell, diagnostics
# --------------------------------------------------------------------------------------------


def counts(records: Sequence[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """{label: {problem_id: (n, c)}}; the last record of a (label, problem) pair wins."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for r in records:
        out.setdefault(r["model"], {})[r["problem_id"]] = (int(r["n"]), int(r["c"]))
    return out


def passk_curve(nc: dict[str, tuple[int, int]], ks: Sequence[int]) -> np.ndarray:
    """Mean over problems of the unbiased pass@k, one value per k."""
    n = np.array([v[0] for v in nc.values()])
    c = np.array([v[1] for v in nc.values()])
    return np.array([float(np.mean(pass_at_k(n, c, k))) for k in ks])


def crossover_k(arm: np.ndarray, base: np.ndarray, ks: Sequence[int]) -> Optional[int]:
    """Smallest k with arm pass@k < base pass@k (1e-9 slack for rounding); None if never."""
    below = np.nonzero(arm < base - 1e-9)[0]
    return int(ks[below[0]]) if below.size else None


def gap_vs_base(runs: Sequence[dict[str, tuple[int, int]]], base: dict[str, tuple[int, int]],
                k: int) -> tuple[float, float]:
    """Paired gap to the base at one k: per problem, the arm's pass@k (mean over its seeds) minus the
    base's; returns (mean over problems, standard error over problems). The s.e. is the spread of the
    problems, the unit both models share, so it says whether the gap exceeds problem-level noise."""
    ids = sorted(base)
    nc = np.array([[r[i] for i in ids] for r in [base, *runs]])  # [1 + seeds, problems, (n, c)]
    per = pass_at_k(nc[..., 0], nc[..., 1], k)  # [1 + seeds, problems]
    d = per[1:].mean(0) - per[0]
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def p_shift(nc: dict[str, tuple[int, int]], base: dict[str, tuple[int, int]]) -> tuple[float, float]:
    """(share of shared problems whose c/n fell below the base's, share whose c/n rose)."""
    ids = [i for i in nc if i in base]
    d = np.array([nc[i][1] / nc[i][0] - base[i][1] / base[i][0] for i in ids])
    return float(np.mean(d < 0)), float(np.mean(d > 0))


def diagnostics(run_dir: Path) -> dict[str, float]:
    """Mean of DIAG_KEYS over the second half of the training steps (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    steps = [r for r in map(json.loads, path.read_text().splitlines()) if "reward" in r]
    late = steps[len(steps) // 2:]
    return {k: float(np.mean([r[k] for r in late if k in r])) for k in DIAG_KEYS if any(k in r for r in late)}


def summarize(out: Path, sz: Sizes, split: str = "test") -> dict:
    """results{SUFFIX}.json: per label the curve, per arm the seed mean / std and the comparisons with base."""
    from apo_llm.evaluate import PER_PROBLEM_FILE, read_records

    ks = list(range(1, sz.n + 1))
    by = counts(read_records(out / f"eval{SUFFIX[split]}" / PER_PROBLEM_FILE))
    if len(by.get(BASE, {})) < sz.problems:
        raise ValueError(f"out: {out} has no complete evaluation of the base model on {split!r} yet (rerun the sweep)")
    base_curve = passk_curve(by[BASE], ks)
    res: dict = {"split": split, "ks": ks, "sizes": dataclasses.asdict(sz), "base": {"pass@k": base_curve.tolist()},
                 "arms": {}, "trajectory": {}, "failed": {}}
    for arm in sz.arms:
        seeds, curves, shifts, diags = [], [], [], []
        for s in range(sz.seeds):
            failed = out / "runs" / f"{arm}-s{s}" / "FAILED"
            if failed.is_file():
                res["failed"][f"{arm}-s{s}"] = failed.read_text().splitlines()[0]
            lab = f"{arm}-s{s}"
            if len(by.get(lab, {})) < sz.problems:  # not (fully) evaluated yet: no numbers
                continue
            seeds.append(s)
            curves.append(passk_curve(by[lab], ks))
            shifts.append(p_shift(by[lab], by[BASE]))
            diags.append(diagnostics(out / "runs" / lab))
        if not seeds:
            continue
        cur = np.array(curves)  # [seeds, k]
        mean = cur.mean(0)
        res["arms"][arm] = {
            "seeds": seeds, "pass@k": cur.tolist(), "mean": mean.tolist(), "std": cur.std(0).tolist(),
            "k_star": crossover_k(mean, base_curve, ks),
            "share_p_fell": float(np.mean([a for a, _ in shifts])),
            "share_p_rose": float(np.mean([b for _, b in shifts])),
            # {k: [mean, s.e.]} of the paired per-problem gap to base (JSON keys are strings)
            "gap": {str(k): gap_vs_base([by[f"{arm}-s{s}"] for s in seeds], by[BASE], k) for k in gap_ks(sz.n)},
            "diagnostics": {k: float(np.mean([d[k] for d in diags if k in d])) for k in {k for d in diags for k in d}},
        }
    for lab in by:  # GRPO's checkpoints: "grpo-s0@10" -> trajectory["grpo-s0"][10] = pass@k curve
        if "@" in lab and len(by[lab]) >= sz.problems:  # a checkpoint still being evaluated waits
            run, step = lab.split("@")
            res["trajectory"].setdefault(run, {})[int(step)] = passk_curve(by[lab], ks).tolist()
    write_atomic(out / f"results{SUFFIX[split]}.json", json.dumps(res, indent=1) + "\n")
    write_atomic(out / f"results{SUFFIX[split]}.md", markdown(res, sz) + "\n")
    return res


def gap_ks(n: int) -> list[int]:
    """The k at which the paired gap to base is reported: 1, n / 4 and n."""
    return sorted({1, max(1, n // 4), n})


def markdown(res: dict, sz: Sizes) -> str:
    """The README table: one row per arm, seed mean +- std across seeds; the paired gap to base at
    k = n / 4 with its standard error over problems."""
    show = [k for k in (1, 4, 16, 64, 256) if k <= sz.n]
    kg = str(max(1, sz.n // 4))  # one of gap_ks(n)
    head = ("| arm | seeds | " + " | ".join(f"pass@{k}" for k in show)
            + f" | k* | pass@{kg} − base (± s.e.) | p fell | p rose | neg_clipped_frac | KL(old‖ref) |")
    rows = [head, "|" + "---|" * (len(show) + 8)]
    base = res["base"]["pass@k"]
    rows.append(f"| base | - | " + " | ".join(f"{base[k - 1]:.3f}" for k in show) + " | - | - | - | - | - | - |")
    for arm, a in res["arms"].items():
        d = a["diagnostics"]
        cells = [f"{a['mean'][k - 1]:.3f} ± {a['std'][k - 1]:.3f}" for k in show]
        ncf = f"{d['apo/neg_clipped_frac']:.3f}" if "apo/neg_clipped_frac" in d else "-"
        kl = f"{d['kl']:.4f}" if "kl" in d else "-"
        rows.append(f"| {arm} | {len(a['seeds'])} | " + " | ".join(cells)
                    + f" | {a['k_star'] if a['k_star'] is not None else 'none'}"
                    + " | {:+.3f} ± {:.3f}".format(*a["gap"][kg]) + f" | {a['share_p_fell']:.2f}"
                    + f" | {a['share_p_rose']:.2f} | {ncf} | {kl} |")
    for run, msg in res["failed"].items():
        rows.append(f"| {run} | FAILED: {msg[:120]} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _style(arm: str) -> dict:
    """Colour from style.color (one per method family); the APO readings and KL strengths by line style."""
    from . import style

    ls = {"apo_old_mass": "--", "apo_old_token": ":", "grpo_kl_0.1": "--", "nsr": "--"}.get(arm, "-")
    col = style.OKABE_ITO["green"] if arm in ("psr", "nsr") else style.color(arm)
    return {"color": col, "ls": ls}


def _marker(arm: str) -> str:
    """Frontier markers: the arms that share a colour (APO readings, KL strengths, psr/nsr) differ here."""
    return {"apo_old_mass": "s", "apo_old_token": "^", "grpo_kl_0.1": "D", "nsr": "v"}.get(arm, "o")


def figures(out_dir: Path, res: dict) -> list[Path]:
    """llm_miniature{SUFFIX}_passk (pass@k and its gap to base, seed bands) and llm_miniature{SUFFIX}_frontier."""
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
        cur = np.array(a["pass@k"])
        lbl = f"{arm} ({len(a['seeds'])} seed{'s' if len(a['seeds']) > 1 else ''})"
        style.band(ax, ks, cur, arm, lbl=lbl, **st)
        style.band(ax2, ks, cur - base, arm, lbl=lbl, **st)
    for a_ in (ax, ax2):
        a_.set_xscale("log", base=2)
        a_.set_xlabel("k (log scale)")
    split = res.get("split", "test")
    tag = SUFFIX[split]
    ax.set_ylabel(f"held-out pass@k (split {split})")
    ax2.set_ylabel("pass@k − base pass@k")
    ax.set_title("held-out pass@k, mean ± std over seeds (base: black dashed)")
    ax2.set_title("gain over the base model")
    ax2.legend(fontsize=7, ncol=2)
    paths = style.save(fig, out_dir, f"llm_miniature{tag}_passk")

    n = int(ks[-1])
    # pass@n is often at the ceiling (the base solves every held-out problem in n samples): a second
    # panel at k = n / 8 keeps room to move
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, k in zip(axes, (n, max(1, n // 8))):
        _frontier(ax, res, base, k)
    axes[1].legend(fontsize=7, ncol=2)
    return paths + style.save(fig, out_dir, f"llm_miniature{tag}_frontier")


def _frontier(ax, res: dict, base: np.ndarray, k: int) -> None:
    """pass@1 against pass@k: each arm's seeds (faint) and mean +- std; GRPO's checkpoints as a path."""
    i = k - 1
    ax.scatter([base[0]], [base[i]], color="black", marker="*", s=140, zorder=5, label="base")
    for run, traj in res["trajectory"].items():  # GRPO's own path: base -> checkpoints -> end
        arm, seed = run.rsplit("-s", 1)
        end = res["arms"].get(arm)
        curves = [traj[s] for s in sorted(traj, key=int)]
        if end is not None and int(seed) in end["seeds"]:
            curves.append(end["pass@k"][end["seeds"].index(int(seed))])
        xs, ys = [base[0]] + [c[0] for c in curves], [base[i]] + [c[i] for c in curves]
        ax.plot(xs, ys, color=_style(arm)["color"], lw=1, alpha=0.6, marker=".",
                label="GRPO trajectory (null)" if run.endswith("-s0") else None)
    off = []  # collapsed arms (mean pass@1 under half the base's) would squeeze the others into a corner
    for arm, a in res["arms"].items():
        cur = np.array(a["pass@k"])
        if cur[:, 0].mean() < 0.5 * base[0]:
            off.append(f"{arm} ({cur[:, 0].mean():.3f}, {cur[:, i].mean():.3f})")
            continue
        col = _style(arm)["color"]
        ax.scatter(cur[:, 0], cur[:, i], color=col, s=14, alpha=0.5)
        ax.errorbar(cur[:, 0].mean(), cur[:, i].mean(), xerr=cur[:, 0].std(), yerr=cur[:, i].std(),
                    color=col, marker=_marker(arm), ms=7, capsize=2, label=arm)
    if off:
        ax.text(0.02, 0.02, "not drawn, pass@1 < base/2:\n" + "\n".join(off), transform=ax.transAxes,
                fontsize=7, va="bottom", ha="left", color="0.3")
    ax.set_xlabel("held-out pass@1")
    ax.set_ylabel(f"held-out pass@{k}")
    ax.set_title(f"pass@1 vs pass@{k} (seeds faint, mean ± std)")


def figures_from(sweep_dir: Path, out_dir: Path) -> tuple[list[Path], dict]:
    """`python -m paper_figures --miniature DIR`: the figures of a finished sweep (every split it has
    results for), and its headline numbers {split: {arm: ...}}."""
    paths, info = [], {}
    for split in SPLITS:
        path = Path(sweep_dir) / f"results{SUFFIX[split]}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        n = res["ks"][-1]
        info[split] = {arm: {"pass@1": a["mean"][0], f"pass@{n}": a["mean"][-1], "k_star": a["k_star"]}
                       for arm, a in res["arms"].items()}
        info[split]["base"] = {"pass@1": res["base"]["pass@k"][0], f"pass@{n}": res["base"]["pass@k"][-1]}
        paths += figures(out_dir, res)
    if not info:
        raise ValueError(f"--miniature: {sweep_dir} has no results.json (run python -m paper_figures.llm_miniature)")
    return paths, info


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_sweep(out: Path, sz: Sizes, threads: int = 1, fig_dir: Optional[Path] = None, log=print,
              retry_failed: bool = False) -> dict[str, dict]:
    """Train every missing (arm, seed), evaluate every missing model, summarize, draw. Resumable.
    Returns {split: results}."""
    import torch
    from tqdm.auto import tqdm

    from apo_llm.cli import quiet_progress_unless_tty

    torch.set_num_threads(max(threads, 1))
    tty = quiet_progress_unless_tty()
    out.mkdir(parents=True, exist_ok=True)
    # arms, seeds and splits may grow between calls; what trains a run may not change
    check_settings(out / "sizes.json", {k: v for k, v in dataclasses.asdict(sz).items()
                                        if k not in ("arms", "seeds", "splits")}, out)
    jobs = [(arm, s) for s in range(sz.seeds) for arm in sz.arms]  # seed-major: a cut sweep has every arm
    t0 = time.perf_counter()
    with tqdm(total=len(jobs), desc="llm_miniature", unit="run", disable=not tty) as bar:
        for arm, s in jobs:
            t1 = time.perf_counter()
            err = train_one(out, arm, s, sz, threads, retry_failed)
            adapters = adapters_of(out, arm, s, sz.steps)
            if adapters:
                evaluate_all(out, adapters, sz, threads)
            msg = f"{arm}-s{s}: " + (f"FAILED ({err})" if err else f"done in {time.perf_counter() - t1:.0f} s")
            (bar.write if tty else log)(f"[llm_miniature] {msg}")
            bar.update(1)
    evaluate_all(out, {}, sz, threads)  # the base model, even when every arm failed
    results = {}
    for split in sz.splits:
        res = results[split] = summarize(out, sz, split)
        res["wall_s"] = time.perf_counter() - t0
        if fig_dir is not None:
            res["figures"] = [str(p) for p in figures(fig_dir, res)]
    return results


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.llm_miniature", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: quick tiny model, 3 arms, 1 seed, 2 steps, n=32")
    ap.add_argument("--out", type=Path, default=None, help="sweep directory (reused = resumed); "
                    "default runs/llm_miniature[_quick]")
    ap.add_argument("--figures", type=Path, default=None,
                    help="where the PNG/PDF go (default: <out>/figures; paper_figures/figures overwrites the README's)")
    ap.add_argument("--arms", nargs="*", default=None, help=f"subset of {list(ARMS)}")
    for name, typ, hlp in (("seeds", int, "seeds per arm"), ("steps", int, "RL steps per run"),
                           ("problems", int, "held-out problems"), ("n", int, "samples per held-out problem"),
                           ("trajectory-points", int, "GRPO checkpoints evaluated per seed")):
        key = name.replace("-", "_")
        ap.add_argument(f"--{name}", type=typ, default=None,
                        help=f"{hlp} (default: {getattr(FULL, key)}, --quick {getattr(QUICK, key)})")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                    help="held-out synthetic splits to evaluate (default: both; test_hard has 4 events per problem)")
    ap.add_argument("--retry-failed", action="store_true", help="train again the (arm, seed) runs recorded in FAILED")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    return ap.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sz = QUICK if args.quick else FULL
    over = {k: getattr(args, k) for k in ("seeds", "steps", "problems", "n", "trajectory_points")
            if getattr(args, k) is not None}
    if args.splits is not None:
        over["splits"] = tuple(dict.fromkeys(args.splits))
    if args.arms is not None:
        bad = [a for a in args.arms if a not in ARMS]
        if bad or not args.arms:
            raise ValueError(f"arms: unknown {bad} (choose from {list(ARMS)})")
        over["arms"] = tuple(args.arms)
    for k, v in over.items():
        if k not in ("arms", "splits") and v < 1:
            raise ValueError(f"{k}: must be >= 1, got {v}")
    return dataclasses.replace(sz, **over)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        sz = sizes_from(args)
        out = args.out or Path("runs") / ("llm_miniature_quick" if args.quick else "llm_miniature")
        results = run_sweep(out, sz, args.threads, args.figures or out / "figures", retry_failed=args.retry_failed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, res in results.items():
        print(f"\nheld-out split {split!r} ({out / f'results{SUFFIX[split]}.json'}):\n" + markdown(res, sz))
    print(f"[llm_miniature] {res['wall_s']:.0f} s; figures in {Path(res['figures'][0]).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
