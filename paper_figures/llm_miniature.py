"""The paper's experiment in miniature on a CPU: every arm on the tiny Llama, selected on validation, pass@k on test.

    python -m paper_figures.llm_miniature [--quick] [--out DIR] [--arms A B ...] [--seeds N] ...

The protocol (docs/miniature.md), the same for every arm, GRPO (the null) included:

1. Train a LoRA adapter with `apo_llm.train` on the synthetic training pool, saving a checkpoint
   every `Sizes.every` steps.
2. Evaluate every checkpoint on the `validation` split (disjoint from train and test, drawn like
   test; apo_llm.data) with val_n samples per problem.
3. Stopping step = `select_best` over the run's validation pass@1 per step (the one selection
   rule; it receives `ValidationScores`, built from validation records only).
4. Evaluate the selected step and the final step on the reported splits (`test`, and `test_hard`
   with 4 events per problem) at n samples per problem (common random numbers across models).
5. Seeds: every arm gets `seeds`; in each group of `more_seeds_for` the arm `select_best` picks
   on validation (seed mean of the validation pass@1 at each seed's stopping step) gets
   `more_seeds`. A group of one arm (GRPO) always gets them.

Reported per arm and split, at the selected and at the final step (seed mean and spread):
pass@k for k = 1 ... n (unbiased, metrics.pass_at_k), k* (the smallest k with pass@k below the
base's), the paired per-problem gap to base at k = 1, n/4, n with its s.e. over problems, the share
of problems whose c/n fell / rose, and training diagnostics; curves.json / the curves figure: per
step entropy, KL(old || ref), manifold mass, the clipped share of the push (`clip_grad_frac/neg`,
which equals `apo/neg_clipped_grad_frac` for APO) and validation pass@1 per arm.

Resumable: each (arm, seed) trains in its own run directory (a finished one is skipped, an
interrupted one resumes from its last checkpoint) and every evaluated (label, problem) is a line
of eval*/per_problem.jsonl (the evaluator's resume unit); labels are "<arm>-s<seed>@<step>".
An arm that fails is recorded in FAILED and counted in the summary, not retried silently
(`--retry-failed` retries it) and not dropped. Several processes over disjoint --arms may share
a directory: a group's extra seeds wait until every arm of the group has its validation numbers.
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
from typing import Any, Optional, Sequence

import numpy as np

from apo_llm.metrics import pass_at_k

BETAS = (0.01, 0.03, 0.1)  # APO's pull weight, per reading: its force depends on what r_anchor divides by
READINGS = {"apo_ref": "ref", "apo_old_mass": "old_mass", "apo_old_token": "old_token"}  # A, C, H
SILENCE_LOSS = "apo_silence"  # the silence-only control (a registered loss term, when there is one)


def _arms() -> dict[str, dict]:
    """arm -> trainer config overrides {section: {field: value}}. KL coefficients: 1e-3 is the value
    LLM recipes use (verl / TRL examples), 0.1 a strong one; kl_on_wrong applies its KL on A < 0 only.
    The silence-only control is listed only when the loss registry has it (apo_llm.objectives)."""
    from apo_llm.objectives import POLICY_TERMS

    arms: dict[str, dict] = {
        "grpo": {"loss": {"name": "grpo"}},
        "grpo_kl_1e-3": {"loss": {"name": "grpo_kl", "kl_coef": 1e-3}},
        "grpo_kl_0.1": {"loss": {"name": "grpo_kl", "kl_coef": 0.1}},
        "kl_on_wrong": {"loss": {"name": "kl_on_wrong", "kl_coef": 0.1}},
    }
    for prefix, reading in READINGS.items():
        for beta in BETAS:
            arms[f"{prefix}_b{beta:g}"] = {"loss": {"name": "apo", "apo_anchor_norm": reading, "apo_beta": beta}}
    if SILENCE_LOSS in POLICY_TERMS:  # silences exactly the tokens reading A at beta 0.1 silences, no pull
        arms[SILENCE_LOSS] = {"loss": {"name": SILENCE_LOSS, "apo_anchor_norm": "ref", "apo_beta": 0.1}}
    arms["psr"] = {"loss": {"name": "grpo"}, "train": {"advantage": "psr"}}
    arms["nsr"] = {"loss": {"name": "grpo"}, "train": {"advantage": "nsr"}}
    return arms


ARMS: dict[str, dict] = _arms()
BASE = "base"
NULL_ARM = "grpo"
A_ARMS = tuple(f"apo_ref_b{b:g}" for b in BETAS)
CH_ARMS = tuple(f"{p}_b{b:g}" for p in ("apo_old_mass", "apo_old_token") for b in BETAS)
KL_ARMS = ("grpo_kl_1e-3", "grpo_kl_0.1")
DIAG_KEYS = ("reward", "entropy", "kl", "grad_norm", "clip_ratio/low_mean", "clip_grad_frac/neg",
             "apo/neg_clipped_frac", "apo/neg_clipped_grad_frac", "apo/manifold_mass", "apo/r_anchor_mean",
             "apo/outside_topk_frac", "apo/pull")
# the per-step curves (one axis each); clip_grad_frac/neg is apo/neg_clipped_grad_frac's formula for every loss
CURVE_KEYS = ("entropy", "kl", "apo/manifold_mass", "clip_grad_frac/neg")
VALIDATION = "validation"


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the sweep's cost and design. `train` entries are trainer config overrides."""

    arms: tuple[str, ...]  # the study's arms (--arms narrows what one process trains, not this)
    seeds: int  # seeds of every arm
    more_seeds: int  # seeds of the arm each group of `more_seeds_for` picks on validation
    more_seeds_for: tuple[tuple[str, ...], ...]
    steps: int
    every: int  # checkpoint interval: the steps evaluated on validation (and the final step)
    problems: int  # problems per reported split
    n: int  # samples per reported problem (pass@k up to k = n)
    val_problems: int  # validation problems
    val_n: int  # samples per validation problem (selection reads pass@1 only)
    tiny_quick: bool
    train: dict
    splits: tuple[str, ...] = ("test", "test_hard")  # reported splits (of SPLITS)


SUFFIX = {"test": "", "test_hard": "_test_hard", VALIDATION: "_validation"}  # eval{s}/, results{s}.*, figures
SPLITS = ("test", "test_hard")  # the reported splits; validation is read by selection only


# 120 steps (at 30 no arm narrows the tiny model measurably); validation every 20 steps. 5 seeds for
# GRPO and for the validation-best of reading A, of the two k3 KL strengths and of readings C / H.
FULL = Sizes(arms=tuple(ARMS), seeds=3, more_seeds=5, more_seeds_for=((NULL_ARM,), A_ARMS, KL_ARMS, CH_ARMS),
             steps=120, every=20, problems=40, n=256, val_problems=40, val_n=64, tiny_quick=False, train={})
# CI: the quick tiny model, three arms (one with a "." in its name), one seed, 2 steps; GRPO and the
# validation-best of the other two get a second seed
QUICK = Sizes(arms=("grpo", "apo_ref_b0.1", "grpo_kl_0.1"), seeds=1, more_seeds=2,
              more_seeds_for=((NULL_ARM,), ("apo_ref_b0.1", "grpo_kl_0.1")), steps=2, every=1, problems=4, n=32,
              val_problems=4, val_n=16, tiny_quick=True,
              train={"train": {"prompts_per_step": 4, "mini_batch_size": 32, "micro_batch_size": 32},
                     "data": {"synthetic_n": 16}, "rollout": {"max_new_tokens": 48}})


# --------------------------------------------------------------------------------------------
# Training one (arm, seed)
# --------------------------------------------------------------------------------------------


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def label_of(run: str, step: int) -> str:
    """Evaluation label of one checkpoint: "grpo_kl_0.1-s0@20"."""
    return f"{run}@{step}"


def eval_steps(sz: Sizes) -> list[int]:
    """The steps every run is evaluated at on validation: each checkpoint and the final step."""
    return sorted(set(range(sz.every, sz.steps + 1, sz.every)) | {sz.steps})


def run_config(out: Path, arm: str, seed: int, sz: Sizes, threads: int):
    """The trainer's RunConfig of one arm and seed (the embedded defaults + sizes + the arm)."""
    from apo_llm.config import build_config

    if arm not in ARMS:
        raise ValueError(f"arms: unknown arm {arm!r}; choose from {sorted(ARMS)}")
    over: dict[str, dict] = {
        "model": {"tiny_quick": sz.tiny_quick},
        "train": {"steps": sz.steps, "seed": seed, "num_threads": threads},
        "data": {"seed": seed},
        "eval": {"every": 0},  # held-out evaluation is the sweep's own
        "logging": {"output_dir": str(out / "runs"), "run_name": run_name(arm, seed), "plots": False,
                    "progress": False},
        "checkpoint": {"every": sz.every, "keep_last": sz.steps},  # every checkpoint is a candidate stop
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


def adapters_of(out: Path, run: str, sz: Sizes, steps: Optional[Sequence[int]] = None) -> dict[str, Path]:
    """{label: adapter dir} of a finished run at `steps` (default: eval_steps); the final step is
    the run's adapter, the others its checkpoints. {} while the run is unfinished."""
    from apo_llm.checkpoint import checkpoint_step

    run_dir = out / "runs" / run
    final = run_dir / "adapter"
    if not (final / "adapter_config.json").is_file():
        return {}
    cks = {checkpoint_step(ck): ck / "adapter" for ck in (run_dir / "checkpoints").glob("step-*")
           if (ck / "COMPLETE").is_file()}
    found = {}
    for step in eval_steps(sz) if steps is None else steps:
        path = final if step == sz.steps else cks.get(step)
        if path is None:
            raise ValueError(f"out: {run_dir} has no checkpoint at step {step} (checkpoint.every {sz.every})")
        found[label_of(run, step)] = path
    return found


# --------------------------------------------------------------------------------------------
# Evaluation (the evaluator's sampling and resume unit)
# --------------------------------------------------------------------------------------------


def split_size(sz: Sizes, split: str) -> tuple[int, int]:
    """(problems, samples per problem) of a split."""
    return (sz.val_problems, sz.val_n) if split == VALIDATION else (sz.problems, sz.n)


def eval_settings(sz: Sizes, threads: int, split: str):
    from apo_llm.evaluate import EvalConfig

    problems, n = split_size(sz, split)
    # batch_size = n: one problem per generate call, so every model sees the same per-problem seeds
    return EvalConfig(dataset="synthetic", split=split, n=n, k="1", temperature=1.0, max_new_tokens=
                      int(sz.train.get("rollout", {}).get("max_new_tokens", 64)), limit=problems,
                      batch_size=n, seed=1234, threads=threads)


def evaluate_split(out: Path, split: str, adapters: dict[str, Path], sz: Sizes, threads: int) -> None:
    """Sample what the split's per_problem.jsonl lacks for the base model and every adapter."""
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
                "limit": cfg.limit, "tiny_quick": sz.tiny_quick}
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
        name = re.sub(r"[^0-9A-Za-z_-]", "_", label)  # torch module names refuse "." and "@"
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


def counts(records: Sequence[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """{label: {problem_id: (n, c)}}; the last record of a (label, problem) pair wins."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for r in records:
        out.setdefault(r["model"], {})[r["problem_id"]] = (int(r["n"]), int(r["c"]))
    return out


def split_counts(out: Path, split: str) -> dict[str, dict[str, tuple[int, int]]]:
    from apo_llm.evaluate import PER_PROBLEM_FILE, read_records

    return counts(read_records(out / f"eval{SUFFIX[split]}" / PER_PROBLEM_FILE))


# --------------------------------------------------------------------------------------------
# Selection: reads the validation split only, one rule for every arm and GRPO alike
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationScores:
    """Validation pass@1 per candidate (a step of one run, or an arm of a group): all that selection
    sees. Built only by `validation_scores` from the validation split's (n, c) records."""

    scores: dict  # candidate -> validation pass@1, in candidate order (earlier steps first)
    split: str = VALIDATION


def select_best(val: ValidationScores) -> Any:
    """THE selection rule: the candidate with the highest validation pass@1; a tie goes to the first
    (the earlier step, the arm listed first). It refuses anything but validation scores."""
    if not isinstance(val, ValidationScores) or val.split != VALIDATION:
        raise ValueError(f"selection: reads the {VALIDATION!r} split only, got {getattr(val, 'split', val)!r}")
    if not val.scores:
        raise ValueError("selection: no candidate has validation scores")
    best = None
    for cand, score in val.scores.items():
        if best is None or score > val.scores[best]:
            best = cand
    return best


def validation_scores(val_counts: dict, scores_of: dict) -> ValidationScores:
    """ValidationScores from {candidate: [labels]} over the validation (n, c) records: each
    candidate's pass@1 is the mean over its labels (the seeds of an arm) of the mean over problems."""
    out = {}
    for cand, labels in scores_of.items():
        out[cand] = float(np.mean([passk_curve(val_counts[lab], [1])[0] for lab in labels]))
    return ValidationScores(out)


def _complete(by: dict, label: str, problems: int) -> bool:
    return len(by.get(label, {})) >= problems


def stop_steps(out: Path, sz: Sizes, val_counts: Optional[dict] = None) -> dict[str, int]:
    """{run: its stopping step}: for every run whose checkpoints all have validation numbers,
    select_best over its validation pass@1 per step (GRPO's runs like every other)."""
    by = split_counts(out, VALIDATION) if val_counts is None else val_counts
    runs = sorted({lab.split("@")[0] for lab in by if "@" in lab})
    steps, chosen = eval_steps(sz), {}
    for run in runs:
        labels = {step: label_of(run, step) for step in steps}
        if all(_complete(by, lab, sz.val_problems) for lab in labels.values()):
            chosen[run] = select_best(validation_scores(by, {s: [lab] for s, lab in labels.items()}))
    return chosen


def group_picks(out: Path, sz: Sizes) -> dict[tuple[str, ...], Optional[str]]:
    """{group: the arm select_best picks for more seeds, or None while a group arm's first `seeds`
    seeds lack validation numbers}. An arm whose runs all failed is not a candidate."""
    by = split_counts(out, VALIDATION)
    stops = stop_steps(out, sz, by)
    picks: dict[tuple[str, ...], Optional[str]] = {}
    for group in sz.more_seeds_for:
        if len(group) == 1:  # nothing to choose: GRPO, the null, always gets its extra seeds
            picks[group] = group[0]
            continue
        cands, ready = {}, True
        for arm in group:
            runs = [run_name(arm, s) for s in range(sz.seeds)]
            ok = [r for r in runs if r in stops]
            failed = [r for r in runs if (out / "runs" / r / "FAILED").is_file()]
            if len(ok) + len(failed) < len(runs):
                ready = False
            elif ok:
                cands[arm] = [label_of(r, stops[r]) for r in ok]  # each seed at its own stopping step
        picks[group] = select_best(validation_scores(by, cands)) if ready and cands else None
    return picks


def seeds_of(arm: str, sz: Sizes, picks: dict) -> int:
    return sz.more_seeds if arm in picks.values() else sz.seeds


# --------------------------------------------------------------------------------------------
# Summary: pass@k, k*, paired gap to base, share of problems whose p fell, diagnostics, curves
# --------------------------------------------------------------------------------------------


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


def _train_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "reward" in r]


def diagnostics(run_dir: Path) -> dict[str, float]:
    """Mean of DIAG_KEYS over the second half of the training steps (metrics.jsonl)."""
    late = _train_steps(run_dir)
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
    stops, picks = stop_steps(out, sz), group_picks(out, sz)
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
            if points and all(_complete(by, lab, sz.problems) for lab in points):
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
    write_atomic(out / f"results{SUFFIX[split]}.json", json.dumps(res, indent=1) + "\n")
    write_atomic(out / f"results{SUFFIX[split]}.md", markdown(res, sz) + "\n")
    return res


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
        logs = [r for r in (_train_steps(out / "runs" / run_name(arm, s)) for s in range(sz.more_seeds)) if r]
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


def gap_ks(n: int) -> list[int]:
    """The k at which the paired gap to base is reported: 1, n / 4 and n."""
    return sorted({1, max(1, n // 4), n})


def markdown(res: dict, sz: Sizes) -> str:
    """The README table: one row per arm; at the validation-selected step pass@k (seed mean +- std)
    and the paired gap to base (+- s.e. over problems), then the same at the final step."""
    kg, n = max(1, sz.n // 4), sz.n
    head = (f"| arm | seeds | stop step | pass@1 | pass@{kg} | pass@{n} | pass@1 − base | pass@{kg} − base | k* "
            f"| final: pass@1 | final: pass@{kg} − base | final k* | clip_grad_frac/neg | KL(old‖ref) |")
    rows = [head, "|" + "---|" * 14]
    base = res["base"]["pass@k"]
    rows.append(f"| base | - | - | {base[0]:.3f} | {base[kg - 1]:.3f} | {base[n - 1]:.3f} |" + " - |" * 8)

    def gap(st, k):
        return "{:+.3f} ± {:.3f}".format(*st["gap"][str(k)])

    for arm, a in res["arms"].items():
        d, sel, fin = a["diagnostics"], a["selected"], a["final"]
        cells = [f"{sel['mean'][k - 1]:.3f} ± {sel['std'][k - 1]:.3f}" for k in (1, kg, n)]
        ksel = sel["k_star"] if sel["k_star"] is not None else "none"
        kfin = fin["k_star"] if fin["k_star"] is not None else "none"
        ncf = f"{d['clip_grad_frac/neg']:.3f}" if "clip_grad_frac/neg" in d else "-"
        kl = f"{d['kl']:.4f}" if "kl" in d else "-"
        rows.append(f"| {arm} | {len(a['seeds'])} | {', '.join(map(str, a['stop_step']))} | " + " | ".join(cells)
                    + f" | {gap(sel, 1)} | {gap(sel, kg)} | {ksel} | {fin['mean'][0]:.3f} ± {fin['std'][0]:.3f}"
                    + f" | {gap(fin, kg)} | {kfin} | {ncf} | {kl} |")
    for run, msg in res["failed"].items():
        rows.append(f"| {run} | FAILED: {msg[:120]} |")
    groups = "; ".join(f"best of {{{', '.join(g['group'])}}}: {g['picked'] or 'not yet known'}"
                       for g in res["seed_groups"])
    rows += ["", f"Stopping step: the highest validation pass@1 among steps {eval_steps(sz)} "
             f"({sz.val_problems} validation problems x {sz.val_n} samples), per run, every arm alike. "
             f"Seeds: {sz.seeds} per arm; {sz.more_seeds} for {groups} (picked on validation)."]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


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
        ax.scatter([xs[1]], [ys[1]], facecolors="none", edgecolors=col, marker=_marker(arm), s=40)
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
        raise ValueError(f"--miniature: {sweep_dir} has no results.json (run python -m paper_figures.llm_miniature)")
    cpath = Path(sweep_dir) / "curves.json"
    if cpath.is_file():
        paths += fig_curves(out_dir, json.loads(cpath.read_text()))
    return paths, info


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def process_run(out: Path, arm: str, seed: int, sz: Sizes, threads: int, retry: bool) -> Optional[str]:
    """Train one (arm, seed), evaluate its checkpoints on validation, select its stopping step,
    evaluate the selected and the final step on the reported splits. Returns an error, if any."""
    err = train_one(out, arm, seed, sz, threads, retry)
    run = run_name(arm, seed)
    ads = adapters_of(out, run, sz)
    if not ads:
        return err
    evaluate_split(out, VALIDATION, ads, sz, threads)
    stop = stop_steps(out, sz)[run]
    points = {lab: ads[lab] for lab in (label_of(run, stop), label_of(run, sz.steps))}
    for split in sz.splits:
        evaluate_split(out, split, points, sz, threads)
    return err


def run_sweep(out: Path, sz: Sizes, threads: int = 1, fig_dir: Optional[Path] = None, log=print,
              retry_failed: bool = False, only: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Train and evaluate every missing (arm, seed) of `only` (default: every arm), then each group's
    extra seeds once the group is decided; summarize, draw. Resumable. Returns {split: results}."""
    import torch
    from tqdm.auto import tqdm

    from apo_llm.cli import quiet_progress_unless_tty

    torch.set_num_threads(max(threads, 1))
    tty = quiet_progress_unless_tty()
    out.mkdir(parents=True, exist_ok=True)
    # arms, seeds and splits may grow between calls; what trains a run may not change
    check_settings(out / "sizes.json", {k: v for k, v in dataclasses.asdict(sz).items()
                                        if k not in ("arms", "seeds", "more_seeds", "more_seeds_for", "splits")}, out)
    mine = [a for a in sz.arms if only is None or a in only]
    t0 = time.perf_counter()

    def do(jobs, bar):
        for arm, s in jobs:
            t1 = time.perf_counter()
            err = process_run(out, arm, s, sz, threads, retry_failed)
            msg = f"{run_name(arm, s)}: " + (f"FAILED ({err})" if err else f"done in {time.perf_counter() - t1:.0f} s")
            (bar.write if tty else log)(f"[llm_miniature] {msg}")
            bar.update(1)

    jobs = [(arm, s) for s in range(sz.seeds) for arm in mine]  # seed-major: a cut sweep has every arm
    with tqdm(total=len(jobs), desc="llm_miniature", unit="run", disable=not tty) as bar:
        do(jobs, bar)
        # the groups' extra seeds: known once every arm of a group has its first seeds on validation
        picked = [a for a in group_picks(out, sz).values() if a is not None and a in mine]
        more = [(arm, s) for s in range(sz.seeds, sz.more_seeds) for arm in dict.fromkeys(picked)]
        bar.total += len(more)
        do(more, bar)
    for split in (VALIDATION, *sz.splits):
        evaluate_split(out, split, {}, sz, threads)  # the base model, even when every arm failed
    results = {}
    cur = curves(out, sz, sz.arms)
    for split in sz.splits:
        res = results[split] = summarize(out, sz, split)
        res["wall_s"] = time.perf_counter() - t0
        if fig_dir is not None:
            res["figures"] = [str(p) for p in figures(fig_dir, res)]
    if fig_dir is not None and cur["arms"]:
        results[sz.splits[0]]["figures"] += [str(p) for p in fig_curves(fig_dir, cur)]
    return results


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.llm_miniature", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: quick tiny model, 3 arms, 1-2 seeds, 2 steps, n=32")
    ap.add_argument("--out", type=Path, default=None, help="sweep directory (reused = resumed); "
                    "default runs/llm_miniature[_quick]")
    ap.add_argument("--figures", type=Path, default=None,
                    help="where the PNG/PDF go (default: <out>/figures; paper_figures/figures overwrites the README's)")
    ap.add_argument("--arms", nargs="*", default=None,
                    help=f"train only these of the preset's arms (several processes may share --out); of {list(ARMS)}")
    for name, hlp in (("seeds", "seeds per arm"), ("more-seeds", "seeds of each group's validation-best arm"),
                      ("steps", "RL steps per run"), ("every", "checkpoint / validation interval in steps"),
                      ("problems", "problems per reported split"), ("n", "samples per reported problem"),
                      ("val-problems", "validation problems"), ("val-n", "samples per validation problem")):
        key = name.replace("-", "_")
        ap.add_argument(f"--{name}", type=int, default=None,
                        help=f"{hlp} (default: {getattr(FULL, key)}, --quick {getattr(QUICK, key)})")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                    help="reported splits to evaluate (default: both; test_hard has 4 events per problem)")
    ap.add_argument("--retry-failed", action="store_true", help="train again the (arm, seed) runs recorded in FAILED")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    return ap.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sz = QUICK if args.quick else FULL
    over = {k: getattr(args, k) for k in ("seeds", "more_seeds", "steps", "every", "problems", "n", "val_problems",
                                          "val_n") if getattr(args, k) is not None}
    if args.splits is not None:
        over["splits"] = tuple(dict.fromkeys(args.splits))
    for k, v in over.items():
        if k != "splits" and v < 1:
            raise ValueError(f"{k}: must be >= 1, got {v}")
    sz = dataclasses.replace(sz, **over)
    if sz.more_seeds < sz.seeds:
        sz = dataclasses.replace(sz, more_seeds=sz.seeds)  # --seeds above the preset's more_seeds: all alike
    if sz.every > sz.steps:
        raise ValueError(f"every: must be <= steps ({sz.steps}), got {sz.every}")
    return sz


def only_arms(args: argparse.Namespace, sz: Sizes) -> Optional[tuple[str, ...]]:
    if args.arms is None:
        return None
    bad = [a for a in args.arms if a not in sz.arms]
    if bad or not args.arms:
        raise ValueError(f"arms: {bad or 'none given'} not in this preset's arms {list(sz.arms)}")
    return tuple(args.arms)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        sz = sizes_from(args)
        only = only_arms(args, sz)
        out = args.out or Path("runs") / ("llm_miniature_quick" if args.quick else "llm_miniature")
        results = run_sweep(out, sz, args.threads, args.figures or out / "figures", retry_failed=args.retry_failed,
                            only=only)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, res in results.items():
        print(f"\nreported split {split!r} ({out / f'results{SUFFIX[split]}.json'}):\n" + markdown(res, sz))
    print(f"[llm_miniature] {res['wall_s']:.0f} s; figures in {Path(res['figures'][0]).parent}")
    return 0


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does
    sys.exit(main())
