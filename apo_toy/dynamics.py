"""What the loss takes in the sampled and exact modes of tree policies (tabular or coupled).

Both modes build the token tensors of `apo_llm.objectives.policy_loss`, the function the LLM
trainer uses (`sampled_inputs`, `exact_inputs`; `sampled_loss` / `exact_loss` call it on them):
clipping, dual-clip, KL estimators, APO's rectified ratio and every aggregation behave here
exactly as there. The optimizer steps are apo_toy/training.py's loop.

Sampled mode (`sample_rollouts`, `sampled_inputs`): ancestral sampling of G responses per prompt
from pi_old, rewards, `group_advantages`, token tensors [B = P*G, T = D] (logp of each chosen
child, old logp, ref logp, anchors = log pi_theta at the reference Top-K children of each visited
node [B, D, K]), then `epochs` passes of `minibatches` optimizer steps each, as PPO does.

Exact mode (`exact_batch`, `exact_inputs`): the expected surrogate, with no sampling noise. For
binary rewards and the GRPO-family estimators the sign of A_i is fixed by r_i (A >= 0 if correct,
<= 0 if wrong) and every per-token loss is linear in A within a sign, so

    E[sampled loss](theta) = sum_p sum_{leaf} pi_old(leaf) sum_t loss_t(theta; leaf, c_{r(leaf)}(p, G)) / N

with c_r(p, G) = E[A | r] (`expected_group_advantage`, docs/theory.md section 4). This identity holds
for every theta (not only at theta_old), clipping included, because the loss at depth t depends on
the leaf only through the edge (node s_t, child a_t) and the advantage. We therefore group leaves
by edge: one "sequence" of length T = 1 per (edge, reward class) with weight

    W_r(s, a) = d_old(s) pi_old(a|s) P_old(r | s, a)       (P_old(1 | s, a) = Q_old(s, a))

so the cost is linear in the number of nodes (b * N edges, not D * b^D leaf tokens). The
normaliser that makes this equal the sampled token-mean is N = P * D (each prompt's edge weights
sum to 1 per depth): `global_tokens = P * D` (token-mean), `global_seqs = P * D`
(seq-mean-token-mean; seq-mean-token-sum-norm with the default length), `global_seqs = P` with
an explicit `loss_norm_len` L (the sampled loss divides by G * L per prompt).
KL-on-Wrong and Top-K KL on wrong put a term not proportional to A on A < 0 tokens only
(`LossConfig.needs_sign_split`), and a wrong response in a group without any success has A = 0:
for those the wrong class is split into A < 0 (probability q_0 = P(A != 0 | r = 0), advantage
c_0 / q_0) and A = 0, which keeps the identity exact.

Two groupings of the same expectation (`exact_batch(path=...)`):

- edge path (the default for per-token losses): the rows above, one per (edge, reward class);
  it needs every token's loss to depend on the leaf only through its own edge.
- leaf path (the default for `LossConfig.sequence_coupled` losses: GSPO's and GMPO's sequence
  ratio, GSPO-token, SimKO's per-sequence entropy quantile): one row per (leaf, reward class),
  a whole sequence of length T = D with weight pi_old(leaf) and advantage c_{r(leaf)}(p, G)
  (split by sign as above where `needs_sign_split`), through `sampled_loss`. The identity needs
  only that a response's loss depends on its own tokens and its own advantage, linearly in A
  within a sign, so
      E[sampled loss](theta) = sum_p sum_{leaf} pi_old(leaf) loss_seq(theta; leaf, c_{r(leaf)}(p, G)) / N
  with N = P * D (token-mean: global_tokens) or N = P (the per-sequence aggregations, whose rows
  have the sampled width D: global_seqs). Cost b^D rows per prompt (1000 at b=10, D=3; 1024 at
  b=32, D=2), against b * N edges; on a per-token loss both paths agree to rounding
  (tests/toy/test_toy_dynamics.py).

Clip-Cov / KL-Cov select tokens by a batch statistic (`LossConfig.batch_coupled`, also any
top_entropy_quantile < 1): their expected loss is not a sum over responses, so exact mode refuses
them on both paths (use sampled mode). CISPO, SAPO, GPG, DPPO and SimKO-per-token are per-token
terms linear in A within a sign: the edge path runs them.

What "exact" means with several epochs: each epoch is one full-batch step on the expected
surrogate with theta_old fixed (so PPO clipping acts as in the sampled loss). That is the
deterministic counterpart of sampled PPO epochs, not the expectation of the sampled parameter
trajectory (which is nonlinear in the samples). With epochs = 1 the update is exactly the
expected first update.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from apo_llm.objectives import LossConfig, expected_group_advantage, group_advantages, policy_loss, required_inputs

from .tree import Suite, path_to_leaf, reach_and_leaf_logp, success_q


# --------------------------------------------------------------------------------------------
# Node-level quantities used by the full-distribution terms (exact KL, entropy)
# --------------------------------------------------------------------------------------------


def node_kl_full(logpi: Tensor, ref_logpi: Tensor) -> Tensor:
    """KL(pi || pi_ref) per node: sum_a pi (log pi - log pi_ref). [P, N, b] -> [P, N]."""
    return (logpi.exp() * (logpi - ref_logpi)).sum(-1)


def node_entropy(logpi: Tensor) -> Tensor:
    """H(pi) = -sum_a pi log pi per node. [P, N, b] -> [P, N]."""
    return -(logpi.exp() * logpi).sum(-1)


def optional_inputs(cfg: LossConfig, builders: dict[str, Callable[[], Tensor]]) -> dict[str, Tensor]:
    """The optional policy_loss tensors `required_inputs(cfg)` names, each from its builder.

    The one place both modes decide what to compute, so a new optional input of the loss module
    cannot be silently left out by one of them (a missing builder is an error naming it).
    """
    need = sorted(required_inputs(cfg))
    missing = [n for n in need if n not in builders]
    if missing:
        raise ValueError(f"{missing[0]}: required by LossConfig(name={cfg.name!r}) but the simulator cannot build it")
    return {name: builders[name]() for name in need}


def _policy_topk(logpi: Tensor, k: int) -> Tensor:
    """log pi_theta at each node's own Top-min(k, b) children, sorted: [nodes, b] -> [nodes, K], with grad."""
    ids = logpi.detach().topk(min(k, logpi.shape[-1]), dim=-1).indices
    return logpi.gather(-1, ids)


def _once(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """fn, evaluated at most once (several anchor inputs share one Top-K gather)."""
    box: list = []
    return lambda: box[0] if box else (box.append(fn()) or box[0])


# --------------------------------------------------------------------------------------------
# Exact mode
# --------------------------------------------------------------------------------------------


def _check_sign_structure(group_size: int, adv_kwargs: dict) -> tuple[Tensor, Tensor]:
    """A(r; m) for r in {0, 1}, m successes among the G-1 others: [2, G] via `group_advantages`.

    Exact mode needs A(0; m) <= 0 <= A(1; m) for all m (loss linear in A within a sign).
    """
    G = group_size
    groups = [[r] + [1.0] * m + [0.0] * (G - 1 - m) for r in (0.0, 1.0) for m in range(G)]
    a = group_advantages(torch.tensor(groups, dtype=torch.float64).reshape(-1), G, **adv_kwargs)
    a = a.view(2, G, G)[:, :, 0]
    if (a[0] > 1e-12).any() or (a[1] < -1e-12).any():
        raise ValueError(f"adv: estimator {adv_kwargs} gives a wrong response A > 0 or a correct one A < 0; "
                         "exact mode needs the sign of A fixed by the reward (use sampled mode)")
    return a[0], a[1]


def _nonzero_prob(p: Tensor, a_r: Tensor) -> Tensor:
    """q_r = P(A != 0 | r) = sum_m Binom(m; G-1, p) 1[A(r; m) != 0]. p [P], a_r [G] -> [P]."""
    G = a_r.numel()
    m = torch.arange(G, dtype=p.dtype)
    comb = torch.tensor([math.comb(G - 1, k) for k in range(G)], dtype=p.dtype)
    pmf = comb * p[:, None] ** m * (1 - p[:, None]) ** (G - 1 - m)  # [P, G]; 0**0 = 1
    return (pmf * (a_r != 0)).sum(-1)


EXACT_PATHS = ("auto", "edge", "leaf")


@torch.no_grad()
def exact_batch(suite: Suite, cfg: LossConfig, logits_old: Tensor, group_size: int, adv_kwargs: dict,
                path: str = "auto") -> dict:
    """Everything of the exact surrogate that depends on theta_old only.

    path: "edge" (rows = (class, edge), cost linear in the nodes; per-token losses only), "leaf"
    (rows = (class, leaf), whole sequences of length D, cost b^D per prompt; any loss that is not
    batch-coupled) or "auto" (leaf for sequence-coupled losses, edge otherwise).
    Returns classes x rows weights [C, P, N, b] (edge) or [C, P, b^D] (leaf), advantages [C, P] and
    the normaliser.
    """
    if path not in EXACT_PATHS:
        raise ValueError(f"path: {path!r} not in {EXACT_PATHS}")
    if cfg.batch_coupled:
        raise ValueError(f"LossConfig.name={cfg.name!r}: its token selection depends on the whole sampled batch "
                         "(batch_coupled), so the expected surrogate is not a sum over responses; use mode='sampled'")
    if path == "auto":
        path = "leaf" if cfg.sequence_coupled else "edge"
    if path == "edge" and cfg.sequence_coupled:
        raise ValueError(f"LossConfig.name={cfg.name!r}: a token's loss depends on the rest of its sequence "
                         "(sequence_coupled), so the expected surrogate is not a sum over edges; use path='leaf'")
    logpi_old = torch.log_softmax(logits_old.detach(), -1)  # [P, N, b]
    pi_old = logpi_old.exp()
    log_reach, leaf_logp = reach_and_leaf_logp(logpi_old, suite.depth)
    q, v = success_q(pi_old, suite.rewards, suite.depth)  # Q_old(s, a), V_old(s)
    p = v[:, 0].clamp(0.0, 1.0)  # [P] success probability (rounding can leave [0, 1])
    a0, a1 = _check_sign_structure(group_size, adv_kwargs)
    c0, c1 = expected_group_advantage(p, group_size, **adv_kwargs)  # E[A | r] per prompt
    if path == "edge":
        w = log_reach.exp()[..., None] * pi_old  # [P, N, b] d_old(s) pi_old(a|s): sums to 1 per depth
        w1, w0 = w * q, w * (1.0 - q)  # mass of correct / wrong leaves below each edge
    else:
        w = leaf_logp.exp()  # [P, b^D] pi_old(leaf): sums to 1 per prompt
        w1, w0 = w * suite.rewards, w * (1.0 - suite.rewards)  # each leaf is in its own reward class
    if cfg.needs_sign_split:  # wrong (A < 0), correct (A > 0), and the A = 0 responses of zero-variance groups
        q0, q1 = _nonzero_prob(p, a0), _nonzero_prob(p, a1)
        safe = lambda c, qq: torch.where(qq > 0, c / qq.clamp(min=1e-300), torch.zeros_like(c))  # noqa: E731
        shape = (-1,) + (1,) * (w.dim() - 1)  # per prompt, broadcast over the rows of the prompt
        qb0, qb1 = q0.view(shape), q1.view(shape)
        weights = torch.stack([w0 * qb0, w1 * qb1, w0 * (1 - qb0) + w1 * (1 - qb1)])
        adv = torch.stack([safe(c0, q0), safe(c1, q1), torch.zeros_like(c0)])
    else:
        weights = torch.stack([w0, w1])
        adv = torch.stack([c0, c1])
    P, N, b = logits_old.shape
    D = suite.depth
    if cfg.loss_agg == "token-mean":
        norm = {"global_tokens": float(P * D)}
    elif path == "leaf":  # rows of width D as the sampled ones: the sampled per-prompt G becomes sum w = 1
        norm = {"global_seqs": float(P)}
    elif cfg.loss_agg == "seq-mean-token-mean" or cfg.loss_norm_len is None:
        norm = {"global_seqs": float(P * D)}
    else:  # seq-mean-token-sum-norm with an explicit length L: sampled divides by P G L
        norm = {"global_seqs": float(P)}
    return {"logpi_old": logpi_old, "weights": weights, "adv": adv, "norm": norm, "p": p, "c0": c0, "c1": c1,
            "path": path}


def _leaf_rows(suite: Suite, batch: dict) -> dict:
    """The leaf path's rows: one rollout of length D per (class, prompt, leaf) of nonzero weight.

    Returns the rollout dict (`leaf_rollouts`), old log-probs [R, D], advantages [R], weights [R].
    """
    if "leaf_rows" not in batch:
        C, P, L = batch["weights"].shape
        flat_w = batch["weights"].reshape(-1)
        ids = (flat_w != 0).nonzero().flatten()  # [R] class-major
        cls, prompt, leaf = ids // (P * L), (ids // L) % P, ids % L
        roll = leaf_rollouts(suite, prompt, leaf)
        _, N, b = batch["logpi_old"].shape
        old = batch["logpi_old"].reshape(P * N, b)[prompt[:, None] * N + roll["nodes"], roll["actions"]]  # [R, D]
        batch["leaf_rows"] = {"roll": roll, "old_logp": old, "adv": batch["adv"][cls, prompt], "weight": flat_w[ids]}
    return batch["leaf_rows"]


def _rows(suite: Suite, batch: dict, shape: tuple) -> tuple[dict, Tensor]:
    """Row index maps of the exact surrogate, and the row weights: (class, edge) rows of nonzero weight.

    A row of weight W_r(s, a) = 0 (no correct leaf below the edge for the correct class, say)
    contributes 0 * loss to the value and 0 * dloss to the gradient, so dropping it is exact; in a
    tree with few correct leaves this removes almost the whole correct class (about half the rows).
    The maps (and the theta-independent anchor tensors built on them) are cached on the suite and
    reused while the set of rows is unchanged, which it is from step to step unless a weight
    underflows to 0.
    """
    if "rows" not in batch:
        P, N, b = shape
        E = P * N * b
        flat_w = batch["weights"].reshape(-1)
        ids = (flat_w != 0).nonzero().flatten()  # [R] class-major row ids
        cache = suite.__dict__.setdefault("_cache", {})
        maps = cache.get("exact_rows")
        if maps is None or maps["ids"].shape != ids.shape or not torch.equal(maps["ids"], ids):
            edge = ids % E  # flat (p, n, a) edge id
            maps = {"ids": ids, "cls": ids // E, "edge": edge, "node": edge // b, "prompt": edge // (N * b),
                    "child": edge % b}
            cache["exact_rows"] = maps
        batch["rows"] = (maps, flat_w[ids])
    return batch["rows"]


def exact_loss(suite: Suite, cfg: LossConfig, logits: Tensor, batch: dict,
               diagnostics: bool = True) -> tuple[Tensor, dict]:
    """Expected sampled surrogate at `logits` (differentiable): `policy_loss` on `exact_inputs`.

    `diagnostics=False`: policy_loss skips its diagnostics (same loss and gradient, cheaper).
    """
    return policy_loss(cfg, **exact_inputs(suite, cfg, logits, batch), diagnostics=diagnostics)


def exact_inputs(suite: Suite, cfg: LossConfig, logits: Tensor, batch: dict) -> dict:
    """The keyword arguments of `policy_loss` for the expected surrogate at `logits` (differentiable).

    Edge path: one "sequence" of length 1 per (reward class, edge) of nonzero weight (`_rows`).
    Leaf path: one sequence of length D per (reward class, leaf) of nonzero weight (`_leaf_rows`),
    as `sampled_inputs` builds them.
    """
    if batch.get("path") == "leaf":
        r = _leaf_rows(suite, batch)
        return sampled_inputs(suite, cfg, logits, r["roll"], r["old_logp"], r["adv"], weights=r["weight"],
                              old_logpi=batch["logpi_old"], **batch["norm"])
    logpi = torch.log_softmax(logits, -1)  # [P, N, b]
    P, N, b = logpi.shape
    ix, weight = _rows(suite, batch, (P, N, b))
    R = weight.numel()

    def per_edge(x: Tensor) -> Tensor:  # [P, N, b] -> [R, 1]
        return x.reshape(-1)[ix["edge"]][:, None]

    def per_node(x: Tensor) -> Tensor:  # [P, N] -> [R, 1]
        return x.reshape(-1)[ix["node"]][:, None]

    topk = _once(lambda: suite.topk(cfg.apo_k).reshape(P * N, -1))  # [P*N, K]

    def fixed(key, fn: Callable[[], Tensor]) -> Tensor:  # theta-independent: built once per set of rows
        if key not in ix:
            ix[key] = fn()
        return ix[key]

    def anchors(x: Tensor) -> Tensor:  # [P, N, b] -> [R, 1, K], the node's Top-K for each of its edges
        # one index_select with a cached flat (node, Top-K child) index: its backward is one
        # index_add_, not an accumulating index_put_ followed by a scatter (gather's backward)
        flat = fixed(("anchor_flat", cfg.apo_k), lambda: (ix["node"][:, None] * b + topk()[ix["node"]]).reshape(-1))
        return x.reshape(-1).index_select(0, flat).view(R, 1, -1)

    def anchor_old() -> Tensor:  # pi_old at the anchors: fixed within one exact_batch
        if "anchor_old_logp" not in batch:
            batch["anchor_old_logp"] = anchors(batch["logpi_old"])
        return batch["anchor_old_logp"]

    kw = optional_inputs(cfg, {
        "ref_logp": lambda: per_edge(suite.ref_logpi),
        "kl_full": lambda: per_node(node_kl_full(logpi, suite.ref_logpi)),
        "entropy": lambda: per_node(node_entropy(logpi)),
        "anchor_logp": lambda: anchors(logpi),
        "anchor_ref_logp": lambda: fixed(("anchor_ref", cfg.apo_k), lambda: anchors(suite.ref_logpi)),
        # child a of the row's node is anchor k
        "anchor_is_sampled": lambda: fixed(("anchor_is", cfg.apo_k),
                                           lambda: (topk()[ix["node"]] == ix["child"][:, None])[:, None, :]),
        "anchor_old_logp": anchor_old,
        # the policy's own Top-K at each row's node (ids from the current logits, data not differentiated)
        "policy_topk_logp": lambda: _policy_topk(logpi.reshape(P * N, b), cfg.policy_topk)[ix["node"]][:, None, :],
    })
    C = batch["adv"].shape[0]
    adv = batch["adv"].reshape(-1).index_select(0, fixed(("adv_flat", C), lambda: ix["cls"] * P + ix["prompt"]))  # [R]
    mask = torch.ones(R, 1, dtype=torch.bool)
    return dict(logp=per_edge(logpi), old_logp=per_edge(batch["logpi_old"]), advantages=adv, mask=mask,
                weights=weight, **kw, **batch["norm"])


def as_logits_fn(logits: Union[Tensor, Callable[[], Tensor]]) -> Callable[[], Tensor]:
    """A tabular logits tensor (the identity map) or a map theta -> edge logits, as one callable.

    The coupled model (apo_toy/coupled.py) passes a callable: every loss below is evaluated on the
    edge logits it returns, so autograd carries the gradient to whatever parameters produced them.
    """
    return logits if callable(logits) else (lambda: logits)


# --------------------------------------------------------------------------------------------
# Sampled mode
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_rollouts(suite: Suite, logits: Tensor, group_size: int, generator: torch.Generator) -> dict:
    """G ancestral samples per prompt from softmax(logits): consecutive blocks of G per prompt.

    Returns prompt [B], nodes [B, D] (visited internal nodes), actions [B, D], leaf [B], reward [B].
    """
    P, N, b = logits.shape
    pi_flat = torch.softmax(logits.detach(), -1).reshape(P * N, b)
    prompt = torch.arange(P).repeat_interleave(group_size)  # [B]
    node = torch.zeros_like(prompt)
    nodes, actions = [], []
    for _ in range(suite.depth):
        a = torch.multinomial(pi_flat[prompt * N + node], 1, generator=generator)[:, 0]
        nodes.append(node)
        actions.append(a)
        node = node * b + 1 + a
    leaf = node - N
    return {"prompt": prompt, "nodes": torch.stack(nodes, 1), "actions": torch.stack(actions, 1),
            "leaf": leaf, "reward": suite.rewards[prompt, leaf]}


def leaf_rollouts(suite: Suite, prompt: Tensor, leaf: Tensor) -> dict:
    """The rollout dict of given (prompt, leaf) pairs (for enumeration tests)."""
    nodes, actions = path_to_leaf(leaf, suite.branching, suite.depth)
    return {"prompt": prompt, "nodes": nodes, "actions": actions, "leaf": leaf,
            "reward": suite.rewards[prompt, leaf]}


def sampled_loss(suite: Suite, cfg: LossConfig, logits: Tensor, roll: dict, old_logp: Tensor, adv: Tensor,
                 idx: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                 old_logpi: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 diagnostics: bool = True, **norm) -> tuple[Tensor, dict]:
    """policy_loss on token tensors [B, D] built from rollouts (`sampled_inputs`)."""
    return policy_loss(cfg, **sampled_inputs(suite, cfg, logits, roll, old_logp, adv, idx, weights, old_logpi,
                                             generator, **norm), diagnostics=diagnostics)


def sampled_inputs(suite: Suite, cfg: LossConfig, logits: Tensor, roll: dict, old_logp: Tensor, adv: Tensor,
                   idx: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                   old_logpi: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                   **norm) -> dict:
    """The keyword arguments of `policy_loss`: token tensors [B, D] from rollouts (rows `idx` if given).

    `weights` [B] (per-sequence) and `norm` (global_tokens / global_seqs) go to policy_loss as is.
    `old_logpi` [P, N, b], the behaviour policy's log-probabilities, is needed only by the APO
    readings that normalise r_anchor by pi_old (LossConfig.needs_anchor_old). `generator` drives
    Clip-Cov's random token choice.
    """
    P, N, b = logits.shape
    if idx is None:
        idx = torch.arange(roll["prompt"].numel())
    flat = roll["prompt"][idx, None] * N + roll["nodes"][idx]  # [B, D] global node id
    act = roll["actions"][idx]  # [B, D]
    logpi = torch.log_softmax(logits, -1).reshape(P * N, b)
    ref = suite.ref_logpi.reshape(P * N, b)
    topk = _once(lambda: suite.topk(cfg.apo_k).reshape(P * N, -1)[flat])  # [B, D, K] Top-K of each visited node

    def anchor_old() -> Tensor:
        if old_logpi is None:
            raise ValueError(f"old_logpi: required by apo_anchor_norm={cfg.apo_anchor_norm!r} (pi_old at the anchors)")
        return old_logpi.reshape(P * N, b)[flat[..., None], topk()]

    kw = optional_inputs(cfg, {
        "ref_logp": lambda: ref[flat, act],
        "kl_full": lambda: node_kl_full(logpi[flat], ref[flat]),
        "entropy": lambda: node_entropy(logpi[flat]),
        "anchor_logp": lambda: logpi[flat[..., None], topk()],
        "anchor_ref_logp": lambda: ref[flat[..., None], topk()],
        "anchor_is_sampled": lambda: topk() == act[..., None],
        "anchor_old_logp": anchor_old,
        "policy_topk_logp": lambda: _policy_topk(logpi, cfg.policy_topk)[flat],  # [B, D, K]
    })
    mask = torch.ones_like(act, dtype=torch.bool)
    if weights is not None:
        kw["weights"] = weights[idx]
    return dict(logp=logpi[flat, act], old_logp=old_logp[idx], advantages=adv[idx], mask=mask, **kw, **norm,
                generator=generator)


# --------------------------------------------------------------------------------------------
# Natural policy gradient yardstick (not a loss of the project)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def npg_update(suite: Suite, logits: Tensor, lr: float) -> dict:
    """YARDSTICK: tabular natural policy gradient, dz_{s,a} = lr (Q(s,a) - V(s)).

    The exact policy gradient is d(s) pi(a|s) (Q - V) (docs/theory.md section 5); the Fisher
    preconditioner removes the reach d(s) and the pi(a|s) factor, so rare branches learn as fast
    as common ones. Computed directly from the tree, not through policy_loss.
    """
    q, v = success_q(torch.softmax(logits, -1), suite.rewards, suite.depth)
    logits += lr * (q - v[..., None])
    return {}
