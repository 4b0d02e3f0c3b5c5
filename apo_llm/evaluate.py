"""Unbiased pass@k evaluator: `python -m apo_llm.evaluate`.

APO's claim is about Pass@1 *and* Pass@K, so every model (the base and each LoRA adapter) is
scored the same way:

    sample n >= max(k) completions per problem at temperature > 0,
    c        = number of them the reward function marks correct,
    pass@k   = 1 - C(n-c, k) / C(n, k)          (apo_llm.metrics.pass_at_k, unbiased),
    greedy   = one greedy completion per problem (greedy pass@1),
    mean@n   = mean reward of the n samples,

each averaged over problems with a standard error across problems (std / sqrt(P); it does not
include the within-problem sampling noise).

Files in --out:
    per_problem.jsonl   one line per (model label, problem): n, c, greedy_correct, ... (append-only,
                        flushed after every problem batch; the resume key is (model, problem_id))
    run_config.json     the sampling settings; a rerun with different ones is refused
    summary.json        the aggregated numbers (recomputable for any k <= n with --summary-only)
    pass_at_k.png       pass@k against k (log2 axis), one curve per model, error bars = 1 SE

Sampling, scoring and model loading are the trainer's: `rollout.generate_completions`,
`rewards.score_completions`, `modeling.load_model_and_tokenizer`; pass@k is `metrics.pass_at_k`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from apo_llm.data import load_eval_problems, parse_dataset
from apo_llm.cli import MIN_TEMPERATURE, build_parser, check_model_spec, check_shared_fields, cli_field, parse_ks
from apo_llm.metrics import pass_at_k
from apo_llm.modeling import load_base_model, peft_trl_deprecation_quiet
from apo_llm.prompts import format_prompts

PER_PROBLEM_FILE = "per_problem.jsonl"
SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "run_config.json"
PLOT_FILE = "pass_at_k.png"
BASE_LABEL = "base"
# Settings that change what a (model, problem) line means: a resumed run must keep them.
SAMPLING_KEYS = ("model", "dataset", "split", "n", "temperature", "top_p", "max_new_tokens", "seed",
                 "reward", "correct_threshold", "chat_template")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Everything `python -m apo_llm.evaluate` takes; each field is one CLI flag (--field-name)."""

    model: Optional[str] = cli_field(None, "base model: hub id or local path (default: the embedded tiny model)")
    adapters: list[str] = cli_field([], "LoRA adapter dirs, hub ids or training output dirs", nargs="*")
    labels: list[str] = cli_field([], "one label per adapter (default: the adapter directory name)", nargs="*")
    no_base: bool = cli_field(False, "do not evaluate the base model (label 'base')")
    dataset: str = cli_field("synthetic", "gsm8k | math500 | math | synthetic | jsonl:PATH | parquet:PATH")
    split: str = cli_field("test", "dataset split: gsm8k train | test; math train | test; math500 test; synthetic "
                                   "any name is its own stream (test; test_hard has 4 events per problem)")
    n: int = cli_field(16, "samples per problem (n >= max k)")
    k: str = cli_field("1,4,16", "comma-separated k values for pass@k")
    temperature: float = cli_field(1.0, "sampling temperature (> 0)")
    top_p: float = cli_field(1.0, "nucleus sampling top-p in (0, 1]")
    max_new_tokens: int = cli_field(256, "generation length limit")
    limit: Optional[int] = cli_field(None, "evaluate only the first LIMIT problems")
    out: str = cli_field("runs/eval", "output directory; reused = resumed (per_problem.jsonl is extended, "
                                 "summary.json and pass_at_k.png are overwritten)")
    batch_size: int = cli_field(64, "sequences per generate call (batch_size // n problems per call)")
    seed: int = cli_field(0, "sampling seed (each problem batch gets a seed derived from it)")
    save_completions: bool = cli_field(False, "store every completion and its reward in per_problem.jsonl")
    reward: Optional[str] = cli_field(None, "gsm8k_strict | gsm8k_flexible | math | synthetic (default: the dataset's)")
    correct_threshold: float = cli_field(0.5, "a sample counts as correct when reward > threshold")
    chat_template: str = cli_field("auto", "auto (use the tokenizer's chat template if it has one) | on | off")
    dtype: Optional[str] = cli_field(None, "model dtype (default: bfloat16 on GPU, float32 on CPU)")
    device: Optional[str] = cli_field(None, "cpu | cuda | ... (default: cuda if available)")
    threads: int = cli_field(0, "torch CPU threads (0 = torch default; 1 is fastest for tiny models)")
    summary_only: bool = cli_field(False, "only recompute summary/plot/table from per_problem.jsonl (no sampling)")

    @property
    def ks(self) -> list[int]:
        return parse_ks(self.k)

    def validate(self) -> None:
        """Raise ValueError naming the offending field; cheap checks only (nothing is loaded)."""
        ks = self.ks  # raises on junk
        if self.n < 1:
            raise ValueError(f"n: need at least one sample per problem, got {self.n}")
        if max(ks) > self.n:
            raise ValueError(f"k: pass@{max(ks)} needs n >= {max(ks)} samples per problem, but n={self.n}")
        if not self.temperature >= MIN_TEMPERATURE:
            raise ValueError(f"temperature: must be >= {MIN_TEMPERATURE:g} (below it sampling is not finite; greedy "
                             f"pass@1 is always run separately), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must lie in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_shared_fields(self)
        if self.labels and len(self.labels) != len(self.adapters):
            raise ValueError(f"labels: got {len(self.labels)} labels for {len(self.adapters)} adapters")
        if self.no_base and not self.adapters and not self.summary_only:
            raise ValueError("no_base: nothing to evaluate (no adapters given and --no-base set)")
        parse_dataset(self.dataset)


def resolve_adapter(spec: str) -> str:
    """Local adapter dir, or a training output dir holding one, or a hub id -> what peft loads.

    A training output directory is searched for adapter_config.json: `adapter/` first, then a
    single match anywhere below, else the most recently written one (with a warning).
    Missing paths raise ValueError here, before any model is loaded or sampled.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return str(path)
        found = sorted(path.rglob("adapter_config.json"))
        if not found:
            raise ValueError(f"adapters: {spec!r} is a directory without adapter_config.json (none below it either)")
        preferred = [p for p in found if p.parent == path / "adapter"]
        if preferred:
            return str(preferred[0].parent)
        if len(found) > 1:
            newest = max(found, key=lambda p: p.stat().st_mtime)
            warnings.warn(f"adapters: {spec!r} holds {len(found)} adapters; using the newest, {newest.parent}")
            return str(newest.parent)
        return str(found[0].parent)
    if path.exists():
        raise ValueError(f"adapters: {spec!r} is a file, not an adapter directory")
    from apo_llm.cli import looks_local

    # 'runs/x/adapter' or './x' is a missing local path: fail now, not after the hub client's retries
    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not looks_local(spec)
    if not hub_like or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ValueError(f"adapters: {spec!r} does not exist locally"
                         + ("" if not hub_like else " (and HF_HUB_OFFLINE is set, so it cannot be a hub id)"))
    return spec  # a hub id; peft downloads it (errors are wrapped in load_adapters)


def adapter_labels(specs: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Given labels, or the last path component of each adapter; unique and never 'base'."""
    out: list[str] = []
    for i, spec in enumerate(specs):
        label = labels[i] if labels else (Path(spec.rstrip("/")).name or f"adapter{i}")
        if label == BASE_LABEL:
            label = f"{label}_adapter"
        while label in out:
            label = f"{label}_{i}"
        out.append(label)
    if labels and len(set(labels)) != len(labels):
        raise ValueError(f"labels: must be unique, got {list(labels)}")
    return out


# --------------------------------------------------------------------------------------------
# per_problem.jsonl: append-only store, resume key (model, problem_id)
# --------------------------------------------------------------------------------------------

REQUIRED_KEYS = ("model", "problem_id", "n", "c")


def read_records(path: str | Path) -> list[dict]:
    """All records of per_problem.jsonl. A torn last line (an interrupted write) is dropped with a
    warning and cut from the file so appends start on a clean line; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")  # the last item is b"" when the file ends with a newline
    records, offset, good_end = [], 0, 0
    for i, line in enumerate(lines):
        next_offset = offset + len(line) + 1
        if line.strip():
            try:
                rec = json.loads(line)
                missing = [k for k in REQUIRED_KEYS if k not in rec]
                if missing:
                    raise ValueError(f"missing keys {missing}")
            except ValueError as err:
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise ValueError(f"{path}: line {i + 1} is not a valid record ({err}); fix or remove it") from None
                warnings.warn(f"{path}: ignoring a torn last line ({len(line)} bytes); its problems will be redone")
                with open(path, "r+b") as fh:
                    fh.truncate(good_end)
                return records
            records.append(rec)
            good_end = min(next_offset, len(raw))
        offset = next_offset
    if raw and not raw.endswith(b"\n"):
        with open(path, "ab") as fh:  # complete last record without its newline: close the line
            fh.write(b"\n")
    return records


def check_run_config(out_dir: Path, cfg: EvalConfig) -> None:
    """Write run_config.json on the first run; refuse a resume whose sampling settings differ."""
    mine = {key: getattr(cfg, key) for key in SAMPLING_KEYS}
    path = out_dir / RUN_CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"out: {out_dir} holds results made with other settings ({detail}); use a new --out")
    else:
        path.write_text(json.dumps(mine, indent=2) + "\n")


def batch_seed(seed: int, chunk: int) -> int:
    """Seed of one problem batch: depends only on (seed, batch index), so models share random
    streams (common random numbers) and a resumed batch redraws what a fresh run would."""
    return zlib.crc32(f"{seed}/{chunk}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Sampling and scoring one model
# --------------------------------------------------------------------------------------------


def evaluate_model(label: str, model: Any, tokenizer: Any, problems: Sequence[Any], prompts: Sequence[str],
                   cfg: EvalConfig, reward_name: str, done: set, out_file: Path, *,
                   generate_fn: Optional[Callable] = None, score_fn: Optional[Callable] = None) -> int:
    """Sample, score and append the (label, problem) records not yet in `done`; returns how many.

    Problems are cut into fixed batches of max(1, batch_size // n) in dataset order; the n samples
    of every problem in a batch go through one generate call, then one greedy call.
    """
    from tqdm.auto import tqdm

    if generate_fn is None:
        from apo_llm.rollout import generate_completions as generate_fn
    if score_fn is None:
        from apo_llm.rewards import score_completions as score_fn

    per_batch = max(1, cfg.batch_size // cfg.n)
    todo = [i for i, p in enumerate(problems) if (label, p.id) not in done]
    written = 0
    # a bar only on a terminal: redirected logs would fill with carriage-return redraws
    with tqdm(total=len(todo), desc=f"eval {label}", unit="problem", disable=not sys.stderr.isatty(),
              ) as bar, open(out_file, "a") as fh:
        for chunk, start in enumerate(range(0, len(problems), per_batch)):
            idx = [i for i in range(start, min(start + per_batch, len(problems))) if (label, problems[i].id) not in done]
            if not idx:
                continue
            seed = batch_seed(cfg.seed, chunk)
            batch_prompts = [prompts[i] for i in idx]
            golds = [problems[i].gold for i in idx]
            sampled = generate_fn(model, tokenizer, batch_prompts, cfg.n, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                  batch_size=cfg.batch_size, do_sample=True, seed=seed)
            greedy = generate_fn(model, tokenizer, batch_prompts, 1, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size, do_sample=False, seed=seed)
            # rows are prompt-major: row j * n + s is sample s of batch problem j
            if list(sampled.prompt_index) != [j for j in range(len(idx)) for _ in range(cfg.n)]:
                raise RuntimeError("generate_completions: rows are not prompt-major groups of n")
            rewards = np.asarray(score_fn(reward_name, list(sampled.texts), [g for g in golds for _ in range(cfg.n)]),
                                 dtype=float).reshape(len(idx), cfg.n)  # [problems, n]
            g_rewards = np.asarray(score_fn(reward_name, list(greedy.texts), golds), dtype=float)  # [problems]
            lines = _records(label, problems, idx, cfg, sampled, greedy, rewards, g_rewards, seed)
            done.update((label, problems[i].id) for i in idx)
            fh.write("".join(lines))  # one write per problem batch: the unit of resumption
            fh.flush()
            os.fsync(fh.fileno())
            written += len(idx)
            bar.update(len(idx))
    return written


def _records(label: str, problems, idx: list[int], cfg: EvalConfig, sampled, greedy, rewards: np.ndarray,
             g_rewards: np.ndarray, seed: int) -> list[str]:
    """One per_problem.jsonl line per problem of the batch (rewards [problems, n], g_rewards [problems])."""
    lengths = np.asarray(sampled.completion_mask.sum(-1).tolist(), dtype=float).reshape(len(idx), cfg.n)
    truncated = np.asarray(sampled.truncated.tolist(), dtype=bool).reshape(len(idx), cfg.n)
    lines = []
    for j, i in enumerate(idx):
        rec = {
            "model": label, "problem_id": problems[i].id, "n": cfg.n,
            "c": int((rewards[j] > cfg.correct_threshold).sum()),
            "greedy_correct": bool(g_rewards[j] > cfg.correct_threshold),
            "mean_reward": float(rewards[j].mean()), "greedy_reward": float(g_rewards[j]),
            "n_truncated": int(truncated[j].sum()), "mean_length": float(lengths[j].mean()),
            "seed": seed,
        }
        if cfg.save_completions:
            rec["gold"] = problems[i].gold
            rec["completions"] = list(sampled.texts[j * cfg.n:(j + 1) * cfg.n])
            rec["rewards"] = rewards[j].tolist()
            rec["greedy_completion"] = greedy.texts[j]
        lines.append(json.dumps(rec) + "\n")
    return lines


# --------------------------------------------------------------------------------------------
# Summary: pass@k for any k from saved (n, c)
# --------------------------------------------------------------------------------------------


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
                         "`python -m paper_figures.llm_miniature` (docs/results.md)")
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


def write_summary(out_dir: Path, cfg: EvalConfig, labels: Optional[Sequence[str]],
                  problem_ids: Optional[Sequence[str]]) -> dict:
    """summary.json + pass_at_k.png + the markdown table on stdout, from per_problem.jsonl alone."""
    ks = cfg.ks
    records = read_records(out_dir / PER_PROBLEM_FILE)
    summary = summarize(records, ks, labels=labels, problem_ids=problem_ids)
    if not summary:
        raise ValueError(f"out: {out_dir / PER_PROBLEM_FILE} holds no records to summarize")
    names = list(summary)
    deltas = paired_deltas(records, ks, BASE_LABEL if BASE_LABEL in summary else names[0], names, problem_ids)
    payload = {"config": dataclasses.asdict(cfg), "ks": ks, "models": summary, "paired_deltas": deltas}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    plot_pass_at_k(summary, ks, out_dir / PLOT_FILE, title=f"{cfg.dataset} (n={cfg.n}, T={cfg.temperature})")
    print(markdown_table(summary, ks))
    if deltas:
        print("\n" + markdown_deltas(deltas, ks))
    for label, e in summary.items():
        if e.get("truncated_frac", 0.0) > 0.5:
            warnings.warn(f"{label}: {100 * e['truncated_frac']:.0f}% of the samples hit max_new_tokens without "
                          f"an EOS; their answers are likely cut off (raise --max-new-tokens)")
    return payload


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _same_model(a: Optional[str], b: str) -> bool:
    if a is None:
        return True  # the adapter does not say; nothing to check
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_adapters(model: Any, specs: Sequence[str], labels: Sequence[str], model_path: str = "") -> Any:
    """Wrap `model` with every adapter (peft PeftModel.from_pretrained / load_adapter), by label.

    Warns when an adapter says it was trained on another base model than the one evaluated."""
    from peft import PeftConfig, PeftModel

    peft_model = model
    for i, (spec, label) in enumerate(zip(specs, labels)):
        try:
            trained_on = PeftConfig.from_pretrained(spec).base_model_name_or_path
        except Exception:  # unreadable config: the load below reports it
            trained_on = None
        if model_path and not _same_model(trained_on, model_path):
            warnings.warn(f"adapters: {spec!r} was trained on {trained_on!r} but the base model is {model_path!r}")
        try:
            if i == 0:
                with peft_trl_deprecation_quiet():
                    peft_model = PeftModel.from_pretrained(model, spec, adapter_name=label, is_trainable=False)
            else:
                peft_model.load_adapter(spec, adapter_name=label, is_trainable=False)
        except Exception as err:  # peft/hub errors vary; name the adapter that failed
            raise ValueError(f"adapters: could not load {spec!r} ({type(err).__name__}: {err})") from err
    return peft_model


def model_context(model: Any, label: str) -> contextlib.AbstractContextManager:
    """Select what `model` computes: the base weights (adapters disabled) or one adapter."""
    if not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    if label == BASE_LABEL:
        return model.disable_adapter()
    model.set_adapter(label)
    return contextlib.nullcontext()


def run_eval(cfg: EvalConfig) -> dict:
    """Validate, resolve adapters, load data and model, sample what is missing, summarize."""
    cfg.validate()
    from apo_llm.cli import quiet_progress_unless_tty

    quiet_progress_unless_tty()
    adapter_specs = [resolve_adapter(a) for a in cfg.adapters]  # missing adapter: error before anything heavy
    if not cfg.summary_only:
        check_model_spec(cfg.model)
    labels = ([] if cfg.no_base else [BASE_LABEL]) + adapter_labels(cfg.adapters, cfg.labels)
    out_dir = Path(cfg.out)
    from apo_llm.runlock import RunLock

    with RunLock(out_dir, "out: the output directory", "out"):  # one writer per --out (apo_llm/runlock.py)
        if cfg.summary_only:
            return write_summary(out_dir, cfg, None, None)
        return _sample_and_summarize(cfg, out_dir, labels, adapter_specs)


def _sample_and_summarize(cfg: EvalConfig, out_dir: Path, labels: list, adapter_specs: list) -> dict:

    problems, stats = load_eval_problems(cfg.dataset, cfg.split, cfg.limit, cfg.reward)
    from apo_llm.rewards import REWARD_FNS, default_reward_for

    reward_name = cfg.reward or default_reward_for(stats.source, prompt_style=stats.prompt_style)
    if reward_name not in REWARD_FNS:
        raise ValueError(f"reward: {reward_name!r} is not one of {sorted(REWARD_FNS)}")
    cfg = dataclasses.replace(cfg, reward=reward_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_run_config(out_dir, cfg)

    out_file = out_dir / PER_PROBLEM_FILE
    done = {(r["model"], r["problem_id"]) for r in read_records(out_file)}
    pending = {lab: sum((lab, p.id) not in done for p in problems) for lab in labels}
    print(f"[evaluate] {len(problems)} problems; to sample: " + ", ".join(f"{k}={v}" for k, v in pending.items()))
    if any(pending.values()):
        model, tokenizer, model_path = load_base_model(cfg)
        model = load_adapters(model, adapter_specs, labels[0 if cfg.no_base else 1:], model_path)
        model.eval()
        prompts = format_prompts(tokenizer, [p.prompt for p in problems], cfg.chat_template)
        for label in labels:
            if pending[label]:
                with model_context(model, label):
                    evaluate_model(label, model, tokenizer, problems, prompts, cfg, reward_name, done, out_file)
    return write_summary(out_dir, cfg, labels, [p.id for p in problems])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(EvalConfig, "Unbiased pass@k evaluation of a base model and LoRA adapters.",
                          "python -m apo_llm.evaluate")
    cfg = EvalConfig(**vars(parser.parse_args(argv)))
    return run_eval(cfg)


if __name__ == "__main__":
    import matplotlib

    from apo_llm.cli import run_or_exit

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does

    run_or_exit(main, catch=(ValueError,))  # one line naming the field or file, exit code 2
