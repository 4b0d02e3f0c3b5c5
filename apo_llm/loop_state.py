"""The native loop's bookkeeping around the algorithm (apo_llm.loop): the loop state and data
position (fresh, or restored from a checkpoint), metrics.jsonl, evaluations, the progress bar,
checkpoints of finite weights only, preemption, and the summary at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from apo_llm.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint, writing
from apo_llm.cli import quiet_progress_unless_tty
from apo_llm.modeling import peak_memory_mb
from apo_llm.preemption import Preemption, resume_command
from apo_llm.run_log import Evaluator, MetricsLog, loud_warnings, summary_line
from apo_llm.run_setup import PromptSampler

log = logging.getLogger("apo_llm.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient, or non-finite weights at a checkpoint."""


class RunState:
    """The loop's bookkeeping around the algorithm: its state and data position (fresh, or restored
    from the checkpoint to resume), metrics.jsonl, the evaluator, the progress bar, checkpoints."""

    def __init__(self, s):
        from tqdm.auto import tqdm

        cfg = s.cfg
        self.s, (self.state, self.sampler) = s, _start_state(s)
        keep = self.state["metrics_lines"] if s.resume_from else None  # resume: drop lines written after it
        self.mlog = MetricsLog(cfg.run_dir, cfg.logging.tensorboard, keep_lines=keep)
        self.evaluator = Evaluator(s, self.mlog, self.state)
        if self.evaluator.on and self.state["step"] == 0:
            self.evaluator(0, log.info)
        tty = quiet_progress_unless_tty()  # a bar only on a terminal; redirected logs get one plain line per step
        self.bar = tqdm(total=cfg.train.steps, initial=self.state["step"], desc="apo_llm.train", unit="step",
                        disable=not (cfg.logging.progress and tty), dynamic_ncols=True)
        self.say = (tqdm.write if tty else log.info) if cfg.logging.progress else (lambda _: None)
        self.last_ckpt = latest_checkpoint(cfg.run_dir)

    @property
    def step(self) -> int:
        return self.state["step"]

    def next_problems(self) -> list:
        return [self.s.train_problems[i] for i in self.sampler.take(self.s.cfg.train.prompts_per_step)]

    def after_step(self, m: dict, dt: float) -> bool:
        """Count, log, evaluate and checkpoint the step just taken; True: stop here (train.stop_at_step)."""
        cfg, state = self.s.cfg, self.state
        step = state["step"] + 1
        nonfinite = m["nonfinite/skipped_updates"] > 0
        state["consecutive_nonfinite"] = state["consecutive_nonfinite"] + 1 if nonfinite else 0
        state["nonfinite_total"] += int(nonfinite)
        state.update(step=step, data_position=self.sampler.position)
        m.update({"timing/step": dt, "tokens_per_second": m["num_tokens"] / dt,
                  "memory/peak_mb": peak_memory_mb(self.s.device),
                  "nonfinite/steps_total": float(state["nonfinite_total"])})
        self.mlog.write({"step": step, **m})
        loud_warnings(m)
        self.bar.update(1)
        self.say(summary_line(step, m))
        self.last_ckpt = _after_step(self.s, state, self.mlog, self.evaluator, self.say, nonfinite, self.last_ckpt)
        if cfg.train.stop_at_step is not None and cfg.train.stop_at_step <= step < cfg.train.steps:
            log.info(f"stopping after step {step} (train.stop_at_step); resume with --resume auto")
            return True
        return False

    def preempted(self, stop: Preemption) -> None:
        _preempted(self.s, self.state, self.mlog, self.last_ckpt, stop)

    def close(self) -> None:
        self.bar.close()
        self.mlog.close()

    def __enter__(self) -> "RunState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self) -> dict:
        return _finish(self.s, self.state, self.evaluator, self.last_ckpt)


def _start_state(s) -> tuple[dict, PromptSampler]:
    """The loop's state and data position: fresh, or restored from the checkpoint to resume."""
    sampler = PromptSampler(len(s.train_problems), s.cfg.data.seed)
    state: dict[str, Any] = {"step": 0, "data_position": 0, "metrics_lines": 0, "consecutive_nonfinite": 0,
                             "nonfinite_total": 0, "eval_history": []}
    if s.resume_from is not None:
        state.update(load_checkpoint(s.resume_from, s.policy, s.optimizer, s.scheduler))
        sampler.position = state["data_position"]
        log.info(f"resumed from {s.resume_from} at step {state['step']}")
    state["config"] = s.cfg.to_dict()  # saved in every checkpoint: a resume compares its settings with it
    state["inputs"] = s.inputs or {}  # and its inputs (data files, base weights)
    return state, sampler


def _after_step(s, state: dict, mlog, evaluator: Evaluator, say, nonfinite: bool, last_ckpt):
    """Stop on too many non-finite steps, evaluate, checkpoint (never non-finite weights).
    Returns the last checkpoint."""
    cfg, step = s.cfg, state["step"]
    if state["consecutive_nonfinite"] >= cfg.train.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"{state['consecutive_nonfinite']} consecutive steps with a non-finite loss or gradient "
            f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); stopping. "
            f"Last good checkpoint: {last_ckpt}")
    if evaluator.on and step % cfg.eval.every == 0:
        evaluator(step, say)
    every = cfg.checkpoint.every
    end = step == cfg.train.steps or step == cfg.train.stop_at_step
    if not nonfinite and ((every and step % every == 0) or end):
        check_weights(s.policy, step, last_ckpt)
        state["metrics_lines"] = mlog.lines
        last_ckpt = save_checkpoint(cfg.run_dir, step, s.policy, s.optimizer, s.scheduler, state,
                                    keep_last=cfg.checkpoint.keep_last)
    return last_ckpt


def _preempted(s, state: dict, mlog, last_ckpt: Optional[Path], stop: Preemption) -> None:
    """Checkpoint the last completed step if it is newer than the newest checkpoint, one line, exit."""
    cfg, step = s.cfg, state["step"]
    if step > (checkpoint_step(last_ckpt) if last_ckpt else 0):
        check_weights(s.policy, step, last_ckpt)
        state["metrics_lines"] = mlog.lines
        last_ckpt = save_checkpoint(cfg.run_dir, step, s.policy, s.optimizer, s.scheduler, state,
                                    keep_last=cfg.checkpoint.keep_last)
        what = f"saved checkpoint {last_ckpt} (step {step} of {cfg.train.steps})"
    elif last_ckpt is not None:
        what = f"step {step} of {cfg.train.steps} is already checkpointed at {last_ckpt}"
    else:
        what = "no step completed, nothing saved"
    stop.exit(what, resume_command())


def _finish(s, state: dict, evaluator: Evaluator, last_ckpt) -> dict:
    """summary.json; a finished run also gets its final evaluation, adapter and plots."""
    cfg, run_dir = s.cfg, s.cfg.run_dir
    finished = state["step"] >= cfg.train.steps
    summary = {"steps": state["step"], "finished": finished, "run_dir": str(run_dir),
               "nonfinite_steps": state["nonfinite_total"], "eval": state["eval_history"]}
    if finished:
        if evaluator.on and state["step"] not in [e["step"] for e in state["eval_history"]]:
            evaluator(state["step"])
            summary["eval"] = state["eval_history"]
        check_weights(s.policy, state["step"], last_ckpt)
        writing(run_dir / "adapter", lambda: s.policy.save_pretrained(run_dir / "adapter"))  # disk full: one line
        writing(run_dir / "adapter", lambda: s.tokenizer.save_pretrained(run_dir / "adapter"))
        if cfg.logging.plots:
            from apo_llm.plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(run_dir)]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def nonfinite_weights(params) -> list[str]:
    """Names (or indices) of the given trainable tensors that hold a NaN or inf."""
    items = params.items() if isinstance(params, dict) else enumerate(params)
    return [str(n) for n, p in items if not torch.isfinite(p.detach()).all()]


def check_weights(policy, step: int, last_ckpt: Optional[Path]) -> None:
    """Refuse to save non-finite weights: stop, naming the last good checkpoint."""
    bad = nonfinite_weights({n: p for n, p in policy.named_parameters() if p.requires_grad})
    if bad:
        raise NonFiniteError(f"non-finite values in {len(bad)} trainable weights (e.g. {bad[0]}) at step {step}; "
                             f"nothing saved. Last good checkpoint: {last_ckpt} (resume with --resume auto)")
