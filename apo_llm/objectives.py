"""The one loss module: GRPO family, KL variants, KL-on-Wrong and APO, in pure torch.

Everything in the project (the tree simulator, the LoRA trainer, the notebooks) calls
`policy_loss` and `group_advantages` from here; there is no second implementation.

Symbols follow the APO paper (arXiv 2602.05717) and ../shared/reference:

    w_t      = pi_theta(y_t) / pi_old(y_t)                       token ratio
    A        = group-normalised advantage (same for every token of a response)
    S        = TopK(pi_ref) \\ {y_t}                              anchor set (exclusive anchoring)
    Z_ref    = sum_{k in S} pi_ref(k)
    r_anchor = (1 / Z_ref) * sum_{k in S} pi_theta(k)               virtual anchor ratio
    r_APO    = lambda * w_t - beta * r_anchor                        rectified ratio, A < 0 only

Layout (verl-style): each loss name maps to a short per-token *policy term* in `POLICY_TERMS`;
optional KL and entropy terms are added by `policy_loss`; `aggregate` is the single place where
token losses become a scalar, and no loss overrides it.

Shapes: B sequences, T response positions, K reference Top-K anchors per position.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # log(pi_theta / pi_old) is clamped to +-20 before exp (verl, TRL)
K3_CLAMP = 10.0  # the k3 estimator is clamped to +-10, as verl does

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "full")
APO_CLIPS = ("rectified", "push_only")
APO_ANCHORINGS = ("exclusive", "inclusive")
KL_SCOPES = ("all", "negative")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Which objective to optimise, with every knob the reference documents.

    `name` picks a registered policy term (see `POLICY_TERMS`) and the preset defaults of
    `LOSS_PRESETS` for fields left at `None`. Validation runs on construction and again in
    `policy_loss`; every error names the offending field.
    """

    name: str = field(default="grpo", metadata={"help": "grpo | dapo | grpo_kl | kl_on_wrong | apo"})
    eps_low: Optional[float] = field(
        default=None, metadata={"help": "lower clip range: ratio >= 1 - eps_low (default 0.2)"}
    )
    eps_high: Optional[float] = field(
        default=None, metadata={"help": "upper clip range: ratio <= 1 + eps_high (0.2; dapo preset 0.28)"}
    )
    clip_c: Optional[float] = field(
        default=None, metadata={"help": "dual-clip cap for A < 0 (verl clip_ratio_c, e.g. 3.0); None = off"}
    )
    kl_coef: float = field(default=0.0, metadata={"help": "coefficient of the per-token KL term"})
    kl_estimator: str = field(
        default="k3", metadata={"help": "k1 | k2 | k3 (sampled-token estimators) | full (exact, needs kl_full)"}
    )
    ent_coef: float = field(default=0.0, metadata={"help": "entropy bonus: loss -= ent_coef * H_t"})
    apo_lambda: float = field(default=1.05, metadata={"help": "APO push: weight of w_t on A < 0 tokens"})
    apo_beta: float = field(default=0.1, metadata={"help": "APO pull: weight of r_anchor on A < 0 tokens"})
    apo_k: int = field(default=8, metadata={"help": "size K of the safe manifold TopK(pi_ref)"})
    apo_clip: str = field(
        default="rectified",
        metadata={"help": "rectified: clip r_APO as a whole | push_only: clip lambda*w, pull unclipped"},
    )
    apo_anchoring: str = field(
        default="exclusive",
        metadata={"help": "exclusive: S = TopK \\ {y_t} (paper) | inclusive: S = TopK (ablation)"},
    )
    loss_agg: str = field(
        default="token-mean",
        metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm"},
    )
    loss_norm_len: Optional[int] = field(
        default=None,
        metadata={"help": "constant length for seq-mean-token-sum-norm (None: the padded width T)"},
    )

    def __post_init__(self) -> None:
        if self.name not in POLICY_TERMS:
            raise ValueError(f"LossConfig.name: unknown loss {self.name!r}; choose from {sorted(POLICY_TERMS)}")
        for key, value in LOSS_PRESETS.get(self.name, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key, value in LOSS_PRESETS["_defaults"].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()
        if self.kl_coef == 0.0 and POLICY_TERMS[self.name].wants_kl:
            warnings.warn(f"LossConfig: {self.name!r} with kl_coef=0 is plain GRPO; set kl_coef > 0", stacklevel=2)

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"LossConfig.{name}={getattr(self, name)!r}: {why}")

        if self.name not in POLICY_TERMS:
            bad("name", f"unknown loss; choose from {sorted(POLICY_TERMS)}")
        for eps in ("eps_low", "eps_high"):
            if not (0.0 < float(getattr(self, eps)) < 1.0):
                bad(eps, "must lie in (0, 1)")
        if self.clip_c is not None and not self.clip_c > 1.0:
            bad("clip_c", "dual-clip cap must be > 1 (or None to disable)")
        if not (self.kl_coef >= 0.0 and math.isfinite(self.kl_coef)):
            bad("kl_coef", "must be finite and >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", f"choose from {KL_ESTIMATORS}")
        if not (self.ent_coef >= 0.0 and math.isfinite(self.ent_coef)):
            bad("ent_coef", "must be finite and >= 0")
        if not (self.apo_lambda > 0.0 and math.isfinite(self.apo_lambda)):
            bad("apo_lambda", "push weight lambda must be > 0")
        if not (self.apo_beta >= 0.0 and math.isfinite(self.apo_beta)):
            bad("apo_beta", "pull weight beta must be >= 0")
        if isinstance(self.apo_k, bool) or not isinstance(self.apo_k, int) or self.apo_k < 1:
            bad("apo_k", "Top-K size must be an integer >= 1")
        if self.apo_clip not in APO_CLIPS:
            bad("apo_clip", f"choose from {APO_CLIPS}")
        if self.apo_anchoring not in APO_ANCHORINGS:
            bad("apo_anchoring", f"choose from {APO_ANCHORINGS}")
        if self.loss_agg not in LOSS_AGGS:
            bad("loss_agg", f"choose from {LOSS_AGGS}")
        n = self.loss_norm_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Real)
                              or not (math.isfinite(n) and n == int(n) and n >= 1)):
            bad("loss_norm_len", "must be a positive integer or None")

    # What a caller must compute before calling policy_loss. Trainers ask these instead of
    # testing loss names.
    @property
    def needs_anchors(self) -> bool:
        return POLICY_TERMS[self.name].needs_anchors

    @property
    def needs_ref_logp(self) -> bool:
        return self.kl_coef > 0.0 and self.kl_estimator != "full"

    @property
    def needs_kl_full(self) -> bool:
        return self.kl_coef > 0.0 and self.kl_estimator == "full"

    @property
    def needs_reference(self) -> bool:
        """True when any reference-model quantity (log-probs, Top-K, full KL) is needed."""
        return self.needs_anchors or self.needs_ref_logp or self.needs_kl_full

    @property
    def needs_entropy(self) -> bool:
        return self.ent_coef > 0.0


# --------------------------------------------------------------------------------------------
# Per-token policy terms
# --------------------------------------------------------------------------------------------


def clipped_surrogate(rho: Tensor, adv: Tensor, eps_low: float, eps_high: float, clip_c: Optional[float]) -> Tensor:
    """PPO clipped surrogate per token.

        loss = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))
        dual-clip (A < 0): loss = min(loss, -A * c)

    The max makes the loss flat (zero gradient) exactly where clipping binds: rho > 1 + eps_high
    with A > 0, rho < 1 - eps_low with A < 0, and rho > c with A < 0 under dual-clip.
    """
    loss = torch.maximum(-adv * rho, -adv * rho.clamp(1.0 - eps_low, 1.0 + eps_high))
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return loss


def anchor_ratio(anchor_logp: Tensor, anchor_ref_logp: Tensor, in_anchor_set: Tensor) -> tuple[Tensor, Tensor]:
    """Virtual anchor ratio r_anchor = (1/Z_ref) sum_{k in S} pi_theta(k), with Z_ref = sum_{k in S} pi_ref(k).

    anchor_logp, anchor_ref_logp: [B, T, K]; in_anchor_set: [B, T, K] bool (membership of S).
    Returns (r_anchor [B, T], Z_ref [B, T]). Where S is empty (Z_ref = 0) r_anchor is 0, so the
    pull vanishes instead of dividing by zero.
    """
    return _anchor_ratio_from_probs(anchor_logp.exp(), anchor_ref_logp.exp(), in_anchor_set)


def _anchor_ratio_from_probs(p_anchor: Tensor, p_ref: Tensor, in_anchor_set: Tensor) -> tuple[Tensor, Tensor]:
    zero = torch.zeros((), dtype=p_anchor.dtype, device=p_anchor.device)
    m_s = torch.where(in_anchor_set, p_anchor, zero).sum(-1)  # [B, T] policy mass on S
    z_ref = torch.where(in_anchor_set, p_ref, zero).sum(-1)  # [B, T] reference mass on S
    has_set = z_ref > 0
    r_anchor = torch.where(has_set, m_s / torch.where(has_set, z_ref, torch.ones_like(z_ref)), torch.zeros_like(m_s))
    return r_anchor, z_ref


@dataclass(frozen=True)
class PolicyTerm:
    """A registered objective: its per-token policy term and where its KL term applies."""

    fn: Callable[..., tuple[Tensor, dict]]
    kl_scope: str = "all"  # "all" tokens, or only "negative"-advantage tokens (KL-on-Wrong)
    needs_anchors: bool = False
    wants_kl: bool = False  # the objective is defined by its KL term (warn when kl_coef = 0)


def grpo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, **_: Tensor) -> tuple[Tensor, dict]:
    """GRPO / PPO token loss: max(-A w, -A clip(w, 1-eps_low, 1+eps_high)) (+ dual-clip)."""
    loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    return loss, {"rho": ratio}


def apo_term(
    cfg: LossConfig, ratio: Tensor, adv: Tensor, *, anchor_logp: Tensor, anchor_ref_logp: Tensor,
    anchor_is_sampled: Tensor, **_: Tensor,
) -> tuple[Tensor, dict]:
    """APO token loss. A >= 0: exactly GRPO. A < 0: the ratio is rectified,

        rectified: loss = max(-A r_APO, -A clip(r_APO, 1-eps_low, 1+eps_high)),
                   r_APO = lambda w - beta r_anchor                      (+ dual-clip)
        push_only: loss = lambda max(-A w, -A clip(w, ...)) + A beta r_anchor
                   (dual-clip caps the push part only)

    Minimising either for A < 0 pushes w (the wrong token) down and pulls r_anchor (the mass on
    the safe manifold S = TopK(pi_ref) minus y_t) up: "elastic recovery".
    """
    in_set = torch.ones_like(anchor_is_sampled) if cfg.apo_anchoring == "inclusive" else ~anchor_is_sampled
    p_anchor = anchor_logp.exp()  # [B, T, K] pi_theta on the reference Top-K
    r_anchor, z_ref = _anchor_ratio_from_probs(p_anchor, anchor_ref_logp.exp(), in_set)
    neg = adv < 0
    grpo_loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    pull = adv * cfg.apo_beta * r_anchor  # <= 0 on A < 0: minimising raises r_anchor
    if cfg.apo_clip == "rectified":
        rho = cfg.apo_lambda * ratio - cfg.apo_beta * r_anchor
        neg_loss = clipped_surrogate(rho, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    else:
        push = cfg.apo_lambda * clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, None)
        if cfg.clip_c is not None:
            push = torch.minimum(push, -adv * cfg.clip_c)
        neg_loss = push + pull
        rho = ratio  # the clip decision of push_only is on w alone
    loss = torch.where(neg, neg_loss, grpo_loss)
    aux = {"rho": torch.where(neg, rho, ratio), "r_anchor": r_anchor, "z_ref": z_ref, "pull": -pull,
           "manifold": p_anchor.detach().sum(-1)}  # [B, T] safe-manifold mass (diagnostic)
    if cfg.apo_clip == "push_only":
        # the dual-clip cap |A| c binds on the push lambda * |A| * w, i.e. where lambda * w > c
        aux["rho_dual"] = torch.where(neg, cfg.apo_lambda * ratio, ratio)
    return loss, aux


POLICY_TERMS: dict[str, PolicyTerm] = {
    "grpo": PolicyTerm(grpo_term),
    "dapo": PolicyTerm(grpo_term),
    "grpo_kl": PolicyTerm(grpo_term, wants_kl=True),
    "kl_on_wrong": PolicyTerm(grpo_term, kl_scope="negative", wants_kl=True),
    "apo": PolicyTerm(apo_term, needs_anchors=True),
}

# Field defaults that depend on the loss name; "_defaults" fills what a preset leaves open.
LOSS_PRESETS: dict[str, dict] = {
    "_defaults": {"eps_low": 0.2, "eps_high": 0.2},
    "dapo": {"eps_low": 0.2, "eps_high": 0.28},
}


def register_policy_term(name: str, term: PolicyTerm, preset: Optional[dict] = None) -> None:
    """Add an objective to the registry (for experiments; the shipped ones are above)."""
    if name in POLICY_TERMS or name.startswith("_"):
        raise ValueError(f"register_policy_term: name {name!r} is taken or reserved")
    POLICY_TERMS[name] = term
    if preset:
        LOSS_PRESETS[name] = dict(preset)


# --------------------------------------------------------------------------------------------
# KL estimators (theory.md section 6)
# --------------------------------------------------------------------------------------------


def kl_estimate(estimator: str, logp: Tensor, ref_logp: Optional[Tensor], kl_full: Optional[Tensor]) -> Tensor:
    """Per-token KL penalty, with delta = log pi_ref(y) - log pi_theta(y):

        k1 = -delta                        (expected gradient 0)
        k2 = delta^2 / 2                   (expected gradient: reverse KL(pi || pi_ref))
        k3 = exp(delta) - 1 - delta        (expected gradient: FORWARD KL(pi_ref || pi)), clamped to +-10
        full = KL(pi || pi_ref) summed over the vocabulary (given by the caller)
    """
    if estimator == "full":
        return kl_full
    delta = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta.square()
    return (delta.exp() - 1.0 - delta).clamp(-K3_CLAMP, K3_CLAMP)


# --------------------------------------------------------------------------------------------
# Aggregation: the one place token losses become a scalar
# --------------------------------------------------------------------------------------------


def aggregate(
    loss_tok: Tensor, mask: Tensor, loss_agg: str, *, weights: Optional[Tensor] = None,
    global_tokens: Optional[float] = None, global_seqs: Optional[float] = None,
    loss_norm_len: Optional[int] = None,
) -> Tensor:
    """Reduce masked token losses [B, T] to a scalar.

        token-mean:              sum_{i,t} w_i m_it l_it / N_tok
        seq-mean-token-mean:     sum_i w_i (sum_t m_it l_it / sum_t m_it) / N_seq
        seq-mean-token-sum-norm: sum_{i,t} w_i m_it l_it / (N_seq * L)

    N_tok, N_seq default to this batch's counts. For gradient accumulation pass the counts of
    the whole (global) batch as `global_tokens` / `global_seqs`: the micro-batch losses then
    sum to exactly the full-batch loss. L is `loss_norm_len` (default: the padded width T, which
    is only micro-batch invariant when every micro-batch has the same width).
    w_i are per-sequence weights (default 1); the simulator's exact mode uses pi_old(leaf).
    """
    for name, count in (("global_tokens", global_tokens), ("global_seqs", global_seqs)):
        if count is not None and not (math.isfinite(float(count)) and float(count) > 0):
            raise ValueError(f"{name}: the whole batch's count must be finite and > 0, got {count!r}")
    m = mask.to(loss_tok.dtype)
    per_tok = torch.where(mask.bool(), loss_tok, torch.zeros_like(loss_tok))  # pad positions cannot leak NaN
    w = torch.ones(loss_tok.shape[0], dtype=loss_tok.dtype, device=loss_tok.device) if weights is None else weights
    n_seq = float(loss_tok.shape[0]) if global_seqs is None else float(global_seqs)
    if loss_agg == "token-mean":
        # clamp: a batch without response tokens gives 0, not 0/0 = NaN (its numerator is 0)
        n_tok = m.sum().clamp(min=1.0) if global_tokens is None else float(global_tokens)
        return (w[:, None] * per_tok).sum() / n_tok
    if loss_agg == "seq-mean-token-mean":
        seq_len = m.sum(-1).clamp(min=1.0)  # [B]; empty responses contribute 0
        return (w * per_tok.sum(-1) / seq_len).sum() / n_seq
    if loss_agg == "seq-mean-token-sum-norm":
        norm_len = float(loss_tok.shape[1] if loss_norm_len is None else loss_norm_len)
        return (w[:, None] * per_tok).sum() / (n_seq * norm_len)
    raise ValueError(f"loss_agg: unknown aggregation {loss_agg!r}; choose from {LOSS_AGGS}")


# --------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------


def policy_loss(
    cfg: LossConfig,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    anchor_logp: Optional[Tensor] = None,
    anchor_ref_logp: Optional[Tensor] = None,
    anchor_is_sampled: Optional[Tensor] = None,
    kl_full: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    *,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss to minimise, and float diagnostics.

    Per token: loss_t = policy_term_t [+ kl_coef * kl_t on the term's KL scope] [- ent_coef * H_t],
    then `aggregate`. Tensors: logp, old_logp, mask, ref_logp, kl_full, entropy [B, T];
    advantages [B] or [B, T]; anchor_* [B, T, K]; weights [B]. `global_tokens` / `global_seqs`
    are the counts of the whole batch when this call sees one micro-batch of it.
    """
    cfg.validate()
    inputs = _check_inputs(cfg, logp, old_logp, advantages, mask, ref_logp, anchor_logp,
                           anchor_ref_logp, anchor_is_sampled, kl_full, entropy, weights)
    mask_b = inputs["mask"]
    adv = inputs["advantages"]
    log_ratio = (inputs["logp"] - inputs["old_logp"]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()  # [B, T] w_t

    term = POLICY_TERMS[cfg.name]
    anchors = {k: inputs[k] for k in ("anchor_logp", "anchor_ref_logp", "anchor_is_sampled") if k in inputs}
    loss_tok, aux = term.fn(cfg, ratio, adv, **anchors)
    pg_tok = loss_tok

    kl_tok = None
    if cfg.kl_coef > 0.0:
        kl_tok = kl_estimate(cfg.kl_estimator, inputs["logp"], inputs.get("ref_logp"), inputs.get("kl_full"))
        scope = (adv < 0) if term.kl_scope == "negative" else torch.ones_like(mask_b)
        loss_tok = loss_tok + cfg.kl_coef * kl_tok * scope
    if cfg.ent_coef > 0.0:
        loss_tok = loss_tok - cfg.ent_coef * inputs["entropy"]

    agg = dict(weights=inputs.get("weights"), global_tokens=global_tokens, global_seqs=global_seqs,
               loss_norm_len=cfg.loss_norm_len)
    loss = aggregate(loss_tok, mask_b, cfg.loss_agg, **agg)
    with torch.no_grad():
        metrics = _diagnostics(cfg, mask_b, adv, ratio, aux, inputs, kl_tok)
        metrics["pg_loss"] = float(aggregate(pg_tok, mask_b, cfg.loss_agg, **agg))
        metrics["loss"] = float(loss)
    return loss, metrics


def _diagnostics(cfg: LossConfig, mask: Tensor, adv: Tensor, ratio: Tensor, aux: dict,
                 inputs: dict, kl_tok: Optional[Tensor]) -> dict[str, float]:
    """Clip fractions split by advantage sign (TRL/verl names) and the APO diagnostics.

    Every entry is an average over response tokens. With per-sequence `weights` (the simulator's
    exact mode passes pi_old of each edge) tokens count with |w_i|, so fractions are shares of
    probability mass rather than counts of rows.
    """
    w = inputs.get("weights")
    tok_w = mask.to(ratio.dtype) * (1.0 if w is None else w.abs()[:, None])  # [B, T]

    def mean(x: Tensor, sel: Tensor) -> float:  # weighted mean of x over the selected tokens
        den = (tok_w * sel).sum()
        return float((torch.where(sel, x.to(ratio.dtype), torch.zeros_like(ratio)) * tok_w).sum() / den) if den > 0 else 0.0

    rho = aux["rho"]
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    low = neg & (rho < 1.0 - cfg.eps_low)  # flat for A < 0: the push is cut
    high = pos & (rho > 1.0 + cfg.eps_high)  # flat for A > 0
    rho_dual = aux.get("rho_dual", rho)  # what the dual-clip cap compares with c
    dual = neg & ~low & (rho_dual > cfg.clip_c) if cfg.clip_c is not None else torch.zeros_like(mask)
    out = {
        "num_tokens": float(mask.sum()),
        "ratio/mean": mean(ratio, mask),
        "clip_ratio/low_mean": mean(low, mask),
        "clip_ratio/high_mean": mean(high, mask),
        "clip_ratio/dual_mean": mean(dual, mask),
        "clip_ratio/region_mean": mean(low | high | dual, mask),
        "clip_frac/pos": mean(high, pos),
        "clip_frac/neg": mean(low | dual, neg),
        "frac_neg_tokens": mean(neg, mask),
    }
    if kl_tok is not None:
        out["kl"] = mean(kl_tok, mask)
    if "entropy" in inputs:
        out["entropy"] = mean(inputs["entropy"], mask)
    if "r_anchor" in aux:
        sampled_in_topk = inputs["anchor_is_sampled"].any(-1)
        out.update({
            "apo/r_anchor_mean": mean(aux["r_anchor"], neg),
            "apo/pull": mean(aux["pull"], neg),
            "apo/z_ref_mean": mean(aux["z_ref"], mask),
            "apo/neg_clipped_frac": mean(low | dual, neg),
            "apo/manifold_mass": mean(aux["manifold"], mask),
            "apo/outside_topk_frac": mean(~sampled_in_topk, mask),
        })
    return out


def _check_inputs(cfg: LossConfig, logp, old_logp, advantages, mask, ref_logp, anchor_logp,
                  anchor_ref_logp, anchor_is_sampled, kl_full, entropy, weights) -> dict[str, Tensor]:
    """Validate shapes and presence; zero out pad positions; raise ValueError naming the argument."""
    if not isinstance(logp, Tensor) or logp.dim() != 2:
        raise ValueError(f"logp: expected a [B, T] tensor, got {_shape(logp)}")
    bt = tuple(logp.shape)
    need = {
        "ref_logp": cfg.needs_ref_logp, "kl_full": cfg.needs_kl_full, "entropy": cfg.needs_entropy,
        "anchor_logp": cfg.needs_anchors, "anchor_ref_logp": cfg.needs_anchors,
        "anchor_is_sampled": cfg.needs_anchors,
    }
    given = dict(old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, anchor_logp=anchor_logp,
                 anchor_ref_logp=anchor_ref_logp, anchor_is_sampled=anchor_is_sampled, kl_full=kl_full,
                 entropy=entropy, weights=weights)
    for name, required in need.items():
        if required and given[name] is None:
            raise ValueError(f"{name}: required by LossConfig(name={cfg.name!r}, kl_coef={cfg.kl_coef}, "
                             f"kl_estimator={cfg.kl_estimator!r}, ent_coef={cfg.ent_coef}) but is None")
    for name in ("old_logp", "mask"):
        if given[name] is None:
            raise ValueError(f"{name}: required, got None")
    expected = {"old_logp": bt, "mask": bt, "ref_logp": bt, "kl_full": bt, "entropy": bt, "weights": bt[:1]}
    for name, shape in expected.items():
        x = given[name]
        if x is not None and (not isinstance(x, Tensor) or tuple(x.shape) != shape):
            raise ValueError(f"{name}: expected shape {list(shape)}, got {_shape(x)}")
    adv = advantages
    if not isinstance(adv, Tensor) or tuple(adv.shape) not in (bt[:1], bt):
        raise ValueError(f"advantages: expected shape [B]={list(bt[:1])} or [B, T]={list(bt)}, got {_shape(adv)}")
    if cfg.needs_anchors:
        k_shape = tuple(anchor_logp.shape) if isinstance(anchor_logp, Tensor) else None
        if k_shape is None or len(k_shape) != 3 or k_shape[:2] != bt or k_shape[2] < 1:
            raise ValueError(f"anchor_logp: expected shape [B, T, K]=[{bt[0]}, {bt[1]}, K>=1], got {_shape(anchor_logp)}")
        for name in ("anchor_ref_logp", "anchor_is_sampled"):
            x = given[name]
            if not isinstance(x, Tensor) or tuple(x.shape) != k_shape:
                raise ValueError(f"{name}: expected shape {list(k_shape)} (as anchor_logp), got {_shape(x)}")

    m = mask.bool()
    out: dict[str, Tensor] = {"mask": m}
    all_on = bool(m.all())  # no pad position anywhere: inputs need no blanking
    adv = adv[:, None].expand(bt) if adv.dim() == 1 else adv
    out["advantages"] = _clean("advantages", adv, m, allow_inf=False, all_on=all_on)
    out["logp"] = _clean("logp", logp, m, allow_inf=True, all_on=all_on)
    # pi_old(y) must be > 0 for a sampled token: -inf would make w = exp(-inf + inf) = NaN or e^20
    out["old_logp"] = _clean("old_logp", old_logp, m, allow_inf=False, all_on=all_on)
    for name in ("ref_logp", "kl_full", "entropy"):
        if given[name] is not None and (name != "ref_logp" or cfg.needs_ref_logp):
            out[name] = _clean(name, given[name], m, allow_inf=(name == "ref_logp"), all_on=all_on)
    if cfg.needs_anchors:
        mk = m[..., None].expand_as(anchor_logp)
        out["anchor_logp"] = _clean("anchor_logp", anchor_logp, mk, allow_inf=True, fill=-math.inf, all_on=all_on)
        out["anchor_ref_logp"] = _clean("anchor_ref_logp", anchor_ref_logp, mk, allow_inf=True, fill=-math.inf, all_on=all_on)
        out["anchor_is_sampled"] = anchor_is_sampled.bool()
    if weights is not None:
        if not torch.isfinite(weights).all():
            raise ValueError("weights: contains NaN or inf")
        out["weights"] = weights
    return out


def _clean(name: str, x: Tensor, m: Tensor, *, allow_inf: bool, fill: float = 0.0, all_on: bool = False) -> Tensor:
    """Report NaN (and inf where not meaningful) on response positions; blank pad positions."""
    bad = torch.isnan(x) if allow_inf else ~torch.isfinite(x)
    if bool(bad.any()):  # one cheap pass in the common clean case; count only on the error path
        n_bad = int((bad & m).sum())
        if n_bad:
            raise ValueError(f"{name}: {n_bad} response position(s) hold {'NaN' if allow_inf else 'NaN or inf'}")
    elif all_on:
        return x  # no pad position to blank (e.g. the simulator's fixed-depth trees)
    return torch.where(m, x, torch.full_like(x, fill))


def _shape(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


# --------------------------------------------------------------------------------------------
# Advantage estimators (objectives.md; groups are consecutive blocks of G rewards)
# --------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce", "psr", "nsr", "w_reinforce", "passk")


def group_advantages(
    rewards: Union[Tensor, Sequence[float]], group_size: int, estimator: str = "grpo", std: str = "unbiased",
    eps: float = 1e-6, lambda_pos: float = 0.1, k: Optional[int] = None,
) -> Tensor:
    """Per-response advantages [N] from rewards [N] in consecutive groups of G = group_size.

        grpo        (r - mean_g) / (std_g + eps)          std "unbiased" (verl) or "population"
        dr_grpo     r - mean_g
        rloo        r_i - mean of the other G-1 = G/(G-1) (r_i - mean_g)
        reinforce   r         (alias psr)
        nsr         r - 1
        w_reinforce lambda_pos if correct else -1          (binary rewards)
        passk       Pass@k training (Chen et al.), binary rewards, 1 <= k <= G:
                    rho = 1 - C(n-c,k)/C(n,k), sigma = sqrt(rho (1-rho))
                    A_pos = (1-rho)/(sigma+eps), A_neg = (1 - rho - C(n-c-1,k-1)/C(n-1,k-1))/(sigma+eps)
    """
    r = torch.as_tensor(rewards)
    r = r.to(torch.get_default_dtype()) if not r.is_floating_point() else r
    if r.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [N], got shape {list(r.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: must be an integer >= 2, got {group_size!r}")
    if r.numel() == 0 or r.numel() % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the number of rewards {r.numel()}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards: contains NaN or inf")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator: unknown {estimator!r}; choose from {ADVANTAGE_ESTIMATORS}")
    if std not in ("unbiased", "population"):
        raise ValueError(f"std: must be 'unbiased' or 'population', got {std!r}")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps!r}")
    G = group_size
    g = r.view(-1, G)  # [N/G, G]
    mean = g.mean(-1, keepdim=True)
    if estimator in ("w_reinforce", "passk") and not ((g == 0) | (g == 1)).all():
        raise ValueError(f"rewards: estimator {estimator!r} needs binary rewards in {{0, 1}}")
    if estimator == "grpo":
        adv = (g - mean) / (g.std(-1, unbiased=(std == "unbiased"), keepdim=True) + eps)
        # all-equal groups get exactly 0: rounding in mean/std would leave up to ~0.1 in float32
        # (e.g. four rewards of 0.998), and 0/0 = NaN with eps = 0
        adv = torch.where((g == g[:, :1]).all(-1, keepdim=True), torch.zeros_like(adv), adv)
    elif estimator == "dr_grpo":
        adv = g - mean
    elif estimator == "rloo":
        adv = (g - mean) * G / (G - 1)
    elif estimator in ("reinforce", "psr"):
        adv = g.clone()
    elif estimator == "nsr":
        adv = g - 1.0
    elif estimator == "w_reinforce":
        adv = torch.where(g > 0, torch.full_like(g, lambda_pos), torch.full_like(g, -1.0))
    else:
        adv = _passk_advantages(g, k, eps)
    return adv.reshape(-1)


def _passk_advantages(g: Tensor, k: Optional[int], eps: float) -> Tensor:
    n = g.shape[1]
    if k is None or isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k: passk needs an integer 1 <= k <= group_size={n}, got {k!r}")
    out = torch.empty_like(g)
    for row, c in enumerate(g.sum(-1).round().long().tolist()):
        # c = 0, or n - c < k (so rho = 1): sigma = 0 and both formulas give 0 / (0 + eps) = 0;
        # set it directly so that eps = 0 is no 0/0
        if c == 0 or n - c < k:
            out[row] = 0.0
            continue
        rho = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        sigma = math.sqrt(max(rho * (1.0 - rho), 0.0))
        a_pos = (1.0 - rho) / (sigma + eps)
        a_neg = (1.0 - rho - math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)) / (sigma + eps) if c < n else 0.0
        out[row] = torch.where(g[row] > 0, torch.full_like(g[row], a_pos), torch.full_like(g[row], a_neg))
    return out


def expected_group_advantage(p: Tensor, group_size: int, **estimator_kwargs) -> tuple[Tensor, Tensor]:
    """c_r(p, G) = E[A_i | r_i = r] for a prompt with success probability p (theory.md section 4).

        c_r = sum_{m=0}^{G-1} C(G-1, m) p^m (1-p)^(G-1-m) A(r; m)

    where A(r; m) is the estimator's advantage of a response with reward r whose G-1 group mates
    hold m successes. Works for every estimator whose advantage depends only on the own reward and
    the group's rewards (all of `ADVANTAGE_ESTIMATORS`). Returns (c_0, c_1), each shaped like p.
    """
    G = group_size
    groups = []  # 2G groups: own reward r in {0, 1}, m successes among the others
    for r in (0.0, 1.0):
        for m in range(G):
            groups.append([r] + [1.0] * m + [0.0] * (G - 1 - m))
    rewards = torch.tensor(groups, dtype=torch.float64).reshape(-1)
    a = group_advantages(rewards, G, **estimator_kwargs).view(2, G, G)[:, :, 0].to(p.dtype)  # [2, G] A(r; m)
    m = torch.arange(G, dtype=p.dtype, device=p.device)
    log_binom = torch.lgamma(torch.tensor(float(G), dtype=p.dtype)) - torch.lgamma(m + 1) - torch.lgamma(G - m)
    pe = p[..., None]
    # binomial pmf of m successes among G-1, written with xlogy so p in {0, 1} is exact
    pmf = torch.exp(log_binom + torch.xlogy(m, pe) + torch.xlogy(G - 1 - m, 1 - pe))  # [..., G]
    a = a.to(p.device)
    return (pmf * a[0]).sum(-1), (pmf * a[1]).sum(-1)
