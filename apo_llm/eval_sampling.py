"""Sampling and scoring one model for the evaluator, and selecting the base or an adapter.

Problems are cut into fixed batches of max(1, batch_size // n) in dataset order; each batch gets
a seed derived from (seed, batch index) only, so every model sees the same random streams and a
resumed batch redraws what a fresh run would. Sampling and scoring are the trainer's
(`rollout.generate_completions`, `rewards.score_completions`); the adapters are loaded with peft.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from apo_llm.eval_store import BASE_LABEL
from apo_llm.modeling import peft_trl_deprecation_quiet

def batch_seed(seed: int, chunk: int) -> int:
    """Seed of one problem batch: depends only on (seed, batch index), so models share random
    streams (common random numbers) and a resumed batch redraws what a fresh run would."""
    return zlib.crc32(f"{seed}/{chunk}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Sampling and scoring one model
# --------------------------------------------------------------------------------------------


def evaluate_model(label: str, model: Any, tokenizer: Any, problems: Sequence[Any], prompts: Sequence[str],
                   cfg: Any, reward_name: str, done: set, out_file: Path, *,
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


def _records(label: str, problems, idx: list[int], cfg: Any, sampled, greedy, rewards: np.ndarray,
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
