"""Prompt formatting shared by the trainer, the TRL engine, the evaluator and the Top-K coverage tool."""

from __future__ import annotations

from typing import Any, Sequence


def format_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: str = "auto") -> list[str]:
    """Raw task prompts -> the text the model sees, as in training.

    chat_template 'auto' wraps each prompt as one user turn when the tokenizer has a chat
    template (instruct models), 'on' requires one, 'off' leaves the raw text.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template == "on" and not has_template:
        raise ValueError("chat_template: 'on' but the tokenizer has no chat template")
    if chat_template == "off" or not has_template:
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def format_for_run(cfg, tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """The prompts a training run (config.RunConfig) shows the model: model.chat_template on/off."""
    return format_prompts(tokenizer, prompts, "auto" if cfg.model.chat_template else "off")
