"""Range and consistency checks of the trainer's configuration (apo_llm.config.RunConfig).

Every check names its field (`train.mini_batch_size=48: must divide ...`); `validate` runs them in
three groups, what is loaded, the loop, the engines. Type and choice errors never reach here: the
parser (apo_llm.options) converts each value to its field's type first. This module reads the
config only through its attributes, so the schema (config.py) can import it without a circle.
"""

from __future__ import annotations

import typing

from apo_llm.cli import MIN_TEMPERATURE
from apo_llm.objectives import ADVANTAGE_ESTIMATORS


def choices(section, name: str) -> tuple:
    """The allowed values of a Literal field of a section dataclass."""
    return typing.get_args(typing.get_type_hints(type(section))[name])


def fill_loss_norm_len(cfg) -> None:
    """Dr. GRPO's constant normaliser defaults to the maximum completion length, the same for every
    micro-batch (the padded width would change with the micro-batch); both engines call this."""
    if cfg.loss.loss_agg == "seq-mean-token-sum-norm" and cfg.loss.loss_norm_len is None:
        cfg.loss.loss_norm_len = cfg.rollout.max_new_tokens


def validate(cfg) -> None:
    """Range and consistency checks; every error names the field. One line per check, in three
    groups (what is loaded, the loop, the engines) checked in this order."""
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            section, name = key.split(".")
            raise ValueError(f"{key}={getattr(getattr(cfg, section), name)!r}: {why}")

    for group in (_validate_inputs, _validate_loop, _validate_engines):
        group(cfg, need)


def _validate_inputs(cfg, need) -> None:
    """model, lora, data, rollout."""
    from apo_llm.data import FILE_SOURCES, SOURCES
    from apo_llm.modeling import DTYPES

    m, lo, d, r = cfg.model, cfg.lora, cfg.data, cfg.rollout
    need(bool(m.name_or_path), "model.name_or_path", "must be set")
    need(m.dtype in DTYPES, "model.dtype", f"choose from {sorted(DTYPES)}")
    need(lo.r >= 1, "lora.r", "must be >= 1")
    need(lo.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", "must lie in [0, 1)")
    need(bool(lo.target_modules), "lora.target_modules", "must be 'all-linear' or module names")
    need(d.source in SOURCES, "data.source", f"choose from {', '.join(SOURCES)}")
    need(d.source not in FILE_SOURCES or bool(d.path), "data.path", f"required for source {d.source!r}")
    need(d.limit is None or d.limit >= 1, "data.limit", "must be >= 1 or None")
    need(d.synthetic_n is None or d.synthetic_n >= 1, "data.synthetic_n", "must be >= 1 or None")
    need(r.num_generations >= 2, "rollout.num_generations", "group size G must be >= 2")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(r.temperature >= MIN_TEMPERATURE, "rollout.temperature",
         f"must be >= {MIN_TEMPERATURE:g} (below it logits / temperature overflow and sampling is not finite)")
    need(0.0 < r.top_p <= 1.0, "rollout.top_p", "must lie in (0, 1]")
    need(r.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)")
    need(r.batch_size >= 1, "rollout.batch_size", "must be >= 1")

def _validate_loop(cfg, need) -> None:
    """train, eval, checkpoint."""
    r, t, e, c = cfg.rollout, cfg.train, cfg.eval, cfg.checkpoint
    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    need(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
    rows = t.prompts_per_step * r.num_generations
    need(t.mini_batch_size >= 1 and rows % t.mini_batch_size == 0, "train.mini_batch_size",
         f"must divide the rollout rows prompts_per_step * num_generations = {rows}")
    need(t.micro_batch_size >= 1 and t.mini_batch_size % t.micro_batch_size == 0, "train.micro_batch_size",
         f"must divide train.mini_batch_size = {t.mini_batch_size}")
    need(t.lr > 0 and t.lr < 1, "train.lr", "must lie in (0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(len(t.adam_betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas),
         "train.adam_betas", "must be two numbers in [0, 1)")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    from transformers import SchedulerType

    need(t.scheduler in {s.value for s in SchedulerType}, "train.scheduler",
         f"choose from {sorted(s.value for s in SchedulerType)}")
    need(t.advantage in ADVANTAGE_ESTIMATORS, "train.advantage",
         "unknown estimator; see objectives.ADVANTAGE_ESTIMATORS")
    need(t.advantage != "passk" or t.passk_k is not None, "train.passk_k", "required with train.advantage=passk")
    need(t.passk_k is None or 1 <= t.passk_k <= r.num_generations, "train.passk_k",
         f"must lie in [1, rollout.num_generations={r.num_generations}]")
    need(t.adv_std in choices(t, "adv_std"), "train.adv_std", " | ".join(choices(t, "adv_std")))
    need(t.chunk_size >= 1, "train.chunk_size", "must be >= 1")
    need(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
    need(t.stop_at_step is None or t.stop_at_step >= 1, "train.stop_at_step", "must be >= 1 or None")
    need(t.num_threads >= 0, "train.num_threads", "must be >= 0")
    need(e.every >= 0, "eval.every", "must be >= 0")
    need(e.num_problems >= 1, "eval.num_problems", "must be >= 1")
    ks = e.k
    need(len(ks) >= 1 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks), "eval.k",
         "must be a list of integers >= 1")
    need(e.num_samples >= max(ks), "eval.num_samples", f"must be >= max(eval.k) = {max(ks)}")
    need(e.temperature is None or e.temperature >= MIN_TEMPERATURE, "eval.temperature",
         f"must be >= {MIN_TEMPERATURE:g} (below it sampling is not finite)")
    need(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    need(c.every >= 0, "checkpoint.every", "must be >= 0")
    need(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")

def _validate_engines(cfg, need) -> None:
    """Settings that depend on the loss, the data files or the engine."""
    from apo_llm.data import FILE_SOURCES

    d, r, t = cfg.data, cfg.rollout, cfg.train
    need(cfg.loss.kl_estimator != "full" or cfg.loss.kl_coef == 0, "loss.kl_estimator",
         "'full' (exact KL over the vocabulary) is not supported by the LLM trainer; use k1, k2 or k3")
    need(d.source not in FILE_SOURCES or d.reward is not None, "data.reward",
         f"required for source {d.source!r} (gsm8k_strict | gsm8k_flexible | math): it also picks the prompt "
         "suffix and which rows fit")
    need(d.eval_source not in FILE_SOURCES or bool(d.eval_path), "data.eval_path",
         f"required for eval_source {d.eval_source!r}")
    need(t.engine in choices(t, "engine"), "train.engine", "choose native or trl")
    need(r.engine in choices(r, "engine"), "rollout.engine", "choose hf or vllm")
    need(r.engine == "hf" or t.engine == "trl", "rollout.engine", "vllm needs train.engine: trl")
    need(all(isinstance(i, int) and i >= 0 for i in r.stop_token_ids), "rollout.stop_token_ids",
         "must be a list of token ids >= 0")
    need(all(x in ("wandb", "trackio") for x in cfg.logging.report_to), "logging.report_to",
         "choose from wandb, trackio (TensorBoard: logging.tensorboard)")
    need(not cfg.logging.report_to or t.engine == "trl", "logging.report_to", "needs train.engine: trl")
    if d.reward is not None:
        from apo_llm.rewards import REWARD_FNS

        need(d.reward in REWARD_FNS, "data.reward", f"choose from {sorted(REWARD_FNS)}")
