"""Running the sweep: train one (arm, seed) with the trainer, evaluate its checkpoints, resume.

Each (arm, seed) trains in its own run directory (a finished one is skipped, an interrupted one
resumes from its last checkpoint); every evaluated (label, problem) is a line of
eval*/per_problem.jsonl, the evaluator's resume unit. An arm that fails is recorded in FAILED and
counted in the summary, not retried silently (`--retry_failed` retries it). Several processes over
disjoint arms may share a directory: a group's extra seeds wait until every arm of the group has
its validation numbers. `run_config` must build, for a given (arm, seed, sizes), the same trainer
config as every earlier version did, or the trainer refuses to resume a run made by one.
"""

from __future__ import annotations

import dataclasses
import re
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from . import report, selection
from .design import ARMS, BASE, SUFFIX, VALIDATION, Sizes, eval_steps, label_of, run_name, split_size
from .layout import check_settings


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


def process_run(out: Path, arm: str, seed: int, sz: Sizes, threads: int, retry: bool) -> Optional[str]:
    """Train one (arm, seed), evaluate its checkpoints on validation, select its stopping step,
    evaluate the selected and the final step on the reported splits. Returns an error, if any."""
    err = train_one(out, arm, seed, sz, threads, retry)
    run = run_name(arm, seed)
    ads = adapters_of(out, run, sz)
    if not ads:
        return err
    evaluate_split(out, VALIDATION, ads, sz, threads)
    stop = selection.stop_steps(out, sz)[run]
    points = {lab: ads[lab] for lab in (label_of(run, stop), label_of(run, sz.steps))}
    for split in sz.splits:
        evaluate_split(out, split, points, sz, threads)
    return err


def run_sweep(out: Path, sz: Sizes, threads: int = 1, log=print, retry_failed: bool = False,
              only: Optional[Sequence[str]] = None) -> tuple[dict[str, dict], dict]:
    """Train and evaluate every missing (arm, seed) of `only` (default: every arm), then each group's
    extra seeds once the group is decided; summarize. Resumable. Returns ({split: results}, curves);
    the figures are drawn from these by paper_figures.miniature (the command line does)."""
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
        picked = [a for a in selection.group_picks(out, sz).values() if a is not None and a in mine]
        more = [(arm, s) for s in range(sz.seeds, sz.more_seeds) for arm in dict.fromkeys(picked)]
        bar.total += len(more)
        do(more, bar)
    for split in (VALIDATION, *sz.splits):
        evaluate_split(out, split, {}, sz, threads)  # the base model, even when every arm failed
    results = {}
    cur = report.curves(out, sz, sz.arms)
    for split in sz.splits:
        res = results[split] = report.summarize(out, sz, split)
        res["wall_s"] = time.perf_counter() - t0
    return results, cur
