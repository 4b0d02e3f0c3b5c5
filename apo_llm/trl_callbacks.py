"""The TRL engine's callbacks and rank-0 coordination: metrics.jsonl rows, checkpoints the native
engine can trust (manifest, COMPLETE marker, apo_state.pt) and preemption that stops every rank
together (RunGuard), and `_on_main`: a function run on rank 0 whose result or error every rank gets."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from apo_llm.checkpoint import TRL, save_torch, seal_checkpoint, writing
from apo_llm.cli import UserError
from apo_llm.config import RunConfig
from apo_llm.preemption import Preemption
from apo_llm.run_setup import check_paths, prepare_run_dir, take_run_lock


class JsonlMetrics(TrainerCallback):
    """metrics.jsonl in the run dir, one row per optimizer step, written by the main process only."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return  # the end-of-training summary (train_runtime, ...) goes to summary.json instead
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


class RunGuard(TrainerCallback):
    """Checkpoints the native engine can trust, and preemption that stops every rank together.

    on_save: (after every rank wrote its part) rank 0 adds apo_state.pt, manifest.json and COMPLETE
    to checkpoint-N. on_step_end: the SIGTERM / SIGINT flag, OR-reduced over ranks; at the end of an
    RL step (ppo_epochs optimizer steps) a raised flag saves that step, unless already saved, and stops.
    """

    def __init__(self, cfg: RunConfig, stop: Preemption, inputs: dict):
        self.cfg, self.stop, self.inputs = cfg, stop, inputs
        self.accelerator = None  # set once the trainer exists
        self.preempted = False

    def _flag_on_any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._flag_on_any_rank() and state.global_step % self.cfg.train.ppo_epochs == 0:
            self.preempted = True
            control.should_save = True  # no second save when this step was saved already: see on_save
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>.pth) are written
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = Path(args.output_dir) / "metrics.jsonl"
            lines = sum(1 for _ in metrics.open()) if metrics.exists() else 0
            apo_state = {"config": self.cfg.to_dict(), "inputs": self.inputs, "metrics_lines": lines,
                         "step": state.global_step // self.cfg.train.ppo_epochs}
            writing(ckpt / TRL.state_file, lambda: save_torch(apo_state, ckpt / TRL.state_file))  # disk full:
            writing(ckpt / "manifest.json", lambda: seal_checkpoint(ckpt, state.global_step))  # one line
        self.accelerator.wait_for_everyone()
        return control


def _broadcast(obj):
    """Rank 0's `obj` on every rank (as is with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _on_main(state, fn):
    """fn() on rank 0, its result on every rank; its error raised on every rank (no rank left waiting)."""
    out, err = None, None
    if state.is_main_process:
        try:
            out = fn()
        except BaseException as e:  # noqa: B036 - the other ranks must hear of any failure
            err = e
    shared = _broadcast((out, None if err is None else str(err)))
    if err is not None:
        raise err
    if shared[1] is not None:
        raise UserError(shared[1])
    return shared[0]


def _claim_run_dir(cfg: RunConfig, state):
    """Rank 0: check the paths, take the lock, resolve the checkpoint (run_setup.prepare_run_dir).
    Returns (lock on rank 0 / None, checkpoint to resume or None on every rank)."""
    holder = {}

    def claim():
        check_paths(cfg)
        holder["lock"] = take_run_lock(cfg)
        try:
            resume = prepare_run_dir(cfg, TRL)
        except BaseException:
            holder.pop("lock").release()
            raise
        return str(resume) if resume else None

    resume = _on_main(state, claim)
    return holder.get("lock"), Path(resume) if resume else None
