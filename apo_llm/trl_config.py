"""How a RunConfig maps onto TRL's GRPOConfig (`train.engine: trl`), and what TRL is fed: the
dataset of chat-formatted prompts, the reward function, vLLM's stop ids. Fields with no TRL
equivalent are refused unless left at their default (UNMAPPED); docs/trainer_engines.md has the
field-by-field mapping."""

from __future__ import annotations

from typing import Any

import torch

from apo_llm.config import RolloutSection, RunConfig, TrainSection


# Fields with no TRL equivalent: refused when set to anything but this default (why, in the error).
UNMAPPED = {
    "rollout.batch_size": (RolloutSection().batch_size,
                           "TRL generates each process's generation batch in one call"),
    "train.stop_at_step": (TrainSection().stop_at_step, "TRL has no clean early exit; lower train.steps"),
    "train.max_consecutive_nonfinite": (TrainSection().max_consecutive_nonfinite,
                                        "TRL does not skip non-finite steps"),
}


def _need(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: {why} (train.engine: trl; see docs/trainer_engines.md)")


def check_trl_config(cfg: RunConfig, world_size: int) -> None:
    """Refuse, naming the field, what the TRL engine cannot run as configured."""
    t, r = cfg.train, cfg.rollout
    rows = t.prompts_per_step * r.num_generations
    _need(t.mini_batch_size == rows, "train.mini_batch_size", t.mini_batch_size,
          f"must equal prompts_per_step * num_generations = {rows}: one optimizer step per pass over the "
          f"rollouts, the only layout where TRL's token normaliser is the real token count")
    _need(rows % (world_size * t.micro_batch_size) == 0, "train.micro_batch_size", t.micro_batch_size,
          f"processes ({world_size}) x micro_batch_size must divide the rollout rows {rows}")
    _need(cfg.eval.every == 0, "eval.every", cfg.eval.every,
          "no periodic pass@k inside TRL; set 0 and run python -m apo_llm.evaluate on the saved adapter")
    _need(cfg.model.device in (None, "cpu", "cuda"), "model.device", cfg.model.device,
          "choose cpu, cuda or None (pick GPUs with CUDA_VISIBLE_DEVICES / the accelerate config)")
    _need(cfg.loss.kl_estimator != "full", "loss.kl_estimator", cfg.loss.kl_estimator, "use k1, k2 or k3")
    for key, (default, why) in UNMAPPED.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _need(value == default, key, value, f"no TRL equivalent ({why}); leave it at {default!r}")


def grpo_config(cfg: RunConfig, world_size: int = 1):
    """trl.GRPOConfig for `cfg` run on `world_size` processes (table in docs/trainer_engines.md)."""
    from trl import GRPOConfig

    check_trl_config(cfg, world_size)
    m, t, r, lc, lg, ck = cfg.model, cfg.train, cfg.rollout, cfg.loss, cfg.logging, cfg.checkpoint
    steps_per_gen = t.prompts_per_step * r.num_generations // (world_size * t.micro_batch_size)
    report = (["tensorboard"] if lg.tensorboard else []) + list(lg.report_to)
    kw: dict[str, Any] = dict(
        output_dir=str(cfg.run_dir), seed=t.seed, data_seed=cfg.data.seed,
        use_cpu=(m.device == "cpu"), bf16=(m.dtype == "bfloat16"), fp16=(m.dtype == "float16"),
        gradient_checkpointing=m.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if m.gradient_checkpointing else None,
        per_device_train_batch_size=t.micro_batch_size,
        # equal, so each optimizer step covers exactly one generation batch (see check_trl_config)
        gradient_accumulation_steps=steps_per_gen, steps_per_generation=steps_per_gen,
        num_iterations=t.ppo_epochs, max_steps=t.steps * t.ppo_epochs,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1],
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else 1e30,
        num_generations=r.num_generations, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, repetition_penalty=1.0,
        # KL, clipping and aggregation live in LossConfig; TRL's own loss never runs
        beta=0.0, loss_type="dapo", epsilon=lc.eps_low, epsilon_high=lc.eps_high,
        mask_truncated_completions=False, disable_dropout=False, remove_unused_columns=False,
        cast_lm_head_to_fp32=False,  # our head does the float32 cast itself (model.lm_head_fp32)
        logging_steps=1, report_to=report or "none", disable_tqdm=not lg.progress, log_completions=False,
        save_strategy="steps" if ck.every else "no", save_steps=ck.every * t.ppo_epochs or 500,
        save_total_limit=ck.keep_last,
    )
    if r.engine == "vllm":
        # colocate: vLLM shares the training GPUs; the sequence-level correction gives one weight per
        # completion, which policy_loss takes as `weights` (a token-level one it could not)
        kw.update(use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=True,
                  vllm_importance_sampling_mode="sequence_mask")
    return GRPOConfig(**kw)


def make_reward_func(name: str):
    """A TRL reward function scoring with apo_llm.rewards; the dataset's `gold` column arrives as a kwarg."""
    from apo_llm.rewards import score_completions

    def reward(completions, gold, **_):
        return score_completions(name, list(completions), list(gold))

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def build_dataset(cfg: RunConfig, tokenizer, problems):
    """datasets.Dataset(prompt = chat-formatted text, gold): TRL applies no template to plain strings."""
    from datasets import Dataset

    from apo_llm.prompts import format_for_run

    return Dataset.from_dict({"prompt": format_for_run(cfg, tokenizer, [p.prompt for p in problems]),
                              "gold": [p.gold for p in problems]})


def set_vllm_stops(args, model) -> None:
    """vLLM reads the stop ids from the checkpoint's generation_config.json, not from the model in
    memory: pass the ids our loader added there (rollout.stop_token_ids, the template's end-of-turn)."""
    if not args.use_vllm:
        return
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    args.generation_kwargs = {**(args.generation_kwargs or {}), "stop_token_ids": ids}


def epoch_sampler(sampler):
    """TRL's RepeatSampler, made resumable: the same prompts in the same order at every epoch whether
    the run was resumed or not (what `EpochRepeatSampler` fixes)."""
    return EpochRepeatSampler(sampler.data_source, sampler.mini_repeat_count, batch_size=sampler.batch_size,
                              repeat_count=sampler.repeat_count, shuffle=sampler.shuffle, seed=sampler.seed)


from trl.trainer.utils import RepeatSampler  # noqa: E402  (this module is only imported for engine: trl)


class EpochRepeatSampler(RepeatSampler):
    """RepeatSampler whose epoch e is always the e-th shuffle of its seeded stream.

    TRL's sampler draws each epoch's permutation from one generator seeded once, so epoch e's order
    depends on how many epochs this process iterated. A resumed run builds a fresh sampler and starts
    at epoch e with the stream's first permutation: other prompts than the uninterrupted run (issue
    21). transformers calls set_epoch(e) before every epoch (through accelerate's loader); without a
    set_epoch the sampler counts its own epochs, as TRL's does.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(self.epoch):  # replay the shuffles of the epochs before this one
                torch.randperm(self.num_samples, generator=self.generator)
        self.epoch += 1
        yield from super().__iter__()
