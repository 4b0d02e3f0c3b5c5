"""The setup both engines share: data, base model, LoRA, the run directory and its guards.

Everything a user can get wrong is checked here before the model loads (paths, the run directory:
locked, never two runs mixed, the checkpoint to resume, the data files, the context window), and
each mistake is a one-line UserError naming the field. The native loop (apo_llm.loop) and the TRL
engine (apo_llm.trl_engine) both build their runs from these functions; neither imports the other.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from apo_llm.checkpoint import (
    NATIVE, NO_RESUME, Layout, changed_inputs, checkpoint_root, file_fingerprint, problems_fingerprint,
    read_trainer_state, resolve_resume, unused_path, weights_fingerprint,
)
from apo_llm.cli import UserError, looks_local, world_size  # noqa: F401  (world_size: both engines)
from apo_llm.config import TINY_MODEL, RunConfig
from apo_llm.data import FILE_SOURCES
from apo_llm.modeling import load_model_and_tokenizer, want_lm_head_fp32, wrap_lora
from apo_llm.prompts import format_for_run
from apo_llm.provenance import resume_differences
from apo_llm.runlock import RunLock

log = logging.getLogger("apo_llm.train")

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
# Data, inputs and the context window
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

# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------


def take_run_lock(cfg: RunConfig) -> RunLock:
    """The run directory's lock (apo_llm.runlock), before anything in it is written or renamed."""
    return RunLock(cfg.run_dir, "logging.run_name: the run directory", "logging.output_dir").acquire()


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
# Base model and LoRA
# --------------------------------------------------------------------------------------------


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
