"""LoRA RLVR trainer: `python -m apo_llm.train [--config FILE.yaml] [--section.field VALUE ...]`.

One step (`rl_step`; the same calls the simulator makes, on real tokens):

    prompts  --generate_completions-->  G completions each (top_k=0, top_p=1, temperature)
             --score_completions----->  rewards r            --group_advantages--> A
    reference pass (no grad):  log pi_ref(y_t); for APO the safe manifold
                               M_t = TopK(pi_ref(. | y_<t)) ids + log-probs  [B, T, K]
    old pass (no grad):        log pi_old(y_t), entropy [B, T]; for the old_mass / old_token
                               readings of r_anchor also log pi_old at the ids of M_t [B, T, K]
                               (skipped for one epoch of one minibatch: the update's forward is pi_old)
    ppo_epochs x minibatches x micro-batches:
        training forward: log pi_theta(y_t) and, for APO, log pi_theta at the anchor ids of M_t
        policy_loss(..., global_tokens=minibatch tokens, global_seqs=minibatch sequences)
        backward; after the minibatch: clip grad norm, AdamW step, scheduler step

Which optional tensors the loss gets is decided by objectives.required_inputs(cfg) and built in
one place, passes.loss_inputs (shared with the TRL engine), never from the loss's name.
With no arguments the embedded default runs APO on the project's tiny Llama
and the synthetic arithmetic task on CPU in a few minutes.

Reliability: paths, the run directory, the checkpoint to resume (manifest-verified, with fallback)
and the data are validated before the model loads, and user errors exit with one line (code 2).
The run directory is locked for the life of the run (apo_llm.runlock); SIGTERM / SIGINT finish the
step, checkpoint it and exit 143 / 130 (apo_llm.preemption); a resume on changed data or base
weights is refused (input fingerprints in every checkpoint); prompts that leave no room for
rollout.max_new_tokens in the context window are skipped and counted.
Rewards that are NaN count as 0; a non-finite weight rolls the step back; weights are checked
before every checkpoint. Seeds are applied after the model is built or loaded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from apo_llm.checkpoint import (
    NATIVE, NO_RESUME, Layout, changed_inputs, checkpoint_root, checkpoint_step, file_fingerprint, latest_checkpoint,
    load_checkpoint, problems_fingerprint, read_trainer_state, resolve_resume, save_checkpoint, unused_path,
    weights_fingerprint, writing,
)
from apo_llm.cli import UserError, fail, looks_local, quiet_progress_unless_tty
from apo_llm.config import TINY_MODEL, RunConfig, fill_loss_norm_len, load_config
from apo_llm.provenance import resume_differences, save_resolved
from apo_llm.data import FILE_SOURCES
from apo_llm.metrics import pass_at_k
from apo_llm.modeling import (
    completion_token_stats, load_model_and_tokenizer, peak_memory_mb, reference_context, want_lm_head_fp32,
    wrap_lora,
)
from apo_llm.objectives import metrics_to_floats, group_advantages, kl_estimate, policy_loss
from apo_llm.passes import RolloutPasses, loss_inputs
from apo_llm.preemption import Preemption, resume_command
from apo_llm.prompts import format_for_run
from apo_llm.rollout import Completions, generate_completions
from apo_llm.runlock import RunLock

log = logging.getLogger("apo_llm.train")

TRUNCATION_WARN = 0.5  # warn when more than this share of completions hit max_new_tokens
ZERO_STD_WARN = 0.9  # warn when more than this share of groups have identical rewards (zero gradient)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient, or non-finite weights at a checkpoint."""


RUN_FILES = ("metrics.jsonl", "config.yaml", "run_info.json", "summary.json", "checkpoints", "adapter")


# --------------------------------------------------------------------------------------------
# Data order (resumable: the position alone determines the next prompts)
# --------------------------------------------------------------------------------------------


@dataclass
class PromptSampler:
    """Walks through the problems in a fresh seeded permutation per pass; `position` = prompts consumed."""

    n: int
    seed: int
    position: int = 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(perm[i]))
            self.position += 1
        return out


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_model_path(cfg: RunConfig) -> str:
    if cfg.model.name_or_path == TINY_MODEL:
        from apo_llm.tiny import ensure_tiny_model

        return str(ensure_tiny_model(quick=cfg.model.tiny_quick))
    return cfg.model.name_or_path


def check_paths(cfg: RunConfig) -> None:
    """Local-looking model/adapter paths must exist (no hub retries), and the run dir must be creatable."""
    name = cfg.model.name_or_path
    if name != TINY_MODEL and looks_local(name) and not Path(name).expanduser().is_dir():
        raise UserError(f"model.name_or_path: {name!r} is not a local model directory (and not a hub id)")
    ad = cfg.lora.adapter_path
    if ad and looks_local(ad) and not (Path(ad).expanduser() / "adapter_config.json").is_file():
        raise UserError(f"lora.adapter_path: {ad!r} is not an adapter directory (no adapter_config.json)")
    p = cfg.run_dir
    while not p.exists() and p != p.parent:  # the nearest existing ancestor decides
        p = p.parent
    if not p.is_dir():
        raise UserError(f"logging.output_dir: {p} is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"logging.output_dir: {p} is not writable")


def _load(field_name: str, source: str, split: str, **kw):
    from apo_llm.data import load_problems

    try:
        problems, stats = load_problems(source, split, **kw)
    except ValueError as e:  # data.py names its argument ("path: ..."); name the config field instead
        raise UserError(f"{field_name}: {str(e).partition(': ')[2] or e}") from None
    except OSError as e:  # a hub dataset that is neither reachable nor cached (datasets raises OSError kinds)
        raise UserError(f"{field_name}: cannot load {source!r} split {split!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    (log.warning if stats.n_skipped else log.info)(stats.summary())
    return problems


def load_data(cfg: RunConfig):
    """(train problems, eval problems, reward name), before any model is loaded.

    Malformed rows, and rows that do not fit data.reward, are skipped and counted with their line
    numbers by data.py. A jsonl/parquet source without data.eval_path evaluates on a seeded
    held-out slice of its file, which is then not trained on.
    """
    from apo_llm.rewards import default_reward_for

    d = cfg.data
    local = d.source in FILE_SOURCES
    reward = d.reward or default_reward_for(d.source)  # validate() requires data.reward for local files
    train = _load("data.path" if local else "data.source", d.source, d.split, path=d.path, limit=d.limit,
                  seed=d.seed, synthetic_n=d.synthetic_n, reward=reward if local else None)
    eval_source = d.eval_source or ("math500" if d.source == "math" else d.source)
    if cfg.eval.every <= 0:
        return train, [], reward
    if local and eval_source == d.source and d.eval_path is None:
        hold = min(cfg.eval.num_problems, len(train) // 4)
        if hold < 1:
            raise UserError(f"data.eval_path: required ({d.path} has {len(train)} problems, too few to hold "
                            f"out an evaluation slice); or set eval.every 0")
        perm = np.random.default_rng([d.seed, 17]).permutation(len(train))
        held = set(perm[:hold].tolist())
        log.warning(f"data.eval_path not set: evaluating on a held-out slice of {hold} of the {len(train)} "
                    f"problems of {d.path}; they are not trained on")
        return [p for i, p in enumerate(train) if i not in held], [train[i] for i in sorted(held)], reward
    eval_local = eval_source in FILE_SOURCES
    evals = _load("data.eval_path" if eval_local else "data.eval_source", eval_source, d.eval_split,
                  path=d.eval_path, limit=cfg.eval.num_problems, seed=d.seed, reward=reward if eval_local else None)
    return train, evals, reward


# --------------------------------------------------------------------------------------------
# Inputs a resume must find unchanged; the context window
# --------------------------------------------------------------------------------------------


def _local_model_dir(model_path: str) -> Optional[Path]:
    """The folder holding the weights: a local path, or a hub id's snapshot in the local cache."""
    if Path(model_path).expanduser().is_dir():
        return Path(model_path).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception:  # not cached (or not a hub id): nothing to fingerprint here
        return None


def run_inputs(cfg: RunConfig, model_path: str, train_problems: list) -> dict:
    """Fingerprints of what the run trains on, saved in every checkpoint (checkpoint.py)."""
    d, out = cfg.data, {}
    if d.source in FILE_SOURCES:
        out["data.path"] = file_fingerprint(d.path)
    else:  # hub datasets and the synthetic generator: the problems as loaded
        out["data.source"] = problems_fingerprint(train_problems)
    if d.eval_path:
        out["data.eval_path"] = file_fingerprint(d.eval_path)
    for key, where in (("model.name_or_path", model_path), ("lora.adapter_path", cfg.lora.adapter_path)):
        folder = _local_model_dir(where) if where else None
        fp = weights_fingerprint(folder) if folder else None
        if fp:
            out[key] = fp
    return out


def _describe_change(old: dict, new: dict) -> str:
    if "sha256" in new and "file" in new:
        return (f"{new['file']} (size {old.get('size')} -> {new['size']} bytes, sha256 "
                f"{str(old.get('sha256'))[:12]} -> {new['sha256'][:12]})")
    if "problems" in new:
        return f"the loaded problems ({old.get('problems')} -> {new['problems']}, sha256 differs)"
    files = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "weight files " + ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")


def check_inputs(cfg: RunConfig, resume_from: Optional[Path], inputs: dict, layout: Layout = NATIVE) -> None:
    """Refuse to resume on other data or other base weights (unless checkpoint.allow_changed_inputs)."""
    if resume_from is None:
        return
    changed = changed_inputs(read_trainer_state(resume_from, layout).get("inputs"), inputs)
    if not changed:
        return
    what = "; ".join(f"{k}: {_describe_change(old, new)}" for k, (old, new) in changed.items())
    if cfg.checkpoint.allow_changed_inputs:
        log.warning(f"resume: inputs changed since {resume_from} ({what}); continuing "
                    f"(checkpoint.allow_changed_inputs)")
        return
    raise UserError(f"{what}: differs from what checkpoint {resume_from} was trained on; a resume needs the same "
                    f"inputs (pass --checkpoint.allow_changed_inputs true to continue anyway)")


def context_window(cfg: RunConfig, model_path: str) -> Optional[int]:
    """max_position_embeddings from the model's config.json (no weights loaded), or None if unknown."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # unreadable or not cached: load_base names the model
        return None
    c = getattr(c, "text_config", None) or c
    n = getattr(c, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_window(cfg: RunConfig, window: Optional[int], model_path: str) -> None:
    """Completions that cannot fit the context window are refused before the model loads."""
    if window is None:
        return
    for key, value in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if value is not None and value >= window:
            raise UserError(f"{key}={value}: must be below the context window of {model_path} "
                            f"(max_position_embeddings={window}), which also holds the prompt")


def drop_long_prompts(cfg: RunConfig, tokenizer, problems: list, window: Optional[int], max_new_tokens: int,
                      field_name: str) -> list:
    """The problems whose formatted prompt leaves max_new_tokens of room in the window; the others are
    skipped and counted with their line numbers (or ids)."""
    if window is None or not problems:
        return problems
    room = window - max_new_tokens
    prompts = format_for_run(cfg, tokenizer, [p.prompt for p in problems])
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    keep = [p for p, n in zip(problems, lengths) if n <= room]
    long = [p for p, n in zip(problems, lengths) if n > room]
    if long:
        where = [f"line {p.line}" if p.line is not None else p.id for p in long]
        log.warning(f"{field_name}: skipped {len(long)} of {len(problems)} prompts longer than {room} tokens (context "
                    f"window {window} - {max_new_tokens} new tokens): {', '.join(where[:5])}"
                    + (", ..." if len(where) > 5 else ""))
    if not keep:
        raise UserError(f"{field_name}: every prompt is longer than {room} tokens (context window {window} - "
                        f"{max_new_tokens} new tokens); lower rollout.max_new_tokens or use a longer-context model")
    return keep


def prepare_run_dir(cfg: RunConfig, layout: Layout = NATIVE) -> Optional[Path]:
    """The verified checkpoint to resume from (or None), after refusing to mix two runs; both engines.

    A run directory that already holds a run is only reused by a resume of it, or with
    logging.overwrite (the old run is moved aside by start_run_dir). `--resume auto` without any
    checkpoint yet starts afresh, saying so (a requeued job that was stopped before its first
    checkpoint; its partial run is moved aside). A resume whose settings differ from the
    checkpoint's config applies the loop settings (provenance.APPLIED_ON_RESUME) and refuses the rest.
    Call it holding the run lock: the fallback renames corrupt checkpoints.
    """
    run_dir = cfg.run_dir
    refuse_overwrite_with_resume(cfg)
    resume_from = resolve_resume(cfg.checkpoint.resume, run_dir, layout)  # CheckpointError names the bad file
    ours = (resume_from is not None
            and Path(resume_from).resolve().parent == checkpoint_root(run_dir, layout).resolve())
    if requeued_afresh(cfg, resume_from):
        log.warning(f"resume auto: no checkpoint in {run_dir} yet: starting afresh"
                    + (" (the partial run there is moved aside)" if holds_run(run_dir) else ""))
    else:
        refuse_mixing_runs(cfg, ours)
    if resume_from is not None:
        saved = read_trainer_state(resume_from, layout).get("config")
        applied, refused = resume_differences(saved or {}, cfg)
        if refused:
            key, (old, new) = next(iter(refused.items()))
            more = f" (also: {', '.join(list(refused)[1:])})" if len(refused) > 1 else ""
            raise UserError(f"{key}: {new!r} differs from {old!r} in checkpoint {resume_from}; a resumed run keeps "
                            f"its settings (drop the flag, or start a new run){more}")
        for key, (old, new) in applied.items():
            if key != "checkpoint.resume":
                log.info(f"resume: applying changed setting {key}: {old!r} -> {new!r}")
    return resume_from


def resuming(cfg: RunConfig) -> bool:
    return cfg.checkpoint.resume not in NO_RESUME


def requeued_afresh(cfg: RunConfig, resume_from: Optional[Path]) -> bool:
    """`--resume auto` and no checkpoint at all: the same command starts the run (requeue semantics)."""
    return cfg.checkpoint.resume == "auto" and resume_from is None


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / f).exists() for f in RUN_FILES)


def refuse_overwrite_with_resume(cfg: RunConfig) -> None:
    if cfg.logging.overwrite and resuming(cfg):
        raise UserError("logging.overwrite: cannot be combined with --resume (it would move the run aside)")


def refuse_mixing_runs(cfg: RunConfig, resumes_this_run: bool) -> None:
    """The run-dir guard of both engines: a directory holding a run is only reused by a resume of that
    run (`resumes_this_run`: the checkpoint lies in it), or moved aside with logging.overwrite."""
    if holds_run(cfg.run_dir) and not resumes_this_run and not cfg.logging.overwrite:
        raise UserError(f"logging.run_name: {cfg.run_dir} already holds a run"
                        + (" without an intact checkpoint" if resuming(cfg) else "")
                        + "; continue it with --resume auto, pick another --logging.run_name, or pass "
                          "--logging.overwrite true to move it aside")


def start_run_dir(cfg: RunConfig, aside: Optional[bool] = None) -> None:
    """Create the run directory; with logging.overwrite (or `aside`: a requeue that starts afresh)
    move an existing run to <name>.old-<time> first."""
    run_dir = cfg.run_dir
    if (cfg.logging.overwrite if aside is None else aside) and holds_run(run_dir):
        aside_dir = unused_path(run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
        os.replace(run_dir, aside_dir)
        log.warning(f"moved the previous run {run_dir} aside to {aside_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"logging.output_dir: cannot write the run directory {run_dir} ({e.strerror})") from None


# --------------------------------------------------------------------------------------------
# Per-step passes
# --------------------------------------------------------------------------------------------


def _micro_slices(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _trim(c: Completions, rows) -> tuple[torch.Tensor, torch.Tensor, int]:
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
        _reference_pass(cfg, model, comp, device, passes)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not single_pass(cfg, N):  # else update() fills old_logp / entropy from its own forward
        _old_pass(cfg, model, comp, device, passes)
    model.train(was_training)
    return passes, time.perf_counter() - t0, t_ref


def _reference_pass(cfg: RunConfig, model, comp: Completions, device, passes: RolloutPasses) -> None:
    """log pi_ref(y_t) [N, T] and, for losses with anchors, the safe manifold's Top-K ids + log-probs [N, T, K]."""
    lc = cfg.loss
    N, T = comp.completion_mask.shape
    k = lc.apo_k if lc.needs_anchors else 0
    passes.ref_logp = torch.zeros(N, T)
    if k:
        passes.anchor_ids = torch.zeros(N, T, k, dtype=torch.long)
        passes.anchor_ref_logp = torch.full((N, T, k), -math.inf)
    with reference_context(model):
        for sl in _micro_slices(N, cfg.train.micro_batch_size):
            ids, am, t = _trim(comp, sl)
            st = completion_token_stats(model, ids.to(device), am.to(device), comp.n_prompt,
                                        temperature=cfg.rollout.temperature, topk=k, chunk_size=cfg.train.chunk_size)
            passes.ref_logp[sl, :t] = st.logp.float().cpu()
            if k:  # only K ids + log-probs per position are kept
                passes.anchor_ids[sl, :t] = st.topk_ids.cpu()
                passes.anchor_ref_logp[sl, :t] = st.topk_logp.float().cpu()
    if k:
        passes.anchor_is_sampled = passes.anchor_ids == comp.completion_ids[..., None]  # y_t in M_t


def _old_pass(cfg: RunConfig, model, comp: Completions, device, passes: RolloutPasses) -> None:
    """log pi_old(y_t) and entropy [N, T]; log pi_old at the anchor ids [N, T, K] when the reading needs it."""
    gather = cfg.loss.needs_anchor_old
    if gather:
        passes.anchor_old_logp = torch.full(passes.anchor_ids.shape, -math.inf)
    for sl in _micro_slices(comp.completion_mask.shape[0], cfg.train.micro_batch_size):
        ids, am, t = _trim(comp, sl)
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


def _minibatch_backward(cfg: RunConfig, model, accelerator, comp: Completions, adv: torch.Tensor,
                        passes: RolloutPasses, device, mb_rows: torch.Tensor, sums: dict) -> tuple[bool, float, float]:
    """Accumulate the gradient of one minibatch over its micro-batches.

    Returns (finite, minibatch loss, completion tokens seen); `sums` collects token-weighted
    policy_loss diagnostics, turned into floats with one host sync for the whole minibatch.
    Stops at the first non-finite log-prob or loss (finite=False).
    """
    lc, tc = cfg.loss, cfg.train
    mask = comp.completion_mask
    fill_old = single_pass(cfg, mask.shape[0])
    stored = passes.stored()
    mb_tokens = float(mask[mb_rows].sum())
    mb_loss, weight, seen = 0.0, 0.0, []
    for sl in _micro_slices(len(mb_rows), tc.micro_batch_size):
        rows = mb_rows[sl]
        ids, am, t = _trim(comp, rows)
        gather = passes.anchor_ids[rows, :t].to(device) if lc.needs_anchors else None
        st = completion_token_stats(model, ids.to(device), am.to(device), comp.n_prompt,
                                    temperature=cfg.rollout.temperature, gather_ids=gather, topk=lc.policy_topk,
                                    want_entropy=lc.needs_entropy or fill_old, chunk_size=tc.chunk_size)
        if fill_old:  # the behaviour pass was skipped: this forward is pi_old
            passes.old_logp[rows, :t] = st.logp.detach().float().cpu()
            passes.entropy[rows, :t] = st.entropy.detach().float().cpu()
        m = mask[rows, :t].to(device)
        finite = bool(torch.isfinite(st.logp[m.bool()]).all())
        if finite:
            kw = loss_inputs(lc, st, stored, lambda x, r=rows, t=t: x[r, :t].to(device), old_is_current=fill_old)
            loss, metrics = policy_loss(
                lc, st.logp, passes.old_logp[rows, :t].to(device), adv[rows].to(device), m,
                global_tokens=max(mb_tokens, 1.0), global_seqs=len(mb_rows), sync_metrics=False, **kw)
            loss_value = float(loss.detach())  # the one read-back of the loss, before backward is queued
            finite = math.isfinite(loss_value)
        if not finite:
            break
        accelerator.backward(loss)
        mb_loss += loss_value
        w = float(mask[rows, :t].sum())  # the CPU mask: no device sync
        weight += w
        seen.append((w, metrics))
    _add_weighted(sums, seen)
    return finite, mb_loss, weight


def _add_weighted(sums: dict, seen: list[tuple[float, dict]]) -> None:
    """sums[k] += w * v for every micro-batch's (w, 0-d tensor metrics), with ONE host sync. The
    floats equal policy_loss(sync_metrics=True)'s (the same metrics_to_floats conversion, one call)."""
    if not seen:
        return
    flat = {(i, k): v for i, (_, metrics) in enumerate(seen) for k, v in metrics.items()}
    floats = metrics_to_floats(flat)
    for (i, k), v in floats.items():
        sums[k] = sums.get(k, 0.0) + seen[i][0] * v


def all_finite(params) -> bool:
    """One device sync for every tensor (the per-step check; nonfinite_weights names them, slowly)."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()) if params else True


def nonfinite_weights(params) -> list[str]:
    """Names (or indices) of the given trainable tensors that hold a NaN or inf."""
    items = params.items() if isinstance(params, dict) else enumerate(params)
    return [str(n) for n, p in items if not torch.isfinite(p.detach()).all()]


def update(cfg: RunConfig, model, optimizer, scheduler, accelerator, comp: Completions, adv: torch.Tensor,
           passes: RolloutPasses, device) -> dict[str, float]:
    """ppo_epochs over shuffled minibatches, gradient accumulation over micro-batches.

    A minibatch with a non-finite log-prob, loss or gradient is skipped. After every optimizer step
    the trainable weights are checked: a non-finite weight rolls the whole step back (weights,
    optimizer, scheduler) to its start, the last good state. Returns token-weighted means of the
    policy_loss diagnostics, grad_norm, and counts of skipped updates and rollbacks.
    """
    tc = cfg.train
    N = comp.input_ids.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    last_good = _snapshot(params, optimizer, scheduler)
    sums: dict[str, float] = {}
    weight, grad_norms, mb_losses, skipped = 0.0, [], [], 0
    model.train()
    for _ in range(tc.ppo_epochs):
        order = torch.randperm(N)  # global torch RNG: restored on resume
        for mb_start in range(0, N, tc.mini_batch_size):
            finite, mb_loss, w = _minibatch_backward(cfg, model, accelerator, comp, adv, passes, device,
                                                     order[mb_start: mb_start + tc.mini_batch_size], sums)
            weight += w
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
    # diagnostics: token-weighted means over micro-batches (fractions and means of token quantities)
    out = {k: v / weight for k, v in sums.items() if k not in ("loss", "pg_loss", "num_tokens")} if weight else {}
    out["loss"] = float(np.mean(mb_losses)) if mb_losses else float("nan")
    out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
    out["nonfinite/skipped_updates"] = float(skipped)
    out["nonfinite/weights_rolled_back"] = 0.0
    out["optimizer_steps"] = float(len(grad_norms))
    return out


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
# Held-out pass@k (small; the standalone evaluator is apo_llm.evaluate)
# --------------------------------------------------------------------------------------------


def evaluate_pass_at_k(cfg: RunConfig, model, tokenizer, problems, prompts: list[str], reward: str) -> dict:
    """pass@k (unbiased, metrics.pass_at_k) and mean reward on held-out problems, fixed sampling seed."""
    from apo_llm.rewards import score_completions

    e = cfg.eval
    comp = generate_completions(model, tokenizer, prompts, e.num_samples,
                                max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
                                temperature=e.temperature or cfg.rollout.temperature,
                                batch_size=cfg.rollout.batch_size, seed=e.seed)
    golds = [problems[i].gold for i in comp.prompt_index]
    r = np.asarray(score_completions(reward, comp.texts, golds), dtype=float).reshape(len(problems), e.num_samples)
    c = (r > 0.5).sum(-1)
    out = {f"eval/pass@{k}": float(np.mean(pass_at_k(e.num_samples, c, k))) for k in e.k}
    out["eval/mean_reward"] = float(r.mean())
    out["eval/clipped_ratio"] = float(comp.truncated.float().mean())
    out["correct"] = c.tolist()  # per problem: the paired change between two evaluations needs them
    return out


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (one line per step and per evaluation) + optional TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, keep_lines: Optional[int] = None):
        self.path = run_dir / "metrics.jsonl"
        if keep_lines is not None and self.path.exists():  # resume: drop lines written after the checkpoint
            lines = self.path.read_text().splitlines(keepends=True)[:keep_lines]
            self.path.write_text("".join(lines))
        elif keep_lines is None and self.path.exists():
            self.path.unlink()
        self.lines = sum(1 for _ in self.path.open()) if self.path.exists() else 0
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def summary_line(step: int, m: dict) -> str:
    parts = [f"step {step}", f"reward {m['reward']:.3f}", f"zero_std {m['frac_reward_zero_std']:.2f}",
             f"len {m['completions/mean_length']:.1f}", f"trunc {m['completions/clipped_ratio']:.2f}",
             f"H {m['entropy']:.3f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "apo/manifold_mass" in m:
        parts.append(f"M-mass {m['apo/manifold_mass']:.3f} outside {m['apo/outside_topk_frac']:.3f}")
    parts += [f"gnorm {m['grad_norm']:.3f}", f"lr {m['learning_rate']:.2e}", f"{m['timing/step']:.1f}s"]
    return " | ".join(parts)


def loud_warnings(m: dict) -> None:
    if m["completions/clipped_ratio"] > TRUNCATION_WARN:
        msg = (f"{100 * m['completions/clipped_ratio']:.0f}% of completions hit rollout.max_new_tokens without EOS: "
               f"rewards are mostly from truncated text; raise rollout.max_new_tokens")
        log.warning(msg)
    if m["frac_reward_zero_std"] > ZERO_STD_WARN:
        msg = (f"{100 * m['frac_reward_zero_std']:.0f}% of groups have identical rewards: their advantages are 0 "
               f"and they give no gradient (task too easy/hard, or the reward never fires)")
        log.warning(msg)


# --------------------------------------------------------------------------------------------
# The run
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


def take_run_lock(cfg: RunConfig) -> RunLock:
    """The run directory's lock (apo_llm.runlock), before anything in it is written or renamed."""
    return RunLock(cfg.run_dir, "logging.run_name: the run directory", "logging.output_dir").acquire()


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


def load_base(cfg: RunConfig, device: Optional[str], *, gradient_checkpointing: bool = False):
    """(base model, tokenizer, resolved path); shared with the TRL engine. A model that cannot be
    loaded is a UserError naming model.name_or_path."""
    model_path = resolve_model_path(cfg)  # may build the tiny model on first use, which draws random numbers
    m = cfg.model
    try:
        base, tokenizer = load_model_and_tokenizer(
            model_path, dtype=m.dtype, device=device, trust_remote_code=m.trust_remote_code,
            gradient_checkpointing=gradient_checkpointing, attn_implementation=m.attn_implementation,
            lm_head_fp32=want_lm_head_fp32(cfg), stop_token_ids=cfg.rollout.stop_token_ids,
            stop_on_template_eot=m.chat_template)
    except OSError as e:  # not found on the hub / in its cache, or an unreadable folder: transformers says which
        raise UserError(f"model.name_or_path: cannot load {model_path!r} ({str(e).splitlines()[0][:300]})") from None
    return base, tokenizer, model_path


def add_lora(cfg: RunConfig, base):
    """Seed, then wrap in LoRA (seeding after the build: a first run, which builds the tiny model, equals a second)."""
    seed_everything(cfg.train.seed)
    lo = cfg.lora
    targets = lo.target_modules if lo.target_modules == "all-linear" else [t.strip() for t in
                                                                          lo.target_modules.split(",")]
    return wrap_lora(base, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=targets,
                     adapter_path=lo.adapter_path)


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


def rl_step(s: Setup, problems: list) -> dict[str, float]:
    """One step of the algorithm: generate -> score -> advantages -> old/reference pass -> update."""
    from apo_llm.rewards import score_completions

    cfg, r, t = s.cfg, s.cfg.rollout, s.cfg.train
    timing: dict[str, float] = {}
    with _timed(timing, "generate"):
        prompts = format_for_run(cfg, s.tokenizer, [p.prompt for p in problems])
        comp = generate_completions(s.policy, s.tokenizer, prompts, r.num_generations, max_new_tokens=r.max_new_tokens,
                                    temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, batch_size=r.batch_size)
    with _timed(timing, "reward"):
        golds = [problems[i].gold for i in comp.prompt_index]
        rewards, n_bad = finite_rewards(score_completions(s.reward_name, comp.texts, golds), s.reward_name)
        adv = group_advantages(rewards, r.num_generations, t.advantage, std=t.adv_std, k=t.passk_k)
    passes, timing["old_logp"], timing["reference"] = behaviour_and_reference(cfg, s.policy, comp, s.device)
    with _timed(timing, "update"):
        upd = update(cfg, s.model, s.optimizer, s.scheduler, s.accelerator, comp, adv, passes, s.device)
    m = step_metrics(cfg, comp, rewards, passes, upd, s.optimizer)
    m.update({f"timing/{k}": v for k, v in timing.items()})
    m["nonfinite/rewards"] = float(n_bad)
    return m


@contextlib.contextmanager
def _timed(timing: dict, name: str):
    t0 = time.perf_counter()
    yield
    timing[name] = time.perf_counter() - t0


def _start_state(s: Setup) -> tuple[dict, PromptSampler]:
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


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary dict (also written to summary.json).
    SIGTERM / SIGINT: the step under way is finished and checkpointed, then SystemExit(128 + signum)."""
    with Preemption() as stop:
        s = setup(cfg)
        try:
            return _train(s, stop)
        finally:
            s.lock.release()


def _train(s: Setup, stop: Preemption) -> dict:
    from tqdm.auto import tqdm

    cfg = s.cfg
    state, sampler = _start_state(s)
    keep = state["metrics_lines"] if s.resume_from else None  # resume: drop lines written after the checkpoint
    mlog = MetricsLog(cfg.run_dir, cfg.logging.tensorboard, keep_lines=keep)
    evaluator = _Evaluator(s, mlog, state)
    if evaluator.on and state["step"] == 0:
        evaluator(0, log.info)
    tty = quiet_progress_unless_tty()  # a bar only on a terminal; redirected logs get one plain line per step
    bar = tqdm(total=cfg.train.steps, initial=state["step"], desc="apo_llm.train", unit="step",
               disable=not (cfg.logging.progress and tty), dynamic_ncols=True)
    say = (tqdm.write if tty else log.info) if cfg.logging.progress else (lambda _: None)
    last_ckpt = latest_checkpoint(cfg.run_dir)
    try:
        while state["step"] < cfg.train.steps and not stop.requested:
            step = state["step"] + 1
            t_step = time.perf_counter()
            m = rl_step(s, [s.train_problems[i] for i in sampler.take(cfg.train.prompts_per_step)])
            nonfinite = m["nonfinite/skipped_updates"] > 0
            state["consecutive_nonfinite"] = state["consecutive_nonfinite"] + 1 if nonfinite else 0
            state["nonfinite_total"] += int(nonfinite)
            state.update(step=step, data_position=sampler.position)
            dt = time.perf_counter() - t_step
            m.update({"timing/step": dt, "tokens_per_second": m["num_tokens"] / dt,
                      "memory/peak_mb": peak_memory_mb(s.device),
                      "nonfinite/steps_total": float(state["nonfinite_total"])})
            mlog.write({"step": step, **m})
            loud_warnings(m)
            bar.update(1)
            say(summary_line(step, m))
            last_ckpt = _after_step(s, state, mlog, evaluator, say, nonfinite, last_ckpt)
            if cfg.train.stop_at_step is not None and cfg.train.stop_at_step <= step < cfg.train.steps:
                log.info(f"stopping after step {step} (train.stop_at_step); resume with --resume auto")
                break
        if stop.requested:
            _preempted(s, state, mlog, last_ckpt, stop)
    finally:
        bar.close()
        mlog.close()
    return _finish(s, state, evaluator, last_ckpt)


def _preempted(s: Setup, state: dict, mlog, last_ckpt: Optional[Path], stop: Preemption) -> None:
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


class _Evaluator:
    """Held-out pass@k at fixed steps, written to metrics.jsonl and kept in the loop state."""

    def __init__(self, s: Setup, mlog: "MetricsLog", state: dict):
        self.s, self.mlog, self.state = s, mlog, state
        self.on = s.cfg.eval.every > 0 and bool(s.eval_problems)
        self.prompts = format_for_run(s.cfg, s.tokenizer, [p.prompt for p in s.eval_problems])

    def __call__(self, step: int, say=None) -> dict:
        t0 = time.perf_counter()
        s = self.s
        ev = evaluate_pass_at_k(s.cfg, s.policy, s.tokenizer, s.eval_problems, self.prompts, s.reward_name)
        ev.update(step=step, **{"timing/eval": time.perf_counter() - t0})
        self.mlog.write(ev)
        self.state["eval_history"].append(ev)
        if say is not None:
            say(f"eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("eval/")))
        return ev


def _after_step(s: Setup, state: dict, mlog, evaluator: _Evaluator, say, nonfinite: bool, last_ckpt):
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


def _finish(s: Setup, state: dict, evaluator: _Evaluator, last_ckpt) -> dict:
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


def finite_rewards(raw: list[float], reward_name: str) -> tuple[torch.Tensor, int]:
    """Rewards as a tensor with NaN/inf replaced by 0 (a failed check is no reward), and how many were."""
    r = torch.tensor(raw, dtype=torch.float32)
    bad = ~torch.isfinite(r)
    n_bad = int(bad.sum())
    if n_bad:
        log.warning(f"{n_bad} of {r.numel()} rewards from {reward_name!r} were NaN/inf; counted as 0")
    return torch.where(bad, torch.zeros_like(r), r), n_bad


def check_weights(policy, step: int, last_ckpt: Optional[Path]) -> None:
    """Refuse to save non-finite weights: stop, naming the last good checkpoint."""
    bad = nonfinite_weights({n: p for n, p in policy.named_parameters() if p.requires_grad})
    if bad:
        raise NonFiniteError(f"non-finite values in {len(bad)} trainable weights (e.g. {bad[0]}) at step {step}; "
                             f"nothing saved. Last good checkpoint: {last_ckpt} (resume with --resume auto)")


def step_metrics(cfg: RunConfig, comp: Completions, rewards: torch.Tensor, passes: RolloutPasses, upd: dict,
                 optimizer) -> dict[str, float]:
    """TRL/verl-named metrics of one step."""
    G = cfg.rollout.num_generations
    groups = rewards.view(-1, G)  # [P, G]
    lengths = comp.lengths.float()
    mask = comp.completion_mask.bool()
    m = {
        "reward": float(rewards.mean()),
        "reward_std": float(groups.std(-1, unbiased=False).mean()),  # TRL: mean within-group std
        "frac_reward_zero_std": float((groups.std(-1, unbiased=False) == 0).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(comp.truncated.float().mean()),
        "entropy": float(passes.entropy[mask].mean()) if mask.any() else 0.0,
        "num_tokens": float(mask.sum()),
        "learning_rate": float(optimizer.param_groups[0]["lr"]),
    }
    if passes.ref_logp is not None and mask.any():
        # KL(pi_old || pi_ref) on the sampled tokens (k3), whatever the loss: a drift diagnostic
        m["kl"] = float(kl_estimate("k3", passes.old_logp, passes.ref_logp, None)[mask].mean())
    for k, v in upd.items():
        if k == "kl":
            m["kl_loss_term"] = v  # the loss's own KL term (current policy, its estimator)
        elif k != "entropy":  # entropy is logged from the behaviour pass above
            m[k] = v
    return m


def refuse_several_processes(cfg: RunConfig) -> None:
    """The native loop is single-process (no gradient sync, data sharding or rank-0-only writes)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.engine == "native" and n > 1:
        raise ValueError(f"train.engine=native runs in one process, got WORLD_SIZE={n}; "
                         f"use --train.engine trl for several processes (docs/trainer_engines.md)")


def main(argv: Optional[list[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        refuse_several_processes(cfg)
    except ValueError as e:
        fail(f"config error: {e}")
    try:
        if cfg.train.engine == "trl":
            from apo_llm.trl_engine import train_trl

            summary = train_trl(cfg)
        else:
            summary = train(cfg)
    except UserError as e:  # exit code 2, one line naming the file or field
        fail(str(e))
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    if (Path(summary["run_dir"]) / "metrics.jsonl").is_file():
        from apo_llm.evaluate import training_report
        from apo_llm.plots import read_metrics

        print(training_report(*read_metrics(Path(summary["run_dir"]) / "metrics.jsonl"), cfg.eval.num_samples))
    return summary


if __name__ == "__main__":
    main()
