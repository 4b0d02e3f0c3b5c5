"""Batched sampling of G completions per prompt with `generate`.

Sampling is plain ancestral sampling at the configured temperature with top_k=0 and top_p=1 by
default, and the model's own generation_config (which for instruct models often sets top_k,
top_p or a repetition penalty) is replaced for the call: the trainer's log-probs
(log softmax(z / temperature)) are then exactly the sampling distribution. Tokens after the first
EOS are masked; completions without EOS within max_new_tokens are counted as truncated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from apo_llm.modeling import unwrap_causal_lm


@dataclass
class Completions:
    """A prompt-major batch: rows r*G .. r*G+G-1 answer prompt r (the GRPO groups)."""

    input_ids: Tensor  # [N, L] left-padded prompt block (width n_prompt) + right-padded completions
    attention_mask: Tensor  # [N, L]
    n_prompt: int
    completion_mask: Tensor  # [N, T] 1 on completion tokens up to and including the first EOS
    texts: list[str]  # decoded completions (up to the first EOS, special tokens stripped)
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    prompt_index: list[int]  # prompt answered by each row

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.n_prompt:]  # [N, T]

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)  # [N]

    def select(self, rows) -> "Completions":
        """A sub-batch (for micro-batching); keeps the common prompt width."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Completions(self.input_ids[idx], self.attention_mask[idx], self.n_prompt, self.completion_mask[idx],
                           [self.texts[i] for i in idx.tolist()], self.truncated[idx],
                           [self.prompt_index[i] for i in idx.tolist()])


def eos_ids(model, tokenizer) -> list[int]:
    """All ids that end a completion: the generation config's eos ids plus the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(unwrap_causal_lm(model), "generation_config", None), "eos_token_id", None)
    for x in (gen_eos, tokenizer.eos_token_id):
        if isinstance(x, int):
            ids.add(x)
        elif x is not None:
            ids.update(int(i) for i in x)
    if not ids:
        raise ValueError("tokenizer: no eos_token_id; completions could never end")
    return sorted(ids)


def completion_mask_after_eos(completion_ids: Tensor, eos: list[int], valid: Optional[Tensor] = None
                              ) -> tuple[Tensor, Tensor]:
    """(mask [N, T], truncated [N]): 1 up to and including the first EOS; truncated = no EOS.

    valid [N, T] marks generated (not padding) positions; without it every position counts.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    if valid is not None:
        is_eos = is_eos & valid.bool()
    # number of EOS strictly before t: 0 -> still inside the completion (EOS itself included)
    before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = before == 0
    if valid is not None:
        mask = mask & valid.bool()
    return mask.long(), ~is_eos.any(-1)


@contextlib.contextmanager
def _clean_generation_config(model, cfg):
    """Temporarily replace the model's generation_config so no default of it leaks into sampling."""
    lm = unwrap_causal_lm(model)
    saved = lm.generation_config
    lm.generation_config = cfg
    try:
        yield
    finally:
        lm.generation_config = saved


def generate_completions(
    model, tokenizer, prompts: list[str], num_samples: int, *, max_new_tokens: int, temperature: float = 1.0,
    top_p: float = 1.0, top_k: int = 0, batch_size: int = 64, do_sample: bool = True, seed: Optional[int] = None,
) -> Completions:
    """Sample num_samples completions for each prompt (text already chat-formatted by the caller).

    Uses and advances the global torch RNG unless `seed` is given (then the global stream is left
    untouched). Rows are prompt-major: groups are consecutive.
    """
    from transformers import GenerationConfig

    if not prompts:
        raise ValueError("prompts: empty list")
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"num_samples/max_new_tokens/batch_size: must be >= 1, got "
                         f"{num_samples}/{max_new_tokens}/{batch_size}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature: must be > 0 for sampling, got {temperature}")
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    enc = _encode_left_padded(tokenizer, prompts)
    n_prompt = enc["input_ids"].shape[1]
    prompt_index = [i for i in range(len(prompts)) for _ in range(num_samples)]
    rows_ids = enc["input_ids"][prompt_index]  # [N, n_prompt] prompt-major repeat
    rows_mask = enc["attention_mask"][prompt_index]

    gen_cfg = GenerationConfig(
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        bos_token_id=getattr(tokenizer, "bos_token_id", None), num_beams=1, repetition_penalty=1.0,
        use_cache=True,
    )
    pieces = []
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with rng, torch.no_grad(), _clean_generation_config(model, gen_cfg):
            if seed is not None:
                torch.manual_seed(seed)
            for s in range(0, len(prompt_index), batch_size):
                ids = rows_ids[s: s + batch_size].to(device)
                out = model.generate(input_ids=ids, attention_mask=rows_mask[s: s + batch_size].to(device),
                                     generation_config=gen_cfg)
                pieces.append(out[:, n_prompt:].cpu())  # [b, T_b]
    finally:
        model.train(was_training)

    return _assemble(pieces, tokenizer, rows_ids, rows_mask, prompt_index, eos, pad)


def _encode_left_padded(tokenizer, prompts: list[str]):
    """Prompts left-padded to one width (generation appends on the right); the tokenizer's side is restored."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def _assemble(pieces: list, tokenizer, rows_ids, rows_mask, prompt_index: list[int], eos, pad) -> Completions:
    """Generated batches [b, T_b] -> one Completions: padded to the longest, masked after the first EOS."""
    n_prompt = rows_ids.shape[1]
    T = max(p.shape[1] for p in pieces)
    comp = torch.full((len(prompt_index), T), pad, dtype=torch.long)
    valid = torch.zeros((len(prompt_index), T), dtype=torch.bool)
    r = 0
    for p in pieces:
        comp[r: r + p.shape[0], : p.shape[1]] = p
        valid[r: r + p.shape[0], : p.shape[1]] = True
        r += p.shape[0]
    comp_mask, truncated = completion_mask_after_eos(comp, eos, valid)
    comp = torch.where(comp_mask.bool(), comp, torch.full_like(comp, pad))  # pad after the first EOS
    texts = tokenizer.batch_decode([row[m.bool()].tolist() for row, m in zip(comp, comp_mask)],
                                   skip_special_tokens=True)
    return Completions(
        input_ids=torch.cat([rows_ids, comp], dim=1),
        attention_mask=torch.cat([rows_mask, comp_mask], dim=1),
        n_prompt=n_prompt, completion_mask=comp_mask, texts=texts, truncated=truncated,
        prompt_index=prompt_index,
    )
