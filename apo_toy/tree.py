"""Reasoning trees as tensors: structure, reference ("base model") policy, suite generator.

A prompt is a complete b-ary tree of depth D. Internal nodes are token positions, children are
tokens, leaves are complete responses with a verifiable reward in {0, 1}. A suite of P prompts is
stored as tensors, nodes in level order with heap indexing:

    node n at depth t has children  n*b + 1 + a,  a = 0..b-1
    nodes of depth t occupy indices [ (b^t - 1)/(b - 1), (b^(t+1) - 1)/(b - 1) )
    leaf j (0 <= j < b^D) is node N + j, N = (b^D - 1)/(b - 1) internal nodes

so the children of the level-t nodes, read in order, are exactly the level-(t+1) nodes. That is
why every per-leaf quantity (leaf log-probability, success probability below a node) is a
cumulative sum / product over levels with a reshape, and costs time linear in the number of nodes.

Shapes: logits [P, N, b]; rewards [P, b^D]; ref_topk [P, N, K] (children in the safe manifold
TopK(pi_ref) of every node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

BRANCH_NAMES = ("dominant", "secondary", "rare_in", "rare_out")
MAX_LEAVES = 1 << 20  # per prompt; keeps a suite's leaf tensors within memory


def num_internal(branching: int, depth: int) -> int:
    """N = 1 + b + ... + b^(D-1), the number of token positions of one prompt."""
    return (branching**depth - 1) // (branching - 1)


def level_slice(branching: int, t: int) -> slice:
    """Indices of the depth-t nodes in level order."""
    start = (branching**t - 1) // (branching - 1)
    return slice(start, start + branching**t)


@dataclass
class SuiteSpec:
    """How to generate a seeded suite of prompt trees (see `build_suite`)."""

    n_prompts: int = field(default=32, metadata={"help": "P, number of prompts (trees) in the suite"})
    branching: int = field(default=10, metadata={"help": "b, children per node (2..32); > top_k makes the safe manifold a strict subset"})
    depth: int = field(default=3, metadata={"help": "D, tokens per response (1..8)"})
    top_k: int = field(default=8, metadata={"help": "K, size of the safe manifold TopK(pi_ref) per node (<= branching)"})
    zipf_low: float = field(default=1.5, metadata={"help": "smallest Zipf exponent of a node's reference: pi_ref(rank r) ~ (r+1)^-s"})
    zipf_high: float = field(default=3.0, metadata={"help": "largest Zipf exponent (larger = more dominant top token)"})
    noise: float = field(default=0.5, metadata={"help": "std of Gaussian noise added to the reference logits (long-tail irregularity)"})
    hardness_low: float = field(default=0.0, metadata={"help": "per-prompt hardness h ~ U(low, high): the dominant correct path leaves the top-1 token w.p. h per level"})
    hardness_high: float = field(default=0.8, metadata={"help": "upper end of the hardness range"})
    n_extra_correct: int = field(default=2, metadata={"help": "extra correct leaves placed uniformly at random (unnamed)"})
    seed: int = field(default=0, metadata={"help": "seed of the generator (suite is reproducible)"})

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SuiteSpec.{name}={getattr(self, name)!r}: {why}")

        for name in ("n_prompts", "branching", "depth", "top_k", "n_extra_correct", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                bad(name, "must be an integer")
        if self.n_prompts < 1:
            bad("n_prompts", "need at least one prompt")
        if not 2 <= self.branching <= 32:
            bad("branching", "must lie in 2..32")
        if not 1 <= self.depth <= 8:
            bad("depth", "must lie in 1..8")
        if self.branching**self.depth > MAX_LEAVES:
            bad("depth", f"branching**depth = {self.branching**self.depth} leaves exceeds {MAX_LEAVES}")
        if not 1 <= self.top_k <= self.branching:
            bad("top_k", f"K must lie in 1..branching={self.branching}")
        if not 0 < self.zipf_low <= self.zipf_high:
            bad("zipf_low", "need 0 < zipf_low <= zipf_high")
        if not self.noise >= 0:
            bad("noise", "must be >= 0")
        if not 0 <= self.hardness_low <= self.hardness_high <= 1:
            bad("hardness_low", "need 0 <= hardness_low <= hardness_high <= 1")
        if self.n_extra_correct < 0:
            bad("n_extra_correct", "must be >= 0")


@dataclass
class Suite:
    """A suite of P prompt trees with a reference policy and leaf rewards (all tensors)."""

    ref_logits: Tensor  # [P, N, b] reference ("base model") logits per node
    rewards: Tensor  # [P, b^D] 0/1 leaf rewards
    top_k: int
    named: dict = field(default_factory=dict)  # branch name -> [P] leaf index (-1 = absent)
    spec: Optional[SuiteSpec] = None

    def __post_init__(self) -> None:
        z, r = self.ref_logits, self.rewards
        if not isinstance(z, Tensor) or z.dim() != 3:
            raise ValueError(f"ref_logits: expected a [P, N, b] tensor, got {getattr(z, 'shape', type(z))}")
        P, N, b = z.shape
        if b < 2:
            raise ValueError(f"ref_logits: branching must be >= 2, got b={b}")
        depth = 1
        while num_internal(b, depth) < N:
            depth += 1
        if num_internal(b, depth) != N:
            raise ValueError(f"ref_logits: N={N} nodes is not a complete {b}-ary tree")
        if not isinstance(r, Tensor) or tuple(r.shape) != (P, b**depth):
            raise ValueError(f"rewards: expected shape [{P}, {b**depth}], got {getattr(r, 'shape', type(r))}")
        if not ((r == 0) | (r == 1)).all():
            raise ValueError("rewards: must be binary (0 or 1)")
        no_valid = (r.sum(-1) == 0).nonzero().flatten().tolist()
        if no_valid:
            raise ValueError(f"rewards: prompt(s) {no_valid[:5]} have no valid (reward 1) leaf")
        if isinstance(self.top_k, bool) or not 1 <= int(self.top_k) <= b:
            raise ValueError(f"top_k: K={self.top_k} must lie in 1..branching={b}")
        if not torch.isfinite(z).all():
            raise ValueError("ref_logits: must be finite")
        self.depth = depth
        self.ref_logits = z.to(torch.float64)
        self.rewards = r.to(torch.float64)
        self.ref_logpi = torch.log_softmax(self.ref_logits, -1)
        self.ref_topk = self.ref_logits.topk(self.top_k, dim=-1).indices  # [P, N, K] safe manifold children
        self.in_topk = torch.zeros_like(self.ref_logits, dtype=torch.bool).scatter_(-1, self.ref_topk, True)

    def topk(self, k: int) -> Tensor:
        """Children in TopK(pi_ref) of every node, [P, N, k] (cached). The loss uses LossConfig.apo_k."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.branching:
            raise ValueError(f"apo_k: K={k!r} must be an integer in 1..branching={self.branching}")
        cache = self.__dict__.setdefault("_cache", {})
        if ("topk", k) not in cache:
            cache[("topk", k)] = self.ref_logits.topk(k, dim=-1).indices
        return cache[("topk", k)]

    @property
    def n_prompts(self) -> int:
        return self.ref_logits.shape[0]

    @property
    def n_nodes(self) -> int:
        return self.ref_logits.shape[1]

    @property
    def branching(self) -> int:
        return self.ref_logits.shape[2]

    @property
    def n_leaves(self) -> int:
        return self.rewards.shape[1]


# --------------------------------------------------------------------------------------------
# Tree computations, level by level (linear in the number of nodes)
# --------------------------------------------------------------------------------------------


def reach_and_leaf_logp(logpi: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """log d(s) for every internal node and log P(leaf) for every leaf.

    d(s) = prod of pi along the path to s (reach probability); P(leaf) = d(leaf).
    logpi: [P, N, b] -> (log_reach [P, N], leaf_logp [P, b^D]).
    """
    P, N, b = logpi.shape
    lp = logpi.new_zeros(P, 1)  # log d(root) = 0
    reach = []
    for t in range(depth):
        reach.append(lp)
        lvl = logpi[:, level_slice(b, t), :]  # [P, b^t, b]
        lp = (lp[..., None] + lvl).reshape(P, b ** (t + 1))  # children in level order
    return torch.cat(reach, dim=1), lp


def success_q(pi: Tensor, rewards: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Q(s, a) = success probability after choosing child a at s; V(s) = sum_a pi(a|s) Q(s, a).

    Bottom-up over levels. pi: [P, N, b], rewards [P, b^D] -> (Q [P, N, b], V [P, N]).
    """
    P, N, b = pi.shape
    q_levels = []
    v_next = rewards  # value of the level below, [P, b^(t+1)]
    for t in reversed(range(depth)):
        q = v_next.reshape(P, b**t, b)  # [P, b^t, b] Q of the depth-t nodes
        q_levels.append(q)
        v_next = (pi[:, level_slice(b, t), :] * q).sum(-1)
    q_all = torch.cat(q_levels[::-1], dim=1)
    return q_all, (pi * q_all).sum(-1)


def path_to_leaf(leaf: Tensor, branching: int, depth: int) -> tuple[Tensor, Tensor]:
    """Internal nodes visited and children chosen on the way to leaf indices [...]: ([..., D], [..., D])."""
    b = branching
    actions, node = [], leaf.clone()
    for t in reversed(range(depth)):
        actions.append(node % b)
        node = node // b
    actions = torch.stack(actions[::-1], -1)  # [..., D]
    nodes = [torch.zeros_like(leaf)]
    for t in range(depth - 1):
        nodes.append(nodes[-1] * b + 1 + actions[..., t])
    return torch.stack(nodes, -1), actions


# --------------------------------------------------------------------------------------------
# Suite generator
# --------------------------------------------------------------------------------------------


def build_suite(spec: Optional[SuiteSpec] = None, **overrides) -> Suite:
    """Seeded suite of prompt trees with a realistic reference and named correct paths.

    Reference per node: logits -s log(rank + 1) + noise, s ~ U(zipf_low, zipf_high), ranks a random
    permutation of the children: a dominant token, a few plausible ones, a long tail.
    Correct leaves per prompt (the paths are given as reference ranks per level):
      dominant  : rank 0 at each level, except w.p. hardness h a rank in 1..3 (h ~ U per prompt)
      secondary : the dominant path until a random depth, there rank 1-2 (other than dominant's), then rank 0
      rare_in   : diverges at a random depth with a rank in [K/2, K-1] (inside the safe manifold)
      rare_out  : diverges with a rank in [K, b-1] (outside TopK; absent when b == K)
      + n_extra_correct unnamed leaves uniformly at random.
    Base pass@1 spans hard to easy through h and s.
    """
    spec = spec or SuiteSpec()
    if overrides:
        spec = SuiteSpec(**{**spec.__dict__, **overrides})
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    P, b, D, K = spec.n_prompts, spec.branching, spec.depth, spec.top_k
    N, L = num_internal(b, D), b**D
    s = rng.uniform(spec.zipf_low, spec.zipf_high, size=(P, N, 1))
    rank = np.argsort(rng.random((P, N, b)), axis=-1)  # random rank of each child
    z = -s * np.log1p(rank) + spec.noise * rng.standard_normal((P, N, b))
    order = np.argsort(-z, axis=-1, kind="stable")  # order[p, n, r] = child with actual rank r
    rewards = np.zeros((P, L))
    named = {name: np.full(P, -1, dtype=np.int64) for name in BRANCH_NAMES}
    hard = rng.uniform(spec.hardness_low, spec.hardness_high, size=P)

    def leaf_of(p: int, ranks: list[int]) -> int:
        node = 0
        for r in ranks:
            node = node * b + 1 + int(order[p, node, r])
        return node - N

    for p in range(P):  # generation only (not a hot path): a few paths per prompt
        dom = [0 if rng.random() >= hard[p] else int(rng.integers(1, min(3, b - 1) + 1)) for _ in range(D)]
        paths = {"dominant": dom}
        t0 = int(rng.integers(D))
        alt = [r for r in (1, 2) if r < b and r != dom[t0]] or [0 if dom[t0] else 1]
        paths["secondary"] = dom[:t0] + [int(rng.choice(alt))] + [0] * (D - t0 - 1)
        if K >= 2:
            t0 = int(rng.integers(D))
            paths["rare_in"] = dom[:t0] + [int(rng.integers(max(K // 2, 1), K))] + [0] * (D - t0 - 1)
        if b > K:
            t0 = int(rng.integers(D))
            paths["rare_out"] = dom[:t0] + [int(rng.integers(K, b))] + [0] * (D - t0 - 1)
        for name, ranks in paths.items():
            leaf = leaf_of(p, ranks)
            named[name][p] = leaf
            rewards[p, leaf] = 1.0
        rewards[p, rng.integers(L, size=spec.n_extra_correct)] = 1.0
    return Suite(
        ref_logits=torch.from_numpy(z), rewards=torch.from_numpy(rewards), top_k=K,
        named={k: torch.from_numpy(v) for k, v in named.items()}, spec=spec,
    )
