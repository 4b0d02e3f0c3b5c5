"""The coupled tree model: shared parameters, held-out prompts, a peaked reference (docs/simulator.md).

The tabular model gives every prompt its own logits, so nothing learned on one prompt reaches
another and the expected update is ascent on each prompt's own success probability. Here every
child edge (p, s, a) carries a token id v(p, s, a) from a shared vocabulary of size V, and the edge
logits are one differentiable map of shared parameters theta = (alpha, u, W, delta):

    z_theta(p, s, a) = (1 + alpha[t(s)]) z_ref(p, s, a) + u[v] + h(p, s)^T W[:, v] + kappa delta(p, s, a)

    alpha [D]        shared inverse-temperature change per depth t(s) (sharpening / flattening)
    u     [V]        shared token bias
    W     [r, V]     shared low-rank context x token term; h(p, s) is a fixed random feature of the
                     node's context: the parent edge's token (a shared start feature at the root)
    delta [P_tr, N, b] the tabular part, training prompts only (kappa = 0 switches it off)

theta = 0 gives z_ref exactly. The loss reaches theta only through the edge logits, so the exact
mode stays exact: `exact_loss` is evaluated on z_theta and autograd carries the gradient to theta
(docs/theory.md section 4: the identity holds for any differentiable map from theta to edge logits).

Rewards with shared structure: each token has a latent quality q[v] shared by all prompts; a leaf
is correct when  sum_t q[v_t] + sigma_p eps(p, leaf)  is among the prompt's top m leaves (eps a
prompt-specific N(0, 1) per leaf, sigma_p the prompt's idiosyncrasy, drawn per prompt). What is
learned on training prompts transfers, partly, to held-out prompts, which share the vocabulary,
the qualities and theta but are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .tree import MAX_LEAVES, Suite, level_slice, num_internal


@dataclass
class CoupledSpec:
    """How to generate a seeded coupled suite: training and held-out prompts over one vocabulary."""

    n_train: int = field(default=32, metadata={"help": "training prompts (the only ones the loss sees)"})
    n_heldout: int = field(default=64, metadata={"help": "held-out prompts (measured, never trained on)"})
    n_val: int = field(default=0, metadata={
        "help": "0: one held-out set; > 0: the first n_val held-out prompts are the validation split "
                "(selection reads it) and the other n_heldout - n_val the test split (reports read it)"})
    branching: int = field(default=10, metadata={"help": "b, children per node"})
    depth: int = field(default=3, metadata={"help": "D, tokens per response"})
    top_k: int = field(default=8, metadata={"help": "K, safe manifold size per node"})
    vocab: int = field(default=64, metadata={"help": "V, shared vocabulary size (>= branching)"})
    zipf_vocab: float = field(default=1.1, metadata={"help": "token popularity ~ (rank+1)^-s over the vocabulary"})
    zipf_low: float = field(default=1.5, metadata={"help": "smallest Zipf exponent of a non-peaked node's reference"})
    zipf_high: float = field(default=3.0, metadata={"help": "largest Zipf exponent of a non-peaked node's reference"})
    noise: float = field(default=0.5, metadata={"help": "std of Gaussian noise on the reference logits"})
    peaked_frac: float = field(default=0.75, metadata={"help": "share of nodes whose reference top-1 probability is in [peak_low, peak_high]"})
    peak_low: float = field(default=0.99, metadata={"help": "lowest top-1 probability of a peaked node"})
    peak_high: float = field(default=0.999, metadata={"help": "highest top-1 probability of a peaked node"})
    ref_quality: float = field(default=3.0, metadata={"help": "weight of the token quality in the reference's ranking (base model competence)"})
    n_correct: int = field(default=50, metadata={"help": "m, correct leaves per prompt (the top m by score)"})
    sigma_low: float = field(default=0.5, metadata={"help": "smallest prompt idiosyncrasy sigma_p (easy: correctness follows token quality)"})
    sigma_high: float = field(default=3.0, metadata={"help": "largest sigma_p (hard: correctness is prompt-specific)"})
    rank: int = field(default=8, metadata={"help": "r, rank of the shared context x token term W"})
    kappa: float = field(default=0.0, metadata={"help": "scale of the tabular part delta on training prompts (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of the generator"})

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"CoupledSpec.{name}={getattr(self, name)!r}: {why}")

        for name in ("n_train", "n_heldout", "n_val", "branching", "depth", "top_k", "vocab", "n_correct", "rank",
                     "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                bad(name, "must be an integer")
        if self.n_train < 1 or self.n_heldout < 1:
            bad("n_train" if self.n_train < 1 else "n_heldout", "need at least one prompt")
        if not (self.n_val == 0 or 1 <= self.n_val < self.n_heldout):
            bad("n_val", f"must be 0 (no split) or lie in 1..n_heldout-1={self.n_heldout - 1} (both splits non-empty)")
        if not 2 <= self.branching <= 32:
            bad("branching", "must lie in 2..32")
        if not 1 <= self.depth <= 8 or self.branching**self.depth > MAX_LEAVES:
            bad("depth", f"need 1 <= depth <= 8 and branching**depth <= {MAX_LEAVES}")
        if not 1 <= self.top_k <= self.branching:
            bad("top_k", "K must lie in 1..branching")
        if self.vocab < self.branching:
            bad("vocab", f"need vocab >= branching={self.branching} (children of a node carry distinct tokens)")
        if not 1 <= self.n_correct <= self.branching**self.depth:
            bad("n_correct", "must lie in 1..branching**depth")
        if self.rank < 1:
            bad("rank", "must be >= 1")
        if not 0 <= self.peaked_frac <= 1:
            bad("peaked_frac", "must lie in [0, 1]")
        if not 0 < self.peak_low <= self.peak_high < 1:
            bad("peak_low", "need 0 < peak_low <= peak_high < 1")
        if not 0 < self.zipf_low <= self.zipf_high:
            bad("zipf_low", "need 0 < zipf_low <= zipf_high")
        if not 0 <= self.sigma_low <= self.sigma_high:
            bad("sigma_low", "need 0 <= sigma_low <= sigma_high")
        for name in ("noise", "kappa", "zipf_vocab", "ref_quality"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")


@dataclass
class CoupledSuite:
    """Training and held-out prompt trees over one vocabulary; each part is an ordinary `Suite`.

    With `spec.n_val > 0` the held-out prompts are also split into two disjoint parts, "val"
    (validation: what selection reads) and "test" (what reports read), in `splits`.
    """

    train: Suite
    heldout: Suite
    tokens: dict  # part -> [P, N, b] token id of every child edge
    context: dict  # part -> [P, N, r] fixed feature h(p, s) of every internal node
    quality: Tensor  # [V] latent token quality (what the rewards are made of)
    spec: CoupledSpec
    splits: dict = field(default_factory=dict)  # "val" / "test" -> Suite (empty without n_val)

    @property
    def depth(self) -> int:
        return self.train.depth

    def part(self, name: str) -> Suite:
        if name in ("train", "heldout"):
            return getattr(self, name)
        if name in self.splits:
            return self.splits[name]
        raise ValueError(f"part: {name!r} is not one of {['train', 'heldout', *self.splits]}")


def node_depths(branching: int, depth: int) -> Tensor:
    """t(s) for every internal node in level order, [N]."""
    return torch.cat([torch.full((branching**t,), t, dtype=torch.long) for t in range(depth)])


class TabularPolicy:
    """The tabular model: theta is the logits tensor itself (the identity map)."""

    def __init__(self, logits: Tensor):
        self.theta = logits.detach().clone().to(torch.float64).requires_grad_(True)
        self.params = [self.theta]

    def logits(self, part: str = "train") -> Tensor:
        return self.theta


class CoupledPolicy:
    """z_theta on a CoupledSuite (module docstring); every parameter starts at 0 (theta = 0: z_ref)."""

    def __init__(self, suite: CoupledSuite):
        s = suite.spec
        self.suite = suite
        self.depth_of = node_depths(s.branching, s.depth)  # [N]
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
        self.alpha, self.u, self.W = z(s.depth), z(s.vocab), z(s.rank, s.vocab)
        self.params = [self.alpha, self.u, self.W]
        self.delta = None
        if s.kappa > 0:
            self.delta = z(*suite.train.ref_logits.shape)
            self.params.append(self.delta)

    def logits(self, part: str = "train") -> Tensor:
        """Edge logits [P, N, b] of one part; differentiable in every parameter."""
        suite = self.suite
        ref = suite.part(part).ref_logits  # [P, N, b]
        tok = suite.tokens[part]  # [P, N, b]
        scale = (1.0 + self.alpha)[self.depth_of][None, :, None]  # [1, N, 1]
        ctx = suite.context[part] @ self.W  # [P, N, r] @ [r, V] -> [P, N, V]
        z = scale * ref + self.u[tok] + ctx.gather(-1, tok)
        if self.delta is not None and part == "train":
            z = z + suite.spec.kappa * self.delta
        return z


def _reference(rng: np.random.Generator, spec: CoupledSpec, tokens: np.ndarray, quality: np.ndarray,
               log_pop: np.ndarray) -> np.ndarray:
    """Reference logits [P, N, b]: children ranked by quality + popularity + noise; Zipf or peaked."""
    P, N, b = tokens.shape
    score = spec.ref_quality * quality[tokens] + log_pop[tokens] + rng.gumbel(size=tokens.shape)
    rank = np.argsort(np.argsort(-score, axis=-1), axis=-1)  # rank of each child by score
    s = rng.uniform(spec.zipf_low, spec.zipf_high, size=(P, N, 1))
    z = -s * np.log1p(rank) + spec.noise * rng.standard_normal((P, N, b))
    peaked = rng.random((P, N)) < spec.peaked_frac
    top = rank == 0  # the peak is the best-scored child
    others = np.where(top, -np.inf, z)
    lse = np.log(np.exp(others - others.max(-1, keepdims=True)).sum(-1)) + others.max(-1)  # [P, N]
    p1 = rng.uniform(spec.peak_low, spec.peak_high, size=(P, N))
    z_top = np.log(p1 / (1 - p1)) + lse  # softmax gives the top child exactly p1
    z_peaked = np.where(top, z_top[..., None], z)
    return np.where(peaked[..., None], z_peaked, z)


def _rewards(rng: np.random.Generator, spec: CoupledSpec, tokens: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """0/1 leaf rewards [P, L]: the top m leaves of sum_t q[v_t] + sigma_p eps(p, leaf)."""
    P, N, b = tokens.shape
    D = spec.depth
    score = np.zeros((P, 1))
    for t in range(D):  # level by level: children of level-t nodes are the level-(t+1) nodes in order
        q = quality[tokens[:, level_slice(b, t), :]]  # [P, b^t, b]
        score = (score[..., None] + q).reshape(P, b ** (t + 1))
    sigma = rng.uniform(spec.sigma_low, spec.sigma_high, size=(P, 1))
    score = score + sigma * rng.standard_normal(score.shape)
    top = np.argsort(-score, axis=-1)[:, : spec.n_correct]
    r = np.zeros_like(score)
    np.put_along_axis(r, top, 1.0, axis=-1)
    return r


def build_coupled_suite(spec: Optional[CoupledSpec] = None, **overrides) -> CoupledSuite:
    """Seeded coupled suite (module docstring). Training and held-out prompts come from one distribution."""
    spec = spec or CoupledSpec()
    if overrides:
        spec = CoupledSpec(**{**spec.__dict__, **overrides})
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    b, D, V, r = spec.branching, spec.depth, spec.vocab, spec.rank
    N = num_internal(b, D)
    pop = 1.0 / np.arange(1, V + 1) ** spec.zipf_vocab
    pop = pop[rng.permutation(V)]  # popularity is not ordered by token id
    quality = rng.standard_normal(V)
    embed = rng.standard_normal((V + 1, r)) / np.sqrt(r)  # context feature = parent edge's token; row V: BOS
    parts, tokens, context = {}, {}, {}
    for name, P in (("train", spec.n_train), ("heldout", spec.n_heldout)):
        # children of a node carry distinct tokens, drawn by popularity (Gumbel top-b = sampling w/o replacement)
        keys = np.log(pop) + rng.gumbel(size=(P, N, V))
        tok = np.argsort(-keys, axis=-1)[..., :b]  # [P, N, b]
        ctx = np.empty((P, N, r))
        ctx[:, 0] = embed[V]  # root: one shared start feature (prompt identity is not a parameter: no memorising)
        if D > 1:
            child_tok = tok[:, : num_internal(b, D - 1)].reshape(P, -1)  # tokens of edges into nodes 1..N-1
            ctx[:, 1:] = embed[child_tok]
        z = _reference(rng, spec, tok, quality, np.log(pop))
        parts[name] = Suite(torch.from_numpy(z), torch.from_numpy(_rewards(rng, spec, tok, quality)), top_k=spec.top_k)
        tokens[name] = torch.from_numpy(tok)
        context[name] = torch.from_numpy(ctx)
    splits = {}
    if spec.n_val:  # held-out prompts are i.i.d.: the first n_val validate, the rest test
        for name, sl in (("val", slice(0, spec.n_val)), ("test", slice(spec.n_val, None))):
            h = parts["heldout"]
            splits[name] = Suite(h.ref_logits[sl], h.rewards[sl], top_k=spec.top_k)
            tokens[name], context[name] = tokens["heldout"][sl], context["heldout"][sl]
    return CoupledSuite(parts["train"], parts["heldout"], tokens, context, torch.from_numpy(quality), spec, splits)
