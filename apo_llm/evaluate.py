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

This module is the command (its config, adapter resolution and the driver); the rest is one
concept per module: `eval_store` (the two files above that make a run resumable), `eval_sampling`
(sampling and scoring one model with the trainer's `rollout.generate_completions` and
`rewards.score_completions`), `passk_stats` (pass@k with SEs, paired deltas, tables, the plot).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from apo_llm.cli import MIN_TEMPERATURE, check_model_spec, check_shared_fields, parse_ks
from apo_llm.data import load_eval_problems, parse_dataset
from apo_llm.eval_sampling import batch_seed, evaluate_model, load_adapters, model_context
from apo_llm.eval_store import (BASE_LABEL, PER_PROBLEM_FILE, PLOT_FILE, RUN_CONFIG_FILE, SAMPLING_KEYS, SUMMARY_FILE,
                                check_run_config, read_records)
from apo_llm.modeling import load_base_model
from apo_llm.options import option, parse_command
from apo_llm.passk_stats import (held_out_change, markdown_deltas, markdown_table, mean_se, paired_deltas,
                                 plot_pass_at_k, summarize, training_report, verdict)
from apo_llm.prompts import format_prompts

# Re-exported: the evaluator's pieces live in eval_store / eval_sampling / passk_stats; older callers
# (the trainer's closing report, the miniature, notebooks) import them from here.
__all__ = ["EvalConfig", "run_eval", "main", "resolve_adapter", "adapter_labels", "write_summary",
           "BASE_LABEL", "PER_PROBLEM_FILE", "PLOT_FILE", "RUN_CONFIG_FILE", "SAMPLING_KEYS", "SUMMARY_FILE",
           "check_run_config", "read_records", "batch_seed", "evaluate_model", "load_adapters", "model_context",
           "held_out_change", "markdown_deltas", "markdown_table", "mean_se", "paired_deltas", "plot_pass_at_k",
           "summarize", "training_report", "verdict", "format_prompts", "load_eval_problems"]

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Everything `python -m apo_llm.evaluate` takes; each field is one flag (--field_name)."""

    model: Optional[str] = option(None, "base model: hub id or local path (default: the embedded tiny model)")
    adapters: list[str] = option([], "LoRA adapter dirs, hub ids or training output dirs")
    labels: list[str] = option([], "one label per adapter (default: the adapter directory name)")
    no_base: bool = option(False, "do not evaluate the base model (label 'base')")
    dataset: str = option("synthetic", "gsm8k | math500 | math | synthetic | jsonl:PATH | parquet:PATH")
    split: str = option("test", "dataset split: gsm8k train | test; math train | test; math500 test; synthetic "
                                   "any name is its own stream (test; test_hard has 4 events per problem)")
    n: int = option(16, "samples per problem (n >= max k)")
    k: str = option("1,4,16", "comma-separated k values for pass@k")
    temperature: float = option(1.0, "sampling temperature (> 0)")
    top_p: float = option(1.0, "nucleus sampling top-p in (0, 1]")
    max_new_tokens: int = option(256, "generation length limit")
    limit: Optional[int] = option(None, "evaluate only the first LIMIT problems")
    out: str = option("runs/eval", "output directory; reused = resumed (per_problem.jsonl is extended, "
                                 "summary.json and pass_at_k.png are overwritten)")
    batch_size: int = option(64, "sequences per generate call (batch_size // n problems per call)")
    seed: int = option(0, "sampling seed (each problem batch gets a seed derived from it)")
    save_completions: bool = option(False, "store every completion and its reward in per_problem.jsonl")
    reward: Optional[str] = option(None, "gsm8k_strict | gsm8k_flexible | math | synthetic (default: the dataset's)")
    correct_threshold: float = option(0.5, "a sample counts as correct when reward > threshold")
    chat_template: str = option("auto", "auto (use the tokenizer's chat template if it has one) | on | off")
    dtype: Optional[str] = option(None, "model dtype (default: bfloat16 on GPU, float32 on CPU)")
    device: Optional[str] = option(None, "cpu | cuda | ... (default: cuda if available)")
    threads: int = option(0, "torch CPU threads (0 = torch default; 1 is fastest for tiny models)")
    summary_only: bool = option(False, "only recompute summary/plot/table from per_problem.jsonl (no sampling)")

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
            raise ValueError("no_base: nothing to evaluate (no adapters given and --no_base set)")
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
                          f"an EOS; their answers are likely cut off (raise --max_new_tokens)")
    return payload



# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

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
    cfg = parse_command(EvalConfig, argv, prog="python -m apo_llm.evaluate",
                        description="Unbiased pass@k evaluation of a base model and LoRA adapters.")
    return run_eval(cfg)


if __name__ == "__main__":
    import matplotlib

    from apo_llm.cli import run_or_exit

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does

    run_or_exit(main, catch=(ValueError,))  # UserError is one; one line naming the field or file, exit code 2
