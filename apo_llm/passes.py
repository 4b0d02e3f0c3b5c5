"""What the no-grad passes over a batch of rollouts hand to the loss, shared by both engines.

`objectives.required_inputs(cfg)` decides which optional `policy_loss` tensors a loss needs;
`reference_pass` is the one reference pass of both engines and `loss_inputs` the one place that builds them, from the stored old/reference passes and the
training forward (native trainer, apo_llm/train.py, and TRL engine, apo_llm/trl_engine.py).
The readings of r_anchor (docs/method.md, `loss.apo_anchor_norm`) old_mass / old_token need
log pi_old at the reference Top-K ids: the reference pass runs first, then the old pass gathers
at its ids. When the old pass is skipped (one epoch, one minibatch) pi_old is pi_theta detached,
so the training forward's gather at the same ids is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from apo_llm.modeling import reference_context
from apo_llm.objectives import LossConfig, required_inputs

# Optional loss inputs the training forward computes; the rest come from the stored passes.
FROM_FORWARD = ("anchor_logp", "entropy", "policy_topk_logp")


@dataclass
class RolloutPasses:
    """The old (behaviour) and reference passes over N rollouts, padded to T completion tokens.

    old_logp, entropy, ref_logp: [N, T]; anchor_ids (the Top-K ids of pi_ref, the safe manifold
    candidates), anchor_ref_logp, anchor_old_logp (log pi_old at anchor_ids): [N, T, K];
    anchor_is_sampled: [N, T, K] bool, y_t == anchor id. None where the loss does not need it.
    """

    old_logp: Tensor
    entropy: Tensor
    ref_logp: Optional[Tensor] = None
    anchor_ids: Optional[Tensor] = None
    anchor_ref_logp: Optional[Tensor] = None
    anchor_is_sampled: Optional[Tensor] = None
    anchor_old_logp: Optional[Tensor] = None

    def stored(self) -> dict[str, Tensor]:
        """The stored tensors by their `policy_loss` keyword (those that were computed)."""
        names = ("ref_logp", "anchor_ref_logp", "anchor_is_sampled", "anchor_old_logp")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def loss_inputs(cfg: LossConfig, stats, stored: Mapping[str, Tensor], take: Callable[[Tensor], Tensor],
                *, old_is_current: bool) -> dict[str, Tensor]:
    """The optional `policy_loss` keywords `required_inputs(cfg)` names, and only those.

    stats: the training forward's modeling.TokenStats (gathered_logp at the anchor ids, entropy, and
    the policy's own Top-K log-probs when the forward ran with topk = cfg.policy_topk);
    stored: full-batch tensors (RolloutPasses.stored() or the TRL batch), cut to the rows and
    columns of this forward by `take`. old_is_current: the old pass was skipped, so pi_old is
    pi_theta detached and anchor_old_logp is the forward's own gather, detached.
    """
    fresh = {"anchor_logp": stats.gathered_logp, "entropy": stats.entropy, "policy_topk_logp": stats.topk_logp}
    if old_is_current and stats.gathered_logp is not None:
        fresh["anchor_old_logp"] = stats.gathered_logp.detach()
    out = {}
    for name in sorted(required_inputs(cfg)):
        if fresh.get(name) is not None:
            out[name] = fresh[name]
        elif name in stored and name not in FROM_FORWARD:
            out[name] = take(stored[name])
        else:  # a loss asking for a tensor no pass produced: say which, instead of a None deep in the loss
            raise ValueError(f"loss.name={cfg.name!r}: needs {name}, which the trainer did not compute")
    return out


@torch.no_grad()
def reference_pass(cfg: LossConfig, policy, stats_of: Callable, completion_ids: Tensor, row_slices: Iterable,
                   device: torch.device) -> dict[str, Tensor]:
    """The reference pass, both engines: log pi_ref(y_t) [N, T] with the adapter off and, for losses
    with anchors, the safe manifold M_t = TopK_K(pi_ref(. | y_<t)): its ids and log-probs [N, T, K]
    and whether y_t is one of them. Only K ids and log-probs per position are kept, never the vocabulary.

    policy: the PEFT model whose adapter `reference_context` switches off; stats_of(rows, topk) ->
    (modeling.TokenStats of those rows, their trimmed width t), the engine's own forward;
    completion_ids [N, T]; the outputs live on `device`.
    """
    N, T = completion_ids.shape
    k = cfg.apo_k if cfg.needs_anchors else 0
    out = {"ref_logp": torch.zeros(N, T, device=device)}
    if k:
        out["anchor_ids"] = torch.zeros(N, T, k, dtype=torch.long, device=device)
        out["anchor_ref_logp"] = torch.full((N, T, k), -math.inf, device=device)
    with reference_context(policy):
        for rows in row_slices:
            st, t = stats_of(rows, k)
            out["ref_logp"][rows, :t] = st.logp.float().to(device)
            if k:
                out["anchor_ids"][rows, :t] = st.topk_ids.to(device)
                out["anchor_ref_logp"][rows, :t] = st.topk_logp.float().to(device)
    if k:
        out["anchor_is_sampled"] = out["anchor_ids"] == completion_ids.to(device)[..., None]  # y_t in M_t
    return out
