"""The native RL loop (`train.engine: native`), top to bottom as the algorithm.

    for step in 1 .. train.steps:
        prompts  --generate_completions-->  G completions each (top_k=0, top_p=1, temperature)
                 --score_completions----->  rewards r            --group_advantages--> A
        reference pass (no grad): log pi_ref(y_t); for APO the safe manifold
                                  M_t = TopK(pi_ref(. | y_<t)) ids + log-probs  [B, T, K]
        old pass (no grad):       log pi_old(y_t), entropy [B, T]; for the old_mass / old_token
                                  readings of r_anchor also log pi_old at the ids of M_t [B, T, K]
                                  (skipped for one epoch of one minibatch: the update's forward is pi_old)
        update: ppo_epochs x minibatches x micro-batches of
            training forward: log pi_theta(y_t) and, for APO, log pi_theta at the anchor ids of M_t
            policy_loss(..., global_tokens=minibatch tokens, global_seqs=minibatch sequences)
            backward; after the minibatch: clip grad norm, AdamW step, scheduler step
        log, evaluate, checkpoint

`train` holds the step and `update` the micro-batch loop; the loss is objectives.policy_loss, called
in `update` (main -> train -> update -> policy_loss -> the registered term: docs/architecture.md).
Which optional tensors the loss gets is decided by objectives.required_inputs(cfg) and built in one
place, passes.loss_inputs (shared with the TRL engine), never from the loss's name.
Rewards that are NaN count as 0; a non-finite weight rolls the step back; weights are checked
before every checkpoint; SIGTERM / SIGINT finish the step, checkpoint it and exit 143 / 130.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from apo_llm.cli import quiet_progress_unless_tty
from apo_llm.config import RunConfig, fill_loss_norm_len
from apo_llm.data import FILE_SOURCES
from apo_llm.loop_state import RunState
from apo_llm.modeling import completion_token_stats
from apo_llm.objectives import group_advantages, metrics_to_floats, policy_loss
from apo_llm.passes import RolloutPasses, loss_inputs, reference_pass
from apo_llm.preemption import Preemption
from apo_llm.prompts import format_for_run
from apo_llm.provenance import save_resolved
from apo_llm.rollout import Completions, generate_completions
from apo_llm.run_log import step_metrics
from apo_llm.run_setup import (
    add_lora, check_inputs, check_paths, check_window, context_window, drop_long_prompts, load_base,
    load_data, prepare_run_dir, requeued_afresh, resolve_model_path, run_inputs, start_run_dir, take_run_lock,
    world_size,
)
from apo_llm.runlock import RunLock

log = logging.getLogger("apo_llm.train")


# --------------------------------------------------------------------------------------------
# The run: what it is built from
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a native run is built from (`setup`); benchmarks/bench_train.py reuses it."""

    cfg: RunConfig
    model: Any  # as prepared by the accelerator: backward and gradient clipping go through it
    policy: Any  # the unwrapped PEFT model: generation, no-grad passes, checkpoints
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    device: torch.device
    train_problems: list
    eval_problems: list
    reward_name: str
    resume_from: Optional[Path]
    inputs: dict = None  # input fingerprints, saved in every checkpoint
    lock: Optional[RunLock] = None  # held until train() ends


def setup(cfg: RunConfig) -> Setup:
    """Model, data, optimizer, scheduler and accelerator, after everything a user can get wrong
    (paths, the run directory: locked, never mix two runs, the checkpoint to resume, the data files,
    the context window) is checked, before the model loads. Writes config.yaml and run_info.json."""
    refuse_several_processes(cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    fill_loss_norm_len(cfg)
    check_paths(cfg)
    quiet_progress_unless_tty()
    lock = take_run_lock(cfg)
    try:
        return _setup_locked(cfg, lock)
    except BaseException:
        lock.release()
        raise


def _setup_locked(cfg: RunConfig, lock: RunLock) -> Setup:
    from accelerate import Accelerator

    resume_from = prepare_run_dir(cfg)
    train_problems, eval_problems, reward_name = load_data(cfg)
    model_path = resolve_model_path(cfg)
    window = context_window(cfg, model_path)
    check_window(cfg, window, model_path)
    accelerator = Accelerator(cpu=(cfg.model.device == "cpu"))
    device = torch.device(cfg.model.device) if cfg.model.device else accelerator.device
    base, tokenizer, model_path = load_base(cfg, str(device), gradient_checkpointing=cfg.model.gradient_checkpointing)
    inputs = run_inputs(cfg, model_path, train_problems)
    check_inputs(cfg, resume_from, inputs)
    train_problems = drop_long_prompts(cfg, tokenizer, train_problems, window, cfg.rollout.max_new_tokens,
                                       "data.path" if cfg.data.source in FILE_SOURCES else "data.source")
    eval_problems = drop_long_prompts(cfg, tokenizer, eval_problems, window,
                                      cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, "data.eval_source")
    start_run_dir(cfg, aside=cfg.logging.overwrite or requeued_afresh(cfg, resume_from))  # only now: a failed
    # start leaves no empty run directory behind
    model = add_lora(cfg, base)
    save_resolved(cfg, cfg.run_dir, {"model_path": model_path, "reward": reward_name,
                                     "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                                     "resumed_from": str(resume_from) if resume_from else None})
    optimizer, scheduler = make_optimizer(cfg, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return Setup(cfg, model, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler, accelerator, device,
                 train_problems, eval_problems, reward_name, resume_from, inputs, lock)


def make_optimizer(cfg: RunConfig, model):
    """AdamW over the trainable (LoRA) weights and its scheduler, one scheduler step per optimizer step."""
    from transformers import get_scheduler

    t = cfg.train
    updates_per_step = t.ppo_epochs * (t.prompts_per_step * cfg.rollout.num_generations // t.mini_batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.steps * updates_per_step)
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary dict (also written to summary.json).
    SIGTERM / SIGINT: the step under way is finished and checkpointed, then SystemExit(128 + signum)."""
    from apo_llm.rewards import score_completions

    r, t = cfg.rollout, cfg.train
    with Preemption() as stop:
        s = setup(cfg)
        with s.lock:  # held until the summary is written, released on any exit
            with RunState(s) as run:  # closes the progress bar and metrics log on any exit
                while run.step < t.steps and not stop.requested:
                    t_step, timing = time.perf_counter(), {}
                    problems = run.next_problems()
                    # 1. generate G completions per prompt
                    with _timed(timing, "generate"):
                        prompts = format_for_run(cfg, s.tokenizer, [p.prompt for p in problems])
                        comp = generate_completions(s.policy, s.tokenizer, prompts, r.num_generations,
                                                    max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                                    top_p=r.top_p, top_k=r.top_k, batch_size=r.batch_size)
                    # 2. score them, 3. advantages within each group of G
                    with _timed(timing, "reward"):
                        golds = [problems[i].gold for i in comp.prompt_index]
                        raw = score_completions(s.reward_name, comp.texts, golds)
                        rewards, n_bad = finite_rewards(raw, s.reward_name)
                        adv = group_advantages(rewards, r.num_generations, t.advantage, std=t.adv_std, k=t.passk_k)
                    # 4. the no-grad passes: reference (the anchors) and old (behaviour)
                    passes, timing["old_logp"], timing["reference"] = behaviour_and_reference(cfg, s.policy, comp,
                                                                                              s.device)
                    # 5. the update: policy_loss over ppo_epochs x minibatches x micro-batches
                    with _timed(timing, "update"):
                        upd = update(cfg, s.model, s.optimizer, s.scheduler, s.accelerator, comp, adv, passes, s.device)
                    m = step_metrics(cfg, comp, rewards, passes, upd, s.optimizer)
                    m.update({f"timing/{k}": v for k, v in timing.items()})
                    m["nonfinite/rewards"] = float(n_bad)
                    # 6. log, evaluate, checkpoint
                    if run.after_step(m, time.perf_counter() - t_step):
                        break
                if stop.requested:
                    run.preempted(stop)
            return run.finish()


@contextlib.contextmanager
def _timed(timing: dict, name: str):
    t0 = time.perf_counter()
    yield
    timing[name] = time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The no-grad passes
# --------------------------------------------------------------------------------------------


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def trim(c: Completions, rows) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids/attention_mask of `rows`, without all-padding completion columns (saves compute)."""
    ids, am = c.input_ids[rows], c.attention_mask[rows]
    width = int(c.completion_mask[rows].sum(-1).max().item()) if ids.shape[0] else 0
    L = c.n_prompt + max(width, 1)
    return ids[:, :L], am[:, :L], L - c.n_prompt


@torch.no_grad()
def behaviour_and_reference(cfg: RunConfig, model, comp: Completions, device) -> tuple[RolloutPasses, float, float]:
    """The no-grad passes: reference first (its Top-K ids are the anchors), then old, which gathers
    log pi_old at those ids when the reading needs it. Returns (passes, t_old, t_ref)."""
    N, T = comp.completion_mask.shape
    passes = RolloutPasses(old_logp=torch.zeros(N, T), entropy=torch.zeros(N, T))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    if cfg.loss.needs_reference:
        def stats_of(rows, topk):
            ids, am, t = trim(comp, rows)
            return completion_token_stats(model, ids.to(device), am.to(device), comp.n_prompt, topk=topk,
                                          temperature=cfg.rollout.temperature, chunk_size=cfg.train.chunk_size), t

        ref = reference_pass(cfg.loss, model, stats_of, comp.completion_ids,
                             micro_slices(N, cfg.train.micro_batch_size), torch.device("cpu"))
        for name, value in ref.items():
            setattr(passes, name, value)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not single_pass(cfg, N):  # else update() fills old_logp / entropy from its own forward
        _old_pass(cfg, model, comp, device, passes)
    model.train(was_training)
    return passes, time.perf_counter() - t0, t_ref


def _old_pass(cfg: RunConfig, model, comp: Completions, device, passes: RolloutPasses) -> None:
    """log pi_old(y_t) and entropy [N, T]; log pi_old at the anchor ids [N, T, K] when the reading needs it."""
    gather = cfg.loss.needs_anchor_old
    if gather:
        passes.anchor_old_logp = torch.full(passes.anchor_ids.shape, -math.inf)
    for sl in micro_slices(comp.completion_mask.shape[0], cfg.train.micro_batch_size):
        ids, am, t = trim(comp, sl)
        st = completion_token_stats(model, ids.to(device), am.to(device), comp.n_prompt,
                                    temperature=cfg.rollout.temperature, want_entropy=True,
                                    gather_ids=passes.anchor_ids[sl, :t].to(device) if gather else None,
                                    chunk_size=cfg.train.chunk_size)
        passes.old_logp[sl, :t] = st.logp.float().cpu()
        passes.entropy[sl, :t] = st.entropy.float().cpu()
        if gather:
            passes.anchor_old_logp[sl, :t] = st.gathered_logp.float().cpu()


def single_pass(cfg: RunConfig, rows: int) -> bool:
    """One epoch, one minibatch: the update's forward *is* pi_old (the ratio is 1 at its only step), so
    the behaviour pass is skipped and update() records log pi_old and the entropy from that forward."""
    return cfg.train.ppo_epochs == 1 and cfg.train.mini_batch_size >= rows


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


def update(cfg: RunConfig, model, optimizer, scheduler, accelerator, comp: Completions, adv: torch.Tensor,
           passes: RolloutPasses, device) -> dict[str, float]:
    """ppo_epochs over shuffled minibatches, gradient accumulation over micro-batches.

    A minibatch with a non-finite log-prob, loss or gradient is skipped. After every optimizer step
    the trainable weights are checked: a non-finite weight rolls the whole step back (weights,
    optimizer, scheduler) to its start, the last good state. Returns token-weighted means of the
    policy_loss diagnostics, grad_norm, and counts of skipped updates and rollbacks.
    """
    lc, tc = cfg.loss, cfg.train
    mask = comp.completion_mask  # [N, T], on the CPU: weights need no device sync
    N = mask.shape[0]
    fill_old, stored = single_pass(cfg, N), passes.stored()
    params = [p for p in model.parameters() if p.requires_grad]
    last_good = _snapshot(params, optimizer, scheduler)
    sums: dict[str, float] = {}
    weight, grad_norms, mb_losses, skipped = 0.0, [], [], 0
    model.train()
    for _ in range(tc.ppo_epochs):
        order = torch.randperm(N)  # global torch RNG: restored on resume
        for mb_start in range(0, N, tc.mini_batch_size):
            mb_rows = order[mb_start: mb_start + tc.mini_batch_size]
            mb_tokens, mb_loss, seen, finite = float(mask[mb_rows].sum()), 0.0, [], True
            for sl in micro_slices(len(mb_rows), tc.micro_batch_size):
                rows = mb_rows[sl]
                st, t = _training_forward(cfg, model, comp, passes, rows, device, fill_old)
                m = mask[rows, :t].to(device)
                finite = bool(torch.isfinite(st.logp[m.bool()]).all())
                if finite:
                    take = lambda x, r=rows, t=t: x[r, :t].to(device)  # noqa: E731  a stored tensor, this forward's part
                    kw = loss_inputs(lc, st, stored, take, old_is_current=fill_old)
                    loss, metrics = policy_loss(
                        lc, st.logp, passes.old_logp[rows, :t].to(device), adv[rows].to(device), m,
                        global_tokens=max(mb_tokens, 1.0), global_seqs=len(mb_rows), sync_metrics=False, **kw)
                    loss_value = float(loss.detach())  # the one read-back of the loss, before backward is queued
                    finite = math.isfinite(loss_value)
                if not finite:  # stop this minibatch at the first non-finite log-prob or loss
                    break
                accelerator.backward(loss)
                mb_loss += loss_value
                seen.append((float(mask[rows, :t].sum()), metrics))
            _add_weighted(sums, seen)  # token-weighted diagnostics, one host sync per minibatch
            weight += sum(w for w, _ in seen)
            gn = _clip_and_step(tc, accelerator, params, optimizer, scheduler) if finite else math.nan
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(gn):
                skipped += 1
                continue
            grad_norms.append(gn)
            mb_losses.append(mb_loss)
            if not all_finite(params):
                return _roll_back(params, optimizer, scheduler, last_good,
                                  planned=tc.ppo_epochs * math.ceil(N / tc.mini_batch_size))
    return _update_metrics(sums, weight, mb_losses, grad_norms, skipped)


def _training_forward(cfg: RunConfig, model, comp: Completions, passes: RolloutPasses, rows, device, fill_old: bool):
    """(TokenStats, t) of the training forward over `rows`: log pi_theta(y_t), at the anchor ids, the
    policy's Top-K and the entropy as the loss needs them. With fill_old the behaviour pass was
    skipped: this forward *is* pi_old, recorded in `passes`."""
    lc = cfg.loss
    ids, am, t = trim(comp, rows)
    gather = passes.anchor_ids[rows, :t].to(device) if lc.needs_anchors else None
    st = completion_token_stats(model, ids.to(device), am.to(device), comp.n_prompt,
                                temperature=cfg.rollout.temperature, gather_ids=gather, topk=lc.policy_topk,
                                want_entropy=lc.needs_entropy or fill_old, chunk_size=cfg.train.chunk_size)
    if fill_old:
        passes.old_logp[rows, :t] = st.logp.detach().float().cpu()
        passes.entropy[rows, :t] = st.entropy.detach().float().cpu()
    return st, t


def _update_metrics(sums: dict, weight: float, mb_losses: list, grad_norms: list, skipped: int) -> dict[str, float]:
    """Token-weighted means over micro-batches (fractions and means of token quantities), and counts."""
    out = {k: v / weight for k, v in sums.items() if k not in ("loss", "pg_loss", "num_tokens")} if weight else {}
    out["loss"] = float(np.mean(mb_losses)) if mb_losses else float("nan")
    out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
    out["nonfinite/skipped_updates"] = float(skipped)
    out["nonfinite/weights_rolled_back"] = 0.0
    out["optimizer_steps"] = float(len(grad_norms))
    return out


def _add_weighted(sums: dict, seen: list[tuple[float, dict]]) -> None:
    """sums[k] += w * v for every micro-batch's (w, 0-d tensor metrics), with ONE host sync. The
    floats equal policy_loss(sync_metrics=True)'s (the same metrics_to_floats conversion, one call)."""
    if not seen:
        return
    flat = {(i, k): v for i, (_, metrics) in enumerate(seen) for k, v in metrics.items()}
    floats = metrics_to_floats(flat)
    for (i, k), v in floats.items():
        sums[k] = sums.get(k, 0.0) + seen[i][0] * v


def _clip_and_step(tc, accelerator, params, optimizer, scheduler) -> float:
    """Clip the gradient norm and take the optimizer + scheduler step; a non-finite norm (returned,
    NaN when the accelerator reports none) takes no step."""
    gn = accelerator.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
    gn = float(gn) if gn is not None else float("nan")
    if math.isfinite(gn):
        optimizer.step()
        scheduler.step()
    return gn


def _snapshot(params, optimizer, scheduler) -> tuple:
    """The last good state: LoRA-sized, so one copy per step is cheap next to a forward pass."""
    return ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()),
            copy.deepcopy(scheduler.state_dict()))


def _roll_back(params, optimizer, scheduler, snapshot: tuple, planned: int) -> dict[str, float]:
    with torch.no_grad():
        for p, saved in zip(params, snapshot[0]):
            p.copy_(saved)
    optimizer.load_state_dict(snapshot[1])
    scheduler.load_state_dict(snapshot[2])
    log.warning("non-finite trainable weights after an optimizer step: rolled the step back")
    return {"loss": float("nan"), "grad_norm": float("nan"), "nonfinite/skipped_updates": float(planned),
            "nonfinite/weights_rolled_back": 1.0, "optimizer_steps": 0.0}


# --------------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------------


def finite_rewards(raw: list[float], reward_name: str) -> tuple[torch.Tensor, int]:
    """Rewards as a tensor with NaN/inf replaced by 0 (a failed check is no reward), and how many were."""
    r = torch.tensor(raw, dtype=torch.float32)
    bad = ~torch.isfinite(r)
    n_bad = int(bad.sum())
    if n_bad:
        log.warning(f"{n_bad} of {r.numel()} rewards from {reward_name!r} were NaN/inf; counted as 0")
    return torch.where(bad, torch.zeros_like(r), r), n_bad


def all_finite(params) -> bool:
    """One device sync for every tensor (the per-step check; nonfinite_weights names them, slowly)."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()) if params else True


def refuse_several_processes(cfg: RunConfig) -> None:
    """The native loop is single-process (no gradient sync, data sharding or rank-0-only writes)."""
    n = world_size()
    if cfg.train.engine == "native" and n > 1:
        raise ValueError(f"train.engine=native runs in one process, got WORLD_SIZE={n}; "
                         f"use --train.engine trl for several processes (docs/trainer_engines.md)")
