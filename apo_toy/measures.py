"""Exact measures of a tree policy, per prompt then averaged over the suite (no sampling).

    p            = sum_leaf P(leaf) r(leaf)                        success probability (pass@1)
    pass@k       = 1 - (1 - p)^k                                   (apo_llm.metrics.pass_at_k_exact)
    base-valid   = correct leaves with pi_ref(leaf) >= tau          tau = 1 / budget, budget = 256
    coverage     = share of base-valid leaves with pi(leaf) >= tau  (still expected >= once in
                                                                    `budget` samples)
    rsc_lost     = number of base-valid leaves with pi(leaf) < tau  (the RSC index, per prompt)
    distinct@k   = sum_{correct leaves} 1 - (1 - P(leaf))^k         expected distinct correct leaves
    manifold_mass= E_{s ~ d_pi}[ sum_{a in TopK(pi_ref)(s)} pi(a|s) ] averaged over depths
    entropy_d{t} = E_{s ~ d_pi at depth t}[ H(pi(.|s)) ];  entropy = mean over depths
    branch_{name}= P(named leaf)  (dominant, secondary, rare_in, rare_out)
    crossover_k  = smallest k in 1, 2, 4, ..., 1024 where the mean pass@k is below the reference's
                   (the Pass@K crossover k*); None when there is none up to 1024
    frac_prompts_below_base = share of prompts whose p fell below the reference's p

The on-policy expectations (manifold mass, entropy) weight each node by its reach probability
d(s), i.e. they are what a sampled token-mean of the LLM trainer would log.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from apo_llm.metrics import pass_at_k_exact

from .tree import Suite, level_slice, reach_and_leaf_logp

PASS_KS = (1, 4, 16, 64, 256, 1024)
CROSSOVER_KS = tuple(2**i for i in range(11))  # 1 .. 1024: the grid k* is read on
DEFAULT_BUDGET = 256


@torch.no_grad()
def measure(suite: Suite, logits: Tensor, budget: int = DEFAULT_BUDGET) -> dict[str, float]:
    """All exact measures of the policy softmax(logits) on `suite` (means over prompts)."""
    logpi = torch.log_softmax(logits.detach().to(torch.float64), -1)  # [P, N, b]
    pi = logpi.exp()
    log_reach, leaf_logp = reach_and_leaf_logp(logpi, suite.depth)
    leaf_p = leaf_logp.exp()  # [P, L]
    r = suite.rewards
    p = (leaf_p * r).sum(-1).clamp(0.0, 1.0)  # [P] success probability
    out: dict[str, float] = {}
    p_np = p.numpy()
    for k in PASS_KS:
        out[f"pass@{k}"] = float(np.mean(pass_at_k_exact(p_np, k)))
    out.update(crossover(p_np, base_success(suite).numpy()))
    tau = 1.0 / budget
    valid = _base_valid(suite, budget)  # [P, L]
    kept = valid & (leaf_p >= tau)
    n_valid = valid.sum(-1)
    has = n_valid > 0
    cov = kept.sum(-1)[has].double() / n_valid[has].double()
    out["coverage"] = float(cov.mean()) if has.any() else float("nan")
    out["rsc_lost"] = float((n_valid - kept.sum(-1)).double().mean())
    for k in (16, 256):
        out[f"distinct@{k}"] = float(((1.0 - (1.0 - leaf_p) ** k) * r).sum(-1).mean())
    reach = log_reach.exp()  # [P, N]
    mass = (pi * suite.in_topk).sum(-1)  # [P, N] policy mass on TopK(pi_ref)
    ent = -(pi * torch.where(pi > 0, logpi, torch.zeros_like(logpi))).sum(-1)  # [P, N]
    b = suite.branching
    mm, hs = [], []
    for t in range(suite.depth):
        sl = level_slice(b, t)
        mm.append(float((reach[:, sl] * mass[:, sl]).sum(-1).mean()))  # reach sums to 1 per level
        hs.append(float((reach[:, sl] * ent[:, sl]).sum(-1).mean()))
        out[f"entropy_d{t}"] = hs[-1]
    out["manifold_mass"] = float(np.mean(mm))
    out["entropy"] = float(np.mean(hs))
    for name, leaf in suite.named.items():
        present = leaf >= 0
        if present.any():
            idx = leaf.clamp(min=0)
            out[f"branch_{name}"] = float(leaf_p.gather(1, idx[:, None])[:, 0][present].mean())
    return out


def _base_valid(suite: Suite, budget: int) -> Tensor:
    """Correct leaves the reference reaches with probability >= 1/budget: [P, L] bool (cached)."""
    key = ("_base_valid", budget)
    cache = suite.__dict__.setdefault("_cache", {})
    if key not in cache:
        _, ref_leaf = reach_and_leaf_logp(suite.ref_logpi, suite.depth)
        cache[key] = (suite.rewards > 0) & (ref_leaf.exp() >= 1.0 / budget)
    return cache[key]


def crossover(p: np.ndarray, p_base: np.ndarray) -> dict:
    """Pass@K crossover of success probabilities p [P] against the reference's p_base [P].

    A tolerance of 1e-12 keeps rounding at the reference itself (p == p_base) from counting.
    """
    below = [k for k in CROSSOVER_KS
             if np.mean(pass_at_k_exact(p, k)) < np.mean(pass_at_k_exact(p_base, k)) - 1e-12]
    return {"crossover_k": below[0] if below else None,
            "frac_prompts_below_base": float(np.mean(p < p_base - 1e-12))}


def base_success(suite: Suite) -> Tensor:
    """Success probability of the reference per prompt, [P] (cached)."""
    cache = suite.__dict__.setdefault("_cache", {})
    if "_base_p" not in cache:
        cache["_base_p"] = per_prompt_success(suite, suite.ref_logits).clamp(0.0, 1.0)
    return cache["_base_p"]


def base_measures(suite: Suite, budget: int = DEFAULT_BUDGET) -> dict[str, float]:
    """Measures of the reference policy itself (the 'base model' row of every table)."""
    return measure(suite, suite.ref_logits, budget)


def per_prompt_success(suite: Suite, logits: Tensor) -> Tensor:
    """Exact success probability p per prompt, [P]."""
    logpi = torch.log_softmax(logits.detach().to(torch.float64), -1)
    _, leaf_logp = reach_and_leaf_logp(logpi, suite.depth)
    return (leaf_logp.exp() * suite.rewards).sum(-1)
