"""The bf16-vs-float32 gap of one update on one identical batch: the loss, r_anchor and the LoRA gradient.

`model.lm_head_fp32` exists because r_anchor = M_S / Z_ref is a ratio of probability masses read
off the logits, and bf16 rounds each logit by up to 2^-9 of its size (0.03 nats at |z| = 16), a
relative error of the same order on every pi(k) (docs/method.md). This module measures what the
float32 head buys. Every variant gets the same LoRA weights (moved off zero, so pi_theta != pi_ref),
the same completions (sampled once by the float32 model), the same advantages and the same anchor
set S (the float32 reference's Top-K ids), and is scored with the native trainer's building blocks
(completion_token_stats under reference_context, then objectives.policy_loss with pi_old = pi_theta,
the first minibatch of an update):

    fp32          the model in float32 (the yardstick)
    bf16_head32   weights in bf16, the output projection in float32 (lm_head_fp32 on)
    bf16          everything in bf16 (lm_head_fp32 off)

`precision_gaps` returns, per bf16 variant, |loss - loss_fp32|, the max and mean |r_anchor / r_anchor_fp32 - 1|
over completion tokens, and ||g - g_fp32|| / ||g_fp32|| of the LoRA gradient.
tests/llm/test_precision.py asserts them on the tiny model; benchmarks/gpu_smoke.py reports them
at Qwen2.5-0.5B shape.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from apo_llm.modeling import completion_token_stats, load_model_and_tokenizer, reference_context, wrap_lora
from apo_llm.objectives import _anchor_set, anchor_ratio_reading, policy_loss

VARIANTS = {"fp32": ("float32", False), "bf16_head32": ("bfloat16", True), "bf16": ("bfloat16", False)}


def _lora(cfg, base):
    lo = cfg.lora
    targets = lo.target_modules if lo.target_modules == "all-linear" else [t.strip() for t in
                                                                          lo.target_modules.split(",")]
    return wrap_lora(base, r=lo.r, alpha=lo.alpha, dropout=0.0, target_modules=targets)


def batch_quantities(cfg, model, comp, adv: Tensor, anchor_ids: Tensor, device) -> dict:
    """loss, r_anchor [N, T] (0 off the completion) and LoRA gradient of `model` on one batch.

    anchor_ids [N, T, K]: the anchor set's candidate ids, the same for every variant, so that the
    variants differ only by their arithmetic."""
    lc, temp, chunk = cfg.loss, cfg.rollout.temperature, cfg.train.chunk_size
    ids, am = comp.input_ids.to(device), comp.attention_mask.to(device)
    gather = anchor_ids.to(device)
    with reference_context(model):
        ref = completion_token_stats(model, ids, am, comp.n_prompt, temperature=temp, gather_ids=gather,
                                     chunk_size=chunk)
    st = completion_token_stats(model, ids, am, comp.n_prompt, temperature=temp, gather_ids=gather,
                                want_entropy=True, chunk_size=chunk)
    mask = comp.completion_mask.to(device)
    is_sampled = gather == comp.completion_ids.to(device)[..., None]  # [N, T, K] y_t == anchor id
    kw = dict(ref_logp=ref.logp.float(), anchor_logp=st.gathered_logp, anchor_ref_logp=ref.gathered_logp.float(),
              anchor_is_sampled=is_sampled, entropy=st.entropy)
    if lc.needs_anchor_old:
        kw["anchor_old_logp"] = st.gathered_logp.detach()
    loss, _ = policy_loss(lc, st.logp, st.logp.detach(), adv.to(device), mask, **kw)
    lora = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, lora)
    anc = anchor_ratio_reading(lc.apo_anchor_norm, st.gathered_logp.detach().float(), kw["anchor_ref_logp"],
                               kw.get("anchor_old_logp"), _anchor_set(lc, is_sampled))
    r_anchor = torch.where(mask.bool(), anc["r_anchor"], torch.zeros_like(anc["r_anchor"]))
    return {"loss": float(loss.detach()), "r_anchor": r_anchor.double().cpu(), "mask": mask.bool().cpu(),
            "grads": [g.double().cpu() for g in grads]}


def gap(ref: dict, other: dict) -> dict[str, float]:
    """How far `other` lies from the float32 yardstick `ref` (same batch, same weights)."""
    m = ref["mask"] & (ref["r_anchor"] > 0)  # tokens with a non-empty anchor set
    # relative: r_anchor spans decades (M_S / Z_ref reaches 1e3 where y_t holds almost all reference mass)
    dr = ((other["r_anchor"] - ref["r_anchor"]) / ref["r_anchor"])[m].abs()
    num = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(other["grads"], ref["grads"])))
    den = math.sqrt(sum(float((b ** 2).sum()) for b in ref["grads"]))
    return {"loss_abs": abs(other["loss"] - ref["loss"]), "r_anchor_rel_max": float(dr.max()),
            "r_anchor_rel_mean": float(dr.mean()), "grad_rel": num / den if den > 0 else float("nan")}


def precision_gaps(cfg, model_path: str, prompts: list[str], *, device: str = "cpu", lora_scale: float = 0.3,
                   seed: int = 0, variants: Optional[list[str]] = None) -> dict:
    """{variant: gap(...)} of each bf16 variant against float32, plus the batch's size and float32 values.

    cfg: a RunConfig (loss, LoRA shape, rollout.num_generations / max_new_tokens / temperature);
    prompts: already formatted. The LoRA weights are set to lora_scale * N(0, 1) (seeded)."""
    variants = variants or [v for v in VARIANTS if v != "fp32"]
    r = cfg.rollout
    base, tok = load_model_and_tokenizer(model_path, dtype="float32", device=device)
    model = _lora(cfg, base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(lora_scale * torch.randn(p.shape, generator=gen))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    from apo_llm.rollout import generate_completions

    comp = generate_completions(model, tok, prompts, r.num_generations, max_new_tokens=r.max_new_tokens,
                                temperature=r.temperature, seed=seed)
    N = comp.input_ids.shape[0]
    adv = torch.randn(N, generator=gen)  # both signs: the APO pull acts on A < 0
    with reference_context(model):
        anchors = completion_token_stats(model, comp.input_ids.to(device), comp.attention_mask.to(device),
                                         comp.n_prompt, temperature=r.temperature, topk=cfg.loss.apo_k).topk_ids
    ref = batch_quantities(cfg, model, comp, adv, anchors, device)
    del model, base
    out = {"rows": N, "tokens": int(ref["mask"].sum()), "loss_fp32": ref["loss"],
           "r_anchor_fp32_mean": float(ref["r_anchor"][ref["mask"]].mean())}
    for name in variants:
        dtype, head32 = VARIANTS[name]
        b, _ = load_model_and_tokenizer(model_path, dtype=dtype, device=device, lm_head_fp32=head32)
        m = _lora(cfg, b)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.copy_(state[n].to(p.dtype))
        out[name] = gap(ref, batch_quantities(cfg, m, comp, adv, anchors, device))
        del m, b
    return out
