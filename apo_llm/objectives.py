"""The one loss module: GRPO family, KL variants, KL-on-Wrong, APO and its baselines, the peers TRL
and verl ship (CISPO, GSPO, SAPO, GMPO, GPG, DPPO) and SimKO, in pure torch.

Everything in the project (the tree simulator, the LoRA trainer, the notebooks) calls
`policy_loss` and `group_advantages` from here; there is no second implementation.

Symbols follow the APO paper (arXiv 2602.05717); the method and its open readings are in
docs/method.md, the closed forms the tests check in docs/theory.md, the catalogue in docs/objectives.md:

    w_t      = pi_theta(y_t) / pi_old(y_t)                       token ratio
    A        = group-normalised advantage (same for every token of a response)
    S        = TopK(pi_ref) \\ {y_t}                              anchor set (exclusive anchoring)
    Z_ref    = sum_{k in S} pi_ref(k),  M_S = sum_{k in S} pi_theta(k)
    r_anchor = M_S / Z_ref                                       virtual anchor ratio ("ref", the paper's)
             = M_S / M_S(theta_old)                              ("old_mass")
             = sum_{k in S} (pi_ref(k)/Z_ref) pi_theta(k)/pi_old(k)  ("old_token")
    r_APO    = lambda * w_t - beta * r_anchor                    rectified ratio, A < 0 only

Layout (verl-style): each loss name maps to a short per-token *policy term* in `POLICY_TERMS`;
optional KL and entropy terms are added by `policy_loss`; `aggregate` is the single place where
token losses become a scalar, and no loss overrides it. `required_inputs` says which optional
tensors a configuration needs.

Shapes: B sequences, T response positions, K reference Top-K anchors per position (SimKO's
policy_topk_logp: the policy's own Top-K per position, also [B, T, K]).
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
APO_ANCHOR_NORMS = ("ref", "old_mass", "old_token")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Which objective to optimise, with every knob the reference documents.

    `name` picks a registered policy term (see `POLICY_TERMS`) and the preset defaults of
    `LOSS_PRESETS` for fields left at `None`. Validation runs on construction and again in
    `policy_loss`; every error names the offending field. Configurations that are legal but do
    not do what their name says (e.g. a rectified APO arm that is positive-only learning) warn
    on construction; `validate()` returns the same notes.
    """

    name: str = field(default="grpo", metadata={
        "help": "grpo | dapo | grpo_kl | kl_on_wrong | apo | topk_kl_on_wrong | clip_cov | kl_cov | cispo | "
                "gspo | gspo_token | sapo | gmpo | gpg | dppo_tv | dppo_kl | simko"})
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
    apo_k: int = field(default=8, metadata={
        "help": "size K of the safe manifold TopK(pi_ref) (apo and topk_kl_on_wrong)"})
    apo_clip: str = field(
        default="rectified",
        metadata={"help": "rectified: clip r_APO as a whole | push_only: clip lambda*w, pull bounded by apo_pull_cap"},
    )
    apo_anchoring: str = field(
        default="exclusive",
        metadata={"help": "exclusive: S = TopK \\ {y_t} (paper) | inclusive: S = TopK (ablation)"},
    )
    apo_anchor_norm: str = field(
        default="ref",
        metadata={"help": "r_anchor = M_S/Z_ref (ref, paper) | M_S/M_S(theta_old) (old_mass) | "
                          "sum_S (pi_ref/Z_ref) pi/pi_old (old_token); old_* need anchor_old_logp"},
    )
    apo_pull_cap: Optional[float] = field(
        default=None,
        metadata={"allow_inf": True, "help": "push_only: the pull is flat where r_anchor > cap (None: 1 + eps_high; inf: no cap)"},
    )
    topk_kl_coef: float = field(default=0.0, metadata={
        "help": "topk_kl_on_wrong: coef of the cross-entropy to pi_ref renormalised on S, A < 0 tokens"})
    cov_frac: Optional[float] = field(default=None, metadata={
        "help": "clip_cov / kl_cov: share of response tokens selected by cov (clip_cov 2e-4, kl_cov 2e-3)"})
    cov_lb: float = field(default=1.0, metadata={"help": "clip_cov: candidates have cov_lb < cov_t < cov_ub"})
    cov_ub: float = field(default=5.0, metadata={"help": "clip_cov: upper bound of the candidate band"})
    kl_cov_coef: float = field(default=1.0, metadata={
        "help": "kl_cov: coef of |log pi - log pi_old| on the selected tokens"})
    cispo_eps_max: float = field(default=5.0, metadata={
        "help": "cispo: cap of the detached weight, min(w, eps_max) (TRL's epsilon_high for cispo)"})
    sapo_tau_pos: float = field(default=1.0, metadata={"help": "sapo: gate temperature on A > 0 tokens"})
    sapo_tau_neg: float = field(default=1.05, metadata={"help": "sapo: gate temperature on A <= 0 tokens"})
    simko_k: int = field(default=3, metadata={"help": "simko: size K of the policy's own Top-K candidates"})
    simko_alpha: float = field(default=0.01, metadata={
        "help": "simko: share of the correct-token ratio moved to the policy's Top-K candidates"})
    simko_lambda: float = field(default=1.1, metadata={
        "help": "simko: advantage scale on wrong tokens that are the policy's top-1 candidate"})
    simko_entropy_quantile: Optional[float] = field(default=0.8, metadata={
        "help": "simko: act where H_t exceeds this quantile of its sequence's entropies (None: every token)"})
    dppo_delta_low: Optional[float] = field(default=None, metadata={
        "help": "dppo_tv / dppo_kl: divergence threshold on A <= 0 tokens (TV: probability drop; KL: binary KL); "
                "default 0.15 (dppo_tv) / 0.05 (dppo_kl)"})
    dppo_delta_high: Optional[float] = field(default=None, metadata={
        "help": "dppo_tv / dppo_kl: divergence threshold on A > 0 tokens; default 0.15 (dppo_tv) / 0.05 (dppo_kl)"})
    dppo_trunc: float = field(default=20.0, metadata={"help": "dppo: cap c of the detached weight min(w, c)"})
    top_entropy_quantile: float = field(default=1.0, metadata={
        "help": "keep the policy term (and entropy bonus) on the top rho of the call's tokens by entropy; "
                "1: all; 0: only the highest-entropy token(s), as TRL"})
    loss_agg: Optional[str] = field(
        default=None,
        metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (default token-mean; "
                          "seq-mean-token-mean for gspo, gspo_token, gmpo, sapo, their papers' per-sequence mean)"},
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
        for note in self.validate():
            warnings.warn(note, stacklevel=2)

    def validate(self) -> list[str]:
        """Raise ValueError naming the first bad field; return notes on legal-but-misleading settings."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"LossConfig.{name}={getattr(self, name)!r}: {why}")

        def real(name: str) -> float:  # a finite-or-inf real number, not bool / str / NaN
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x):
                bad(name, "must be a number")
            return float(x)

        if self.name not in POLICY_TERMS:
            bad("name", f"unknown loss; choose from {sorted(POLICY_TERMS)}")
        for eps in ("eps_low", "eps_high"):
            if not (0.0 < real(eps) < 1.0):
                bad(eps, "must lie in (0, 1)")
        if self.clip_c is not None and not real("clip_c") > 1.0:
            bad("clip_c", "dual-clip cap must be > 1 (or None to disable)")
        for name in ("kl_coef", "ent_coef", "topk_kl_coef", "kl_cov_coef"):
            if not (real(name) >= 0.0 and math.isfinite(getattr(self, name))):
                bad(name, "must be finite and >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", f"choose from {KL_ESTIMATORS}")
        if not (real("apo_lambda") > 0.0 and math.isfinite(self.apo_lambda)):
            bad("apo_lambda", "push weight lambda must be > 0")
        if not (real("apo_beta") >= 0.0 and math.isfinite(self.apo_beta)):
            bad("apo_beta", "pull weight beta must be >= 0")
        if isinstance(self.apo_k, bool) or not isinstance(self.apo_k, int) or self.apo_k < 1:
            bad("apo_k", "Top-K size must be an integer >= 1")
        for name, choices in (("apo_clip", APO_CLIPS), ("apo_anchoring", APO_ANCHORINGS),
                              ("apo_anchor_norm", APO_ANCHOR_NORMS), ("loss_agg", LOSS_AGGS)):
            if getattr(self, name) not in choices:
                bad(name, f"choose from {choices}")
        if self.apo_pull_cap is not None and not real("apo_pull_cap") > 0.0:
            bad("apo_pull_cap", "must be > 0 (inf: no cap; None: 1 + eps_high)")
        if not 0.0 < real("cov_frac") <= 1.0:
            bad("cov_frac", "must lie in (0, 1]")
        if not (math.isfinite(real("cov_lb")) and math.isfinite(real("cov_ub")) and self.cov_lb < self.cov_ub):
            bad("cov_ub", f"the band needs finite cov_lb < cov_ub (cov_lb={self.cov_lb!r})")
        self._validate_peers(bad, real)
        n = self.loss_norm_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Real)
                              or not (math.isfinite(n) and n == int(n) and n >= 1)):
            bad("loss_norm_len", "must be a positive integer or None")
        return self._notes()

    def _validate_peers(self, bad, real) -> None:
        """The fields of the peer objectives (CISPO, SAPO, SimKO) and the entropy-token selection."""
        for name in ("cispo_eps_max", "sapo_tau_pos", "sapo_tau_neg", "simko_lambda", "dppo_delta_low",
                     "dppo_delta_high", "dppo_trunc"):
            if not (real(name) > 0.0 and math.isfinite(getattr(self, name))):
                bad(name, "must be finite and > 0")
        if isinstance(self.simko_k, bool) or not isinstance(self.simko_k, int) or self.simko_k < 1:
            bad("simko_k", "Top-K size must be an integer >= 1")
        if not 0.0 <= real("simko_alpha") <= 1.0:
            bad("simko_alpha", "must lie in [0, 1]")
        if self.simko_entropy_quantile is not None and not 0.0 <= real("simko_entropy_quantile") < 1.0:
            bad("simko_entropy_quantile", "must lie in [0, 1) (None: every token)")
        if not 0.0 <= real("top_entropy_quantile") <= 1.0:
            bad("top_entropy_quantile", "must lie in [0, 1] (1: every token; 0: the highest-entropy token)")

    def _notes(self) -> list[str]:
        notes = []
        coef = POLICY_TERMS[self.name].defining_coef
        if coef is not None and getattr(self, coef) == 0.0:
            notes.append(f"LossConfig: {self.name!r} with {coef}=0 is plain GRPO; set {coef} > 0")
        if self.is_positive_only:
            notes.append(
                f"LossConfig: apo_clip='rectified' with apo_lambda - apo_beta = {self.apo_lambda - self.apo_beta:g}"
                f" < 1 - eps_low = {1 - self.eps_low:g}: every negative token starts outside the clip window "
                "(r_APO = lambda - beta when r_anchor = 1), so push and pull are both zero there: "
                "positive-only learning, not APO; do not report this arm as APO")
        return notes

    # What a caller must compute before calling policy_loss. Trainers ask these (or
    # `required_inputs`) instead of testing loss names.
    @property
    def needs_anchors(self) -> bool:
        return POLICY_TERMS[self.name].needs_anchors

    @property
    def needs_anchor_old(self) -> bool:
        """old_mass / old_token readings need pi_old at the anchors (`anchor_old_logp`)."""
        return POLICY_TERMS[self.name].apo_ratio and self.apo_anchor_norm != "ref"

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
        """H_t per token: the entropy bonus, the top-entropy token selection, or a term that reads it (SimKO)."""
        return self.ent_coef > 0.0 or self.top_entropy_quantile < 1.0 or POLICY_TERMS[self.name].needs_entropy

    @property
    def policy_topk(self) -> int:
        """K of the policy's own Top-K log-probs the training forward must return (0: none; SimKO)."""
        return self.simko_k if POLICY_TERMS[self.name].needs_policy_topk else 0

    @property
    def needs_policy_topk(self) -> bool:
        return self.policy_topk > 0

    @property
    def sequence_coupled(self) -> bool:
        """A token's loss depends on the other tokens of its own sequence (GSPO's and GMPO's sequence
        ratio, SimKO's per-sequence entropy quantile): micro-batches must hold whole sequences (both
        engines split by rows), and an expected surrogate summed over single edges does not exist."""
        term = POLICY_TERMS[self.name]
        return term.sequence_level or (term.needs_policy_topk and self.simko_entropy_quantile is not None)

    @property
    def needs_sign_split(self) -> bool:
        """Some term acts on A < 0 tokens without being proportional to A (KL-on-Wrong, Top-K KL on
        wrong): an expected-update caller must keep A < 0 and A = 0 responses apart."""
        term = POLICY_TERMS[self.name]
        gated = term.sign_gated_coef is not None and getattr(self, term.sign_gated_coef) > 0.0
        return gated or (self.kl_coef > 0.0 and term.kl_scope == "negative")

    @property
    def batch_coupled(self) -> bool:
        """The token loss depends on other tokens of the call (Clip-Cov / KL-Cov selections, the
        top-entropy-quantile selection), so
        an expected (enumerated) surrogate is not the expectation of the sampled one."""
        return POLICY_TERMS[self.name].batch_coupled or self.top_entropy_quantile < 1.0

    @property
    def pull_cap(self) -> float:
        """The r_anchor above which the push_only pull is flat (apo_pull_cap, default 1 + eps_high)."""
        return 1.0 + self.eps_high if self.apo_pull_cap is None else float(self.apo_pull_cap)

    @property
    def is_positive_only(self) -> bool:
        """Rectified APO whose negative tokens start outside the clip window: lambda - beta < 1 - eps_low."""
        return (POLICY_TERMS[self.name].apo_ratio and self.apo_clip == "rectified"
                and self.apo_lambda - self.apo_beta < 1.0 - self.eps_low)


OPTIONAL_INPUTS = ("ref_logp", "kl_full", "entropy", "anchor_logp", "anchor_ref_logp", "anchor_is_sampled",
                   "anchor_old_logp", "policy_topk_logp")


def required_inputs(cfg: LossConfig) -> frozenset[str]:
    """The optional `policy_loss` tensors this configuration needs (names from OPTIONAL_INPUTS).

    The one place that decides it: trainer and simulator build exactly these, `_check_inputs`
    requires exactly these. (`weights` is the caller's choice and never required.)
    """
    need = {"ref_logp": cfg.needs_ref_logp, "kl_full": cfg.needs_kl_full, "entropy": cfg.needs_entropy,
            "anchor_logp": cfg.needs_anchors, "anchor_ref_logp": cfg.needs_anchors,
            "anchor_is_sampled": cfg.needs_anchors, "anchor_old_logp": cfg.needs_anchor_old,
            "policy_topk_logp": cfg.needs_policy_topk}
    return frozenset(name for name, wanted in need.items() if wanted)


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

    The paper's ("ref") reading. anchor_logp, anchor_ref_logp: [B, T, K]; in_anchor_set: [B, T, K]
    bool (membership of S). Returns (r_anchor [B, T], Z_ref [B, T]). Where S is empty (Z_ref = 0)
    r_anchor is 0, so the pull vanishes instead of dividing by zero.
    """
    out = anchor_ratio_reading("ref", anchor_logp, anchor_ref_logp, None, in_anchor_set)
    return out["r_anchor"], out["z_ref"]


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (an empty anchor set has no pull; no NaN in the backward)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def anchor_ratio_reading(norm: str, anchor_logp: Tensor, anchor_ref_logp: Tensor, anchor_old_logp: Optional[Tensor],
                         in_set: Tensor) -> dict[str, Tensor]:
    """r_anchor under each reading of what it is normalised by (docs/method.md, open points).

    Each reading is r_anchor = sum_{k in S} a_k pi_theta(k) with a weight a_k fixed during the update:
        ref        a_k = 1 / Z_ref                       r = M_S / Z_ref   (the paper's write-up)
        old_mass   a_k = 1 / M_S(theta_old)              r = M_S / M_S(theta_old), 1 at theta_old
        old_token  a_k = (pi_ref(k)/Z_ref) / pi_old(k)   r = sum_S (pi_ref(k)/Z_ref) pi_theta(k)/pi_old(k)
    old_token clamps each log(pi_theta(k)/pi_old(k)) to +-20 like the token ratio; an anchor with
    pi_old(k) = 0 contributes 0. Returns r_anchor, z_ref [B, T] and, detached, the parts
    c_k = a_k pi_theta(k) [B, T, K] (their sum is r_anchor; the diagnostics' force uses them),
    and, detached for the diagnostics, p = pi_theta(k) [B, T, K] and pi_s = pi_theta(k) 1[k in S].
    """
    p_anchor = anchor_logp.exp()  # [B, T, K] pi_theta on the reference Top-K
    zero = torch.zeros((), dtype=p_anchor.dtype, device=p_anchor.device)
    in_f = in_set.to(p_anchor.dtype)  # 0/1 mask: a multiply is ~4x cheaper than torch.where here

    def on_s(x: Tensor) -> Tensor:  # x 1[k in S] in x's own dtype (exp >= 0: x * 0 = +0, as where gave)
        if not bool(torch.isfinite(x.sum())):  # a +inf probability (log p = +inf): inf * 0 = NaN off S
            return torch.where(in_set, x, zero)
        return x * (in_f if x.dtype == in_f.dtype else in_set.to(x.dtype))

    p_ref = on_s(anchor_ref_logp.exp())  # [B, T, K]
    pi_s = on_s(p_anchor)  # [B, T, K] pi_theta on S
    z_ref = p_ref.sum(-1)  # [B, T] Z_ref, the reference's mass on S
    if norm == "ref":
        r_anchor = _safe_div(pi_s.sum(-1), z_ref)  # M_S / Z_ref
        a = _safe_div(torch.ones_like(z_ref), z_ref)[..., None]  # [B, T, 1]
    elif norm == "old_mass":
        m_old = on_s(anchor_old_logp.exp()).sum(-1)  # [B, T] M_S(theta_old)
        r_anchor = _safe_div(pi_s.sum(-1), m_old)
        a = _safe_div(torch.ones_like(m_old), m_old)[..., None]
    else:  # old_token
        q = _safe_div(p_ref, z_ref[..., None])  # [B, T, K] reference renormalised on S
        old_ok = torch.isfinite(anchor_old_logp)
        q = torch.where(old_ok, q, zero)
        old = torch.where(old_ok, anchor_old_logp, zero)  # -inf would give inf - inf = NaN below
        parts = q * (anchor_logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        return {"r_anchor": parts.sum(-1), "z_ref": z_ref, "parts": parts.detach(), "p": p_anchor.detach(),
                "pi_s": pi_s.detach()}
    if bool(torch.isfinite(a.sum())):  # a >= 0 all finite: a * 0 = 0 off S, as the where below gives
        parts = a * pi_s.detach()
    else:  # 1 / Z_ref overflowed (subnormal Z_ref): inf * 0 would be NaN off S
        parts = torch.where(in_set, a * p_anchor.detach(), zero)
    return {"r_anchor": r_anchor, "z_ref": z_ref, "parts": parts, "p": p_anchor.detach(), "pi_s": pi_s.detach()}


@dataclass(frozen=True)
class PolicyTerm:
    """A registered objective: its per-token policy term and what the caller must know about it."""

    fn: Callable[..., tuple[Tensor, dict]]
    kl_scope: str = "all"  # the generic KL term on "all" tokens, or only "negative"-advantage ones
    needs_anchors: bool = False
    defining_coef: Optional[str] = None  # the field that makes it differ from GRPO (warn when 0)
    apo_ratio: bool = False  # rectifies A < 0 ratios: apo_clip, apo_anchor_norm, apo_pull_cap apply
    sign_gated_coef: Optional[str] = None  # coefficient of a term applied on A < 0 tokens, not scaled by A
    batch_coupled: bool = False  # a token's loss depends on the other tokens of the call
    sequence_level: bool = False  # a token's loss depends on the other tokens of its sequence
    needs_entropy: bool = False  # reads H_t (detached) per token
    needs_policy_topk: bool = False  # reads log pi_theta at the policy's own Top-K ids [B, T, K] (with grad)


def _anchor_set(cfg: LossConfig, anchor_is_sampled: Tensor) -> Tensor:
    return torch.ones_like(anchor_is_sampled) if cfg.apo_anchoring == "inclusive" else ~anchor_is_sampled


def grpo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, **_: Tensor) -> tuple[Tensor, dict]:
    """GRPO / PPO token loss: max(-A w, -A clip(w, 1-eps_low, 1+eps_high)) (+ dual-clip)."""
    loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    return loss, {"rho": ratio}


def apo_term(
    cfg: LossConfig, ratio: Tensor, adv: Tensor, *, anchor_logp: Tensor, anchor_ref_logp: Tensor,
    anchor_is_sampled: Tensor, anchor_old_logp: Optional[Tensor] = None, **_: Tensor,
) -> tuple[Tensor, dict]:
    """APO token loss. A >= 0: exactly GRPO. A < 0: the ratio is rectified,

        rectified: loss = max(-A r_APO, -A clip(r_APO, 1-eps_low, 1+eps_high)),
                   r_APO = lambda w - beta r_anchor                      (+ dual-clip)
        push_only: loss = lambda max(-A w, -A clip(w, ...)) + A beta min(r_anchor, cap)
                   (dual-clip caps the push part only)

    r_anchor follows cfg.apo_anchor_norm (`anchor_ratio_reading`). Minimising either for A < 0
    pushes w (the wrong token) down and pulls r_anchor (the mass on the safe manifold
    S = TopK(pi_ref) minus y_t) up: "elastic recovery". The push_only cap (cfg.pull_cap, default
    1 + eps_high, the PPO bound of a ratio pushed up) makes the pull flat once the anchors hold
    cap times their normaliser. Its logit force |A| beta |grad_z r_anchor|_1 <= 2 |A| beta r_anchor
    (docs/theory.md section 7) is then at most 2 |A| beta cap, whatever Z_ref; uncapped, under
    "ref" it is 2 |A| beta M_S (1 - M_S) / Z_ref, up to ~|A| beta / (2 Z_ref) as Z_ref -> 0.
    """
    in_set = _anchor_set(cfg, anchor_is_sampled)
    anc = anchor_ratio_reading(cfg.apo_anchor_norm, anchor_logp, anchor_ref_logp, anchor_old_logp, in_set)
    r_anchor = anc["r_anchor"]
    neg = adv < 0
    grpo_loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    capped = torch.zeros_like(neg)
    if cfg.apo_clip == "rectified":
        pull = adv * cfg.apo_beta * r_anchor  # <= 0 on A < 0: minimising raises r_anchor
        rho = cfg.apo_lambda * ratio - cfg.apo_beta * r_anchor
        neg_loss = clipped_surrogate(rho, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    else:
        cap = cfg.pull_cap
        capped = r_anchor.detach() > cap
        pull = adv * cfg.apo_beta * (r_anchor if math.isinf(cap) else r_anchor.clamp(max=cap))
        push = cfg.apo_lambda * clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, None)
        if cfg.clip_c is not None:
            push = torch.minimum(push, -adv * cfg.clip_c)
        neg_loss = push + pull
        rho = ratio  # the clip decision of push_only is on w alone
    loss = torch.where(neg, neg_loss, grpo_loss)
    # diagnostics only: pi_theta on the Top-K (and on S) reused from the reading, not exp'd again
    aux = {"rho": torch.where(neg, rho, ratio), "r_anchor": r_anchor, "z_ref": anc["z_ref"], "pull": -pull,
           "anchor_parts": anc["parts"], "anchor_pi": anc["pi_s"], "pull_capped": capped,
           "manifold": anc["p"].sum(-1)}  # [B, T] TopK mass
    if cfg.apo_clip == "push_only":
        # the dual-clip cap |A| c binds on the push lambda * |A| * w, i.e. where lambda * w > c
        aux["rho_dual"] = torch.where(neg, cfg.apo_lambda * ratio, ratio)
    return loss, aux


def topk_kl_on_wrong_term(
    cfg: LossConfig, ratio: Tensor, adv: Tensor, *, anchor_logp: Tensor, anchor_ref_logp: Tensor,
    anchor_is_sampled: Tensor, **_: Tensor,
) -> tuple[Tensor, dict]:
    """Top-K forward KL on wrong responses: the "shape inside the safe manifold" control for APO.

        loss = GRPO + topk_kl_coef * CE_t * 1[A < 0],
        CE_t = -sum_{k in S} q_k log pi_theta(k),   q_k = pi_ref(k) / Z_ref on S (0 if S is empty)

    S is APO's anchor set (apo_anchoring, apo_k), so this differs from APO only in pulling the
    reference's shape on S instead of the mass M_S: -dCE/dz_j = q_j 1[j in S] - pi_j. CE equals
    KL(q || pi_theta restricted to S) + H(q); not scaled by |A| (like kl_on_wrong). An anchor with
    pi_theta(k) = 0 and q_k > 0 gives an infinite loss (reported by the caller's finiteness check).
    """
    in_set = _anchor_set(cfg, anchor_is_sampled)
    p_ref = torch.where(in_set, anchor_ref_logp.exp(), torch.zeros_like(anchor_ref_logp))  # [B, T, K]
    q = _safe_div(p_ref, p_ref.sum(-1, keepdim=True))
    ce = -torch.where(q > 0, q * anchor_logp, torch.zeros_like(q)).sum(-1)  # [B, T]
    loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    loss = loss + torch.where(adv < 0, cfg.topk_kl_coef * ce, torch.zeros_like(ce))
    return loss, {"rho": ratio, "topk_ce": ce.detach()}


def token_cov(adv: Tensor, logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """cov_t = (A_t - mean A)(log pi_t - mean log pi) (Cui et al. 2025), detached, means over the
    call's response tokens with finite log pi (the others are not `valid`). Returns (valid, cov) [B, T]."""
    lp = logp.detach()
    valid = mask & torch.isfinite(lp)
    m = valid.to(lp.dtype)
    n = m.sum().clamp(min=1.0)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    cov = (adv - (adv * m).sum() / n) * (lp - (lp * m).sum() / n)
    return valid, torch.where(valid, cov, torch.zeros_like(cov))


def _n_cov(cfg: LossConfig, valid: Tensor) -> int:
    """ceil(cov_frac * valid tokens): at least one token whenever the call has one."""
    return math.ceil(cfg.cov_frac * int(valid.sum()))


def clip_cov_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, mask: Tensor,
                  generator: Optional[torch.Generator] = None, **_: Tensor) -> tuple[Tensor, dict]:
    """Clip-Cov (Cui et al. 2025): GRPO, with the gradient of n = ceil(cov_frac N) tokens drawn
    uniformly (CPU torch.Generator `generator`; torch's global one if None) from the band
    cov_lb < cov_t < cov_ub removed (their loss value is kept, detached). N = response tokens of
    this call, so under micro-batching the selection is per micro-batch."""
    valid, cov = token_cov(adv, logp, mask)
    cand = (valid & (cov > cfg.cov_lb) & (cov < cfg.cov_ub)).flatten()
    idx = cand.nonzero().squeeze(1)  # [n_cand] flat positions in the band
    n = min(idx.numel(), _n_cov(cfg, valid))
    pick = idx[torch.randperm(idx.numel(), generator=generator)[:n].to(idx.device)]
    sel = torch.zeros_like(cand).index_fill_(0, pick, True).view_as(mask)  # [B, T]
    loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    return torch.where(sel, loss.detach(), loss), {"rho": ratio, "cov_selected": sel}


def kl_cov_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor, mask: Tensor,
                **_: Tensor) -> tuple[Tensor, dict]:
    """KL-Cov (Cui et al. 2025): GRPO + kl_cov_coef * |log pi_theta(y_t) - log pi_old(y_t)| on the
    n = ceil(cov_frac N) tokens of largest cov_t (ties: torch.topk's order). Its gradient is 0 at
    theta = theta_old (|x|' = 0 at 0 in torch) and acts from the second inner step on."""
    valid, cov = token_cov(adv, logp, mask)
    score = torch.where(valid, cov, torch.full_like(cov, -math.inf)).flatten()
    top = torch.topk(score, min(int(valid.sum()), _n_cov(cfg, valid))).indices
    sel = torch.zeros_like(valid.flatten()).index_fill_(0, top, True).view_as(mask)  # [B, T]
    loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    pen = torch.where(sel, (logp - old_logp).abs(), torch.zeros_like(logp))
    return loss + cfg.kl_cov_coef * pen, {"rho": ratio, "cov_selected": sel}


# --------------------------------------------------------------------------------------------
# Peer objectives shipped by TRL / verl (CISPO, GSPO, SAPO, GMPO, GPG) and SimKO
# --------------------------------------------------------------------------------------------
# Each is the per-token term of its paper, in that paper's symbols mapped to ours
# (w_t = pi_theta(y_t) / pi_old(y_t), A the advantage); docs/objectives.md has the table of
# sources, defaults and which library ships which. sg(.) is stop-gradient (detach).


def _masked_seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(1/|y_i|) sum_t m_it x_it per sequence, [B, T] -> [B, 1]; 0 for an empty sequence."""
    m = mask.to(x.dtype)
    return (torch.where(mask, x, torch.zeros_like(x)).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]


def _floored_logp(logp: Tensor, old_logp: Tensor) -> Tensor:
    """log pi_theta(y_t) for the terms linear in it (CISPO, GPG, DPPO), finite where it is -inf.

    A response token with pi_theta(y_t) = 0 would make A log pi = inf (NaN at A = 0) and poison the
    scalar loss. There it takes the value log pi_old - 20, the floor the log-ratio clamp already puts
    under w in every ratio term, and no gradient (the ratio terms are flat there too); every finite
    log pi keeps its value and its exact gradient."""
    return torch.where(torch.isneginf(logp), (old_logp - LOG_RATIO_CLAMP).detach(), logp)


def cispo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor,
               **_: Tensor) -> tuple[Tensor, dict]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): a clipped, detached importance weight times A log pi.

        loss_t = -sg(min(w_t, eps_max)) A log pi_theta(y_t)

    Every token keeps its gradient (nothing is flat, unlike the PPO clip); the weight only scales
    it. Upper cap only, as TRL's cispo (epsilon_high = eps_max, 5.0 recommended there, after ScaleRL,
    arXiv 2510.13786); verl's cispo clips the weight two-sided to [1 - eps_low, 1 + eps_high].
    log pi = -inf: see `_floored_logp`."""
    weight = ratio.clamp(max=cfg.cispo_eps_max).detach()
    return -weight * adv * _floored_logp(logp, old_logp), {"rho": ratio}


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log s_i = (1/|y_i|) sum_t log w_t (token log-ratios clamped first), clamped to +-20. [B, 1]."""
    lr = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _masked_seq_mean(lr, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def gspo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor, mask: Tensor,
              **_: Tensor) -> tuple[Tensor, dict]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): the sequence-level, length-normalised ratio

        s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) sum_t log w_it)
        loss_t = max(-A s_i, -A clip(s_i, 1 - eps_low, 1 + eps_high))   on every token of y_i

    The paper's objective is per sequence with A_i; under seq-mean-token-mean (the paper's, this
    name's preset) the token losses average back to it (token-mean would weight sequence i by |y_i|).
    Needs each sequence whole in one call."""
    s = _sequence_log_ratio(logp, old_logp, mask).exp().expand_as(ratio)  # [B, T]
    return clipped_surrogate(s, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c), {"rho": s}


def gspo_token_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor, mask: Tensor,
                    **_: Tensor) -> tuple[Tensor, dict]:
    """GSPO-token (same paper): s_it = sg(s_i) pi_theta(y_t) / sg(pi_theta(y_t)), clipped as GSPO.

    Its value is s_i at every token, its gradient s_i grad log pi_theta(y_t): with a sequence-level
    advantage it equals GSPO exactly (value, clipping and gradient); with a per-token A it weights
    each token's own gradient by its own A (verl's "gspo" loss is this form)."""
    log_s = _sequence_log_ratio(logp, old_logp, mask).detach()
    s = (log_s + logp - logp.detach()).exp()  # [B, T]
    return clipped_surrogate(s, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c), {"rho": s}


def sapo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, **_: Tensor) -> tuple[Tensor, dict]:
    """SAPO (Gao et al. 2025, arXiv 2511.20347): a soft, temperature-controlled gate for the clip.

        loss_t = -A (4 / tau) sigmoid(tau (w_t - 1)),   tau = tau_pos if A > 0 else tau_neg

    d/dw = A 4 sigmoid (1 - sigmoid) = A at w = 1 (the policy gradient on-policy), decaying smoothly
    as w leaves 1 instead of dropping to 0 at a clip edge."""
    tau = torch.where(adv > 0, torch.full_like(adv, cfg.sapo_tau_pos), torch.full_like(adv, cfg.sapo_tau_neg))
    return -adv * torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau, {"rho": ratio}


def gmpo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor, mask: Tensor,
              **_: Tensor) -> tuple[Tensor, dict]:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673): the geometric mean of token ratios, clipped per
    token in log space, times the sequence advantage A_i (mean of A over the sequence):

        l_it = sgn(A_i) min(sgn(A_i) log w_it, sgn(A_i) clip(log w_it, -eps_low, eps_high))
        loss_i = -A_i exp((1/|y_i|) sum_t l_it)        (placed on every token of y_i)

    The paper's range is (e^-0.4, e^0.4): eps_low = eps_high = 0.4 (preset). Under seq-mean-token-mean
    (preset) the token losses average to verl's and TRL's per-sequence mean. With top_entropy_quantile
    the mean over t still runs over every token; the selection then zeroes the unselected tokens'
    copies of loss_i, so sequence i counts n_sel_i / |y_i| of loss_i (TRL's GMPOTrainer instead
    takes the mean over the selected tokens and counts loss_i fully; docs/objectives.md)."""
    a_seq = _masked_seq_mean(adv, mask)  # [B, 1] A_i
    sgn = torch.sign(a_seq)
    lr = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lr_min = sgn * torch.minimum(sgn * lr, sgn * lr.clamp(-cfg.eps_low, cfg.eps_high))
    geo = _masked_seq_mean(lr_min, mask).exp()  # [B, 1] clipped geometric-mean ratio
    # diagnostics: 1 + log w_t crosses 1 -/+ eps exactly where the log-space clip binds, so the
    # shared clip fractions count GMPO's own clipped tokens
    return (-a_seq * geo).expand_as(ratio), {"rho": 1.0 + lr.detach()}


def gpg_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor,
             **_: Tensor) -> tuple[Tensor, dict]:
    """GPG (Chu et al. 2025, arXiv 2504.02546): the plain policy gradient, no ratio, no clip.

        loss_t = -A log pi_theta(y_t)

    On-policy by construction: with several epochs nothing corrects for pi_theta != pi_old. This is
    GPG's loss only; the paper's advantage (group-mean-centred, no std, times a batch factor) is
    not an estimator here (docs/objectives.md). log pi = -inf: see `_floored_logp`."""
    return -adv * _floored_logp(logp, old_logp), {"rho": ratio}


def _dppo_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, logp: Tensor, old_logp: Tensor, div: str
               ) -> tuple[Tensor, dict]:
    """DPPO (Qi et al. 2026, arXiv 2602.04879): a binary trust-region mask on the divergence of the
    sampled token's Bernoulli (pi(y_t), 1 - pi(y_t)) from pi_old's, in place of the ratio clip.

        loss_t = -A sg(min(w_t, c)) log pi_theta(y_t) M_t
        TV:  M_t = [p - p_old <= delta_high] if A > 0 else [p - p_old >= -delta_low]
        KL:  D = p_old log(p_old / p) + (1 - p_old) log((1 - p_old) / (1 - p))
             M_t = [D <= delta_high or p <= p_old] if A > 0 else [D <= delta_low or p >= p_old]

    p = pi_theta(y_t), p_old = pi_old(y_t); a token is masked only when it has moved too far in
    its advantage's direction. Thresholds default to delta = 0.15 for TV and 0.05 for KL (presets):
    the values the paper recommends as quoted by TRL's experimental DPPO config (TRL releases after
    1.16; 1.16 has no DPPO) and set by verl's DPPO example recipe; c = 20 (verl's clip_ratio_c
    there). log pi = -inf: see `_floored_logp` (the mask still reads p = 0)."""
    p, p_old = logp.detach().exp(), old_logp.exp()
    pos = adv > 0
    if div == "tv":
        keep = torch.where(pos, p - p_old <= cfg.dppo_delta_high, p - p_old >= -cfg.dppo_delta_low)
    else:
        q, q_old = (1.0 - p).clamp(min=1e-12), (1.0 - p_old).clamp(min=1e-12)
        d = p_old * (old_logp - logp.detach()) + q_old * (q_old.log() - q.log())
        keep = torch.where(pos, (d <= cfg.dppo_delta_high) | (p <= p_old), (d <= cfg.dppo_delta_low) | (p >= p_old))
    weight = ratio.clamp(max=cfg.dppo_trunc).detach()
    loss = torch.where(keep, -adv * weight * _floored_logp(logp, old_logp), torch.zeros_like(logp))
    return loss, {"rho": ratio, "dppo_masked": ~keep}


def dppo_tv_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor,
                 **_: Tensor) -> tuple[Tensor, dict]:
    """DPPO-Binary-TV: see `_dppo_term` (M_t from |p - p_old|)."""
    return _dppo_term(cfg, ratio, adv, logp, old_logp, "tv")


def dppo_kl_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor,
                 **_: Tensor) -> tuple[Tensor, dict]:
    """DPPO-Binary-KL: see `_dppo_term` (M_t from the binary KL(pi_old || pi_theta) of y_t)."""
    return _dppo_term(cfg, ratio, adv, logp, old_logp, "kl")


def high_entropy_tokens(entropy: Tensor, mask: Tensor, q: float, *, per_sequence: bool,
                        strict: bool = False) -> Tensor:
    """Tokens whose entropy is at or above (strict: above) the q-quantile of the response tokens'
    entropies (linear interpolation, torch.quantile): per sequence (SimKO) or over the whole call
    (TRL's top_entropy_quantile: rho = 1 - q). Detached; [B, T] bool, False at pads and empty rows."""
    h = entropy.detach()
    nan = torch.full_like(h, math.nan)
    if per_sequence:
        thr = torch.nanquantile(torch.where(mask, h, nan), q, dim=-1, keepdim=True)  # [B, 1], NaN if empty
    else:
        vals = h[mask]  # host sync once per call: only when the selection is on
        if vals.numel() == 0:
            return torch.zeros_like(mask)
        thr = torch.quantile(vals, q)
    return mask & ((h > thr) if strict else (h >= thr))


def simko_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, mask: Tensor, entropy: Tensor,
               policy_topk_logp: Tensor, **_: Tensor) -> tuple[Tensor, dict]:
    """SimKO (Peng et al. 2025, arXiv 2510.14807), on the tokens I_t of high entropy
    (H_t above the simko_entropy_quantile tau of its sequence; every token if tau is None):

        A > 0 (correct):  gamma~_t = (1 - alpha I_t) w_t + (alpha I_t / K) sum_{k in TopK(pi_theta)} sg(w_t)
                                     pi_theta(k) / sg(pi_theta(k))
        A < 0 (wrong):    A~_t = lambda A if I_t and y_t = argmax pi_theta, else A
        loss_t = max(-A~ gamma~, -A~ clip(gamma~, 1 - eps_low, 1 + eps_high))

    gamma~ equals w_t in value (so the clip decision is GRPO's) but spreads alpha I_t of the correct
    token's gradient over the policy's own Top-K candidates: grad = w_t ((1 - alpha I_t) grad log pi(y_t)
    + (alpha I_t / K) sum_k grad log pi(k)). Defaults K = 3, alpha = 0.01, lambda = 1.1, tau = 0.8
    (the authors' scripts). policy_topk_logp: log pi_theta at its own Top-K ids [B, T, K] (K = simko_k,
    or fewer where the vocabulary is smaller, as in the toy's trees; more is refused), with grad, in any order; y_t is the top-1 where log pi(y_t) >= the largest of them."""
    h = entropy.detach()
    if cfg.simko_entropy_quantile is None:
        sel = mask
    else:
        sel = high_entropy_tokens(h, mask, cfg.simko_entropy_quantile, per_sequence=True, strict=True)
    alpha = cfg.simko_alpha * sel.to(ratio.dtype)  # [B, T] alpha I_t
    spread = (policy_topk_logp - policy_topk_logp.detach()).exp().mean(-1)  # [B, T] value 1, grad mean_k grad log pi(k)
    gamma = (1.0 - alpha) * ratio + alpha * ratio.detach() * spread
    top1 = logp.detach() >= policy_topk_logp.detach().amax(-1)  # the max, so the column order is free
    pos = adv > 0
    a_t = torch.where(~pos & sel & top1 & (adv < 0), cfg.simko_lambda * adv, adv)
    rho = torch.where(pos, gamma, ratio)
    loss = clipped_surrogate(rho, a_t, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    return loss, {"rho": rho, "simko_selected": sel, "simko_top1_penalised": ~pos & sel & top1 & (adv < 0)}


POLICY_TERMS: dict[str, PolicyTerm] = {
    "grpo": PolicyTerm(grpo_term),
    "dapo": PolicyTerm(grpo_term),
    "grpo_kl": PolicyTerm(grpo_term, defining_coef="kl_coef"),
    "kl_on_wrong": PolicyTerm(grpo_term, kl_scope="negative", defining_coef="kl_coef"),
    "apo": PolicyTerm(apo_term, needs_anchors=True, apo_ratio=True),
    "topk_kl_on_wrong": PolicyTerm(topk_kl_on_wrong_term, needs_anchors=True, defining_coef="topk_kl_coef",
                                   sign_gated_coef="topk_kl_coef"),
    "clip_cov": PolicyTerm(clip_cov_term, batch_coupled=True),
    "kl_cov": PolicyTerm(kl_cov_term, defining_coef="kl_cov_coef", batch_coupled=True),
    # peers shipped by TRL / verl, and SimKO (section above)
    "cispo": PolicyTerm(cispo_term),
    "gspo": PolicyTerm(gspo_term, sequence_level=True),
    "gspo_token": PolicyTerm(gspo_token_term, sequence_level=True),
    "sapo": PolicyTerm(sapo_term),
    "gmpo": PolicyTerm(gmpo_term, sequence_level=True),
    "gpg": PolicyTerm(gpg_term),
    "dppo_tv": PolicyTerm(dppo_tv_term),
    "dppo_kl": PolicyTerm(dppo_kl_term),
    "simko": PolicyTerm(simko_term, needs_entropy=True, needs_policy_topk=True),
}

# --------------------------------------------------------------------------------------------
# Controls (mechanism separation)
# --------------------------------------------------------------------------------------------
# Two losses that each keep one of APO's mechanisms and drop the other, so that a claims study can
# ask which mechanism an effect of APO comes from (docs/method.md section 4).


def _rectified_clip_silenced(cfg: LossConfig, rho: Tensor, neg: Tensor) -> Tensor:
    """Negative tokens where APO's rectified surrogate max(-A rho, -A clip(rho, ...)) is flat:
    rho < 1 - eps_low, or rho > clip_c under dual-clip (A < 0 only; the upper bound never binds)."""
    rho = rho.detach()
    cut = rho < 1.0 - cfg.eps_low
    if cfg.clip_c is not None:
        cut = cut | (rho > cfg.clip_c)
    return neg & cut


def apo_silence_term(
    cfg: LossConfig, ratio: Tensor, adv: Tensor, *, anchor_logp: Tensor, anchor_ref_logp: Tensor,
    anchor_is_sampled: Tensor, anchor_old_logp: Optional[Tensor] = None, **_: Tensor,
) -> tuple[Tensor, dict]:
    """Control "silence only": APO's push and APO's clip decision, without APO's pull.

        A >= 0:  GRPO.
        A < 0, rectified: loss = -A lambda w             where APO's r_APO = lambda w - beta r_anchor
                                                          lies in its clip window,
                          loss = -A lambda w (detached)  where APO's rectified clip silences the token
                                                          (r_APO < 1 - eps_low, or r_APO > clip_c).
        A < 0, push_only: loss = lambda max(-A w, -A clip(w, ...)) (+ dual-clip): APO minus its pull.

    r_anchor follows cfg.apo_anchor_norm exactly as in `apo_term`, so the silenced tokens are
    the very tokens APO silences at the same theta; their gradient is zero here as there. The pull
    -A beta r_anchor is absent everywhere: if this arm does what APO does, APO's effect is its
    silencing, not its support-coverage pull.
    """
    neg = adv < 0
    grpo_loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    if cfg.apo_clip == "push_only":
        push = cfg.apo_lambda * clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, None)
        if cfg.clip_c is not None:
            push = torch.minimum(push, -adv * cfg.clip_c)
        return torch.where(neg, push, grpo_loss), {"rho": ratio, "rho_dual": torch.where(neg, cfg.apo_lambda * ratio,
                                                                                           ratio)}
    in_set = _anchor_set(cfg, anchor_is_sampled)
    anc = anchor_ratio_reading(cfg.apo_anchor_norm, anchor_logp, anchor_ref_logp, anchor_old_logp, in_set)
    r_anchor = anc["r_anchor"].detach()  # only decides which tokens are silenced
    rho_apo = cfg.apo_lambda * ratio.detach() - cfg.apo_beta * r_anchor
    silenced = _rectified_clip_silenced(cfg, rho_apo, neg)
    push = -adv * cfg.apo_lambda * torch.where(silenced, ratio.detach(), ratio)
    # APO's diagnostics with rho = APO's r_APO on A < 0 (so apo/neg_clipped_frac is the silenced
    # share) and zero anchor parts (so apo/pull and apo/pull_force_share are 0: there is no pull)
    zero = torch.zeros_like(r_anchor)
    aux = {"rho": torch.where(neg, rho_apo, ratio), "r_anchor": r_anchor, "z_ref": anc["z_ref"], "pull": zero,
           "anchor_parts": torch.zeros_like(anc["parts"]), "anchor_pi": anc["pi_s"],
           "pull_capped": torch.zeros_like(neg), "manifold": anc["p"].sum(-1)}
    return torch.where(neg, push, grpo_loss), aux


def apo_antisharp_term(cfg: LossConfig, ratio: Tensor, adv: Tensor, *, logp: Tensor, old_logp: Tensor,
                       **_: Tensor) -> tuple[Tensor, dict]:
    """Control "anti-sharpening without support": APO's rectified ratio with the pull aimed at every
    non-sampled token instead of the reference Top-K.

        r_anti = (1 - pi_theta(y_t)) / (1 - pi_old(y_t))     (1 at theta_old; 0 if pi_old(y_t) = 1)
        A >= 0:  GRPO.
        A < 0, rectified: loss = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)),
                          rho = lambda w - beta r_anti                          (+ dual-clip)
        A < 0, push_only: loss = lambda max(-A w, -A clip(w, ...)) + A beta min(r_anti, cap)

    The mass on all non-sampled tokens, 1 - pi_theta(y_t), is exact from the sampled token's
    log-probability alone (computed as -expm1(log pi)), and normalised by its behaviour-policy
    value as APO's "old_mass" reading normalises M_S: at theta_old the pull is
    beta |A| grad log(1 - pi(y_t)), the old_mass reading's beta |A| grad log M_S with S replaced by
    "everything but y_t". The other readings are not computable from these inputs (1 - pi_ref(y_t)
    and the per-token old ratios need the full vocabulary), so apo_anchor_norm is ignored.
    Since grad (1 - pi(y)) = -grad pi(y), this pull is an extra push on y_t whose freed mass goes
    to the other tokens in proportion to pi (no support information): if this arm does what APO
    does, APO's effect is generic anti-sharpening, not support coverage.
    """
    neg = adv < 0
    rest = -torch.expm1(logp.clamp(max=0.0))  # [B, T] 1 - pi_theta(y_t), exact near pi -> 1
    rest_old = -torch.expm1(old_logp.detach().clamp(max=0.0))
    r_anti = _safe_div(rest, rest_old)
    grpo_loss = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
    if cfg.apo_clip == "rectified":
        rho = cfg.apo_lambda * ratio - cfg.apo_beta * r_anti
        neg_loss = clipped_surrogate(rho, adv, cfg.eps_low, cfg.eps_high, cfg.clip_c)
        aux_rho = torch.where(neg, rho, ratio)
    else:
        cap = cfg.pull_cap
        push = cfg.apo_lambda * clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, None)
        if cfg.clip_c is not None:
            push = torch.minimum(push, -adv * cfg.clip_c)
        neg_loss = push + adv * cfg.apo_beta * (r_anti if math.isinf(cap) else r_anti.clamp(max=cap))
        aux_rho = ratio
    aux = {"rho": aux_rho}
    if cfg.apo_clip == "push_only":
        aux["rho_dual"] = torch.where(neg, cfg.apo_lambda * ratio, ratio)  # the dual cap binds on lambda w
    return torch.where(neg, neg_loss, grpo_loss), aux


POLICY_TERMS.update({
    "apo_silence": PolicyTerm(apo_silence_term, needs_anchors=True, apo_ratio=True),
    "apo_antisharp": PolicyTerm(apo_antisharp_term),
})

# Field defaults that depend on the loss name; "_defaults" fills what a preset leaves open.
LOSS_PRESETS: dict[str, dict] = {
    # dppo_delta_*: the TV value for every name; only dppo_tv / dppo_kl read them
    "_defaults": {"eps_low": 0.2, "eps_high": 0.2, "cov_frac": 2e-4, "loss_agg": "token-mean",
                  "dppo_delta_low": 0.15, "dppo_delta_high": 0.15},
    "dapo": {"eps_low": 0.2, "eps_high": 0.28},
    "kl_cov": {"cov_frac": 2e-3},
    # sequence-level objectives: their papers (and verl, TRL) average per sequence, so the default
    # aggregation is the per-sequence mean, not the length-weighted token-mean
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"},  # the GSPO paper's clip
    "gspo_token": {"eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
    "gmpo": {"eps_low": 0.4, "eps_high": 0.4,  # log-space range (e^-0.4, e^0.4), the GMPO paper's
             "loss_agg": "seq-mean-token-mean"},
    "sapo": {"loss_agg": "seq-mean-token-mean"},  # TRL's sapo and verl's sapo: per-sequence mean
    # DPPO's recommended budgets: 0.15 for the binary TV, 0.05 for the binary KL (docs/objectives.md)
    "dppo_tv": {"dppo_delta_low": 0.15, "dppo_delta_high": 0.15},
    "dppo_kl": {"dppo_delta_low": 0.05, "dppo_delta_high": 0.05},
}


def register_policy_term(name: str, term: PolicyTerm, preset: Optional[dict] = None) -> None:
    """Add an objective to the registry (for experiments; the shipped ones are above)."""
    if name in POLICY_TERMS or name.startswith("_"):
        raise ValueError(f"register_policy_term: name {name!r} is taken or reserved")
    POLICY_TERMS[name] = term
    if preset:
        LOSS_PRESETS[name] = dict(preset)


# --------------------------------------------------------------------------------------------
# KL estimators (docs/theory.md section 6)
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
    w_i are per-sequence weights (default 1); the simulator's exact mode passes, per row, the old
    policy's probability of the responses that row stands for.
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
    anchor_old_logp: Optional[Tensor] = None,
    policy_topk_logp: Optional[Tensor] = None,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    diagnostics: bool = True,
    sync_metrics: bool = True,
) -> tuple[Tensor, dict[str, float] | dict[str, Tensor]]:
    """Scalar loss to minimise, and float diagnostics (0-d detached tensors with sync_metrics=False,
    so a trainer can turn the diagnostics of many calls into floats with one host sync: see
    `metrics_to_floats`).

    Per token: loss_t = policy_term_t [+ kl_coef * kl_t on the term's KL scope] [- ent_coef * H_t],
    then `aggregate`. Tensors: logp, old_logp, mask, ref_logp, kl_full, entropy [B, T];
    advantages [B] or [B, T]; anchor_* [B, T, K] (anchor_old_logp: log pi_old at the anchors, for
    apo_anchor_norm old_mass / old_token); policy_topk_logp [B, T, K <= simko_k] (log pi_theta at its own
    Top-K ids, any order, with grad: SimKO); weights [B]. `global_tokens` / `global_seqs` are the
    counts of the whole batch when this call sees one micro-batch of it. `generator` drives the
    random token choice of clip_cov. `required_inputs(cfg)` lists the optional tensors needed.
    `diagnostics=False` returns only {"loss"} (same loss and gradient): the diagnostics cost about
    as much as the loss on the simulator's large exact batches, and steps nobody logs need none.
    """
    cfg.validate()
    inputs = _check_inputs(cfg, logp, old_logp, advantages, mask, ref_logp, anchor_logp,
                           anchor_ref_logp, anchor_is_sampled, kl_full, entropy, weights, anchor_old_logp,
                           policy_topk_logp)
    mask_b = inputs["mask"]
    adv = inputs["advantages"]
    log_ratio = (inputs["logp"] - inputs["old_logp"]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()  # [B, T] w_t

    term = POLICY_TERMS[cfg.name]
    anchors = {k: inputs[k] for k in ("anchor_logp", "anchor_ref_logp", "anchor_is_sampled", "anchor_old_logp",
                                      "entropy", "policy_topk_logp") if k in inputs}
    loss_tok, aux = term.fn(cfg, ratio, adv, logp=inputs["logp"], old_logp=inputs["old_logp"], mask=mask_b,
                            generator=generator, **anchors)
    sel = None
    if cfg.top_entropy_quantile < 1.0:  # the one place tokens are selected by entropy, for any term
        sel = high_entropy_tokens(inputs["entropy"], mask_b, 1.0 - cfg.top_entropy_quantile, per_sequence=False)
        loss_tok = torch.where(sel, loss_tok, torch.zeros_like(loss_tok))
        aux["entropy_selected"] = sel
    pg_tok = loss_tok

    kl_tok = None
    if cfg.kl_coef > 0.0:
        kl_tok = kl_estimate(cfg.kl_estimator, inputs["logp"], inputs.get("ref_logp"), inputs.get("kl_full"))
        scope = (adv < 0) if term.kl_scope == "negative" else torch.ones_like(mask_b)
        loss_tok = loss_tok + cfg.kl_coef * kl_tok * scope
    if cfg.ent_coef > 0.0:  # on the selected tokens only, as TRL does
        bonus = cfg.ent_coef * inputs["entropy"]
        loss_tok = loss_tok - (bonus if sel is None else torch.where(sel, bonus, torch.zeros_like(bonus)))

    agg = dict(weights=inputs.get("weights"), global_tokens=global_tokens, global_seqs=global_seqs,
               loss_norm_len=cfg.loss_norm_len)
    loss = aggregate(loss_tok, mask_b, cfg.loss_agg, **agg)
    if not diagnostics:
        return loss, {"loss": float(loss.detach()) if sync_metrics else loss.detach()}
    with torch.no_grad():
        metrics = _diagnostics(cfg, mask_b, adv, ratio, aux, inputs, kl_tok)
        metrics["pg_loss"] = aggregate(pg_tok, mask_b, cfg.loss_agg, **agg)
        metrics["loss"] = loss
    if not sync_metrics:
        return loss, {k: v.detach().reshape(()) for k, v in metrics.items()}
    return loss, metrics_to_floats(metrics)


def metrics_to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """All diagnostics to Python floats with ONE host sync (one .tolist(), not one float() each).

    Stacked in float64 if any entry is float64, else float32 (exact for bf16/fp16 values and for
    token counts below 2^24)."""
    vals = [v.detach().reshape(()) for v in metrics.values()]
    dt = torch.float64 if any(v.dtype == torch.float64 for v in vals) else torch.float32
    return dict(zip(metrics, torch.stack([v.to(dt) for v in vals]).tolist()))


def _diagnostics(cfg: LossConfig, mask: Tensor, adv: Tensor, ratio: Tensor, aux: dict,
                 inputs: dict, kl_tok: Optional[Tensor]) -> dict[str, Tensor]:
    """Clip fractions split by advantage sign (TRL/verl names) and the APO diagnostics.

    Every entry is an average over response tokens. With per-sequence `weights` (the simulator's
    exact mode passes, per row, the old policy's probability mass of the responses that row
    stands for) tokens count with |w_i|, so fractions are shares of probability mass rather than
    counts of rows. `clip_grad_frac/neg` counts gradient, not tokens: the push of a negative token
    has logit-space L1 norm |A| w 2 (1 - pi(y_t)) (times lambda for APO), tiny where pi(y_t) ~ 1.
    Entries stay 0-d tensors (no host sync here); an empty selection gives 0.
    """
    w = inputs.get("weights")
    tok_w = mask.to(ratio.dtype) * (1.0 if w is None else w.abs()[:, None])  # [B, T]

    def total(x: Tensor, sel: Tensor) -> Tensor:  # weighted sum of x over the selected tokens
        return (torch.where(sel, x.to(ratio.dtype), torch.zeros_like(ratio)) * tok_w).sum()

    def share(part: Tensor, whole: Tensor, sel: Tensor) -> Tensor:  # sum part / sum whole, 0 if empty
        return _safe_div(total(part, sel), total(whole, sel))

    def mean(x: Tensor, sel: Tensor) -> Tensor:  # weighted mean of x over the selected tokens
        return share(x, torch.ones_like(ratio), sel)

    rho = aux["rho"]
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    low = neg & (rho < 1.0 - cfg.eps_low)  # flat for A < 0: the push is cut
    high = pos & (rho > 1.0 + cfg.eps_high)  # flat for A > 0
    rho_dual = aux.get("rho_dual", rho)  # what the dual-clip cap compares with c
    dual = neg & ~low & (rho_dual > cfg.clip_c) if cfg.clip_c is not None else torch.zeros_like(mask)
    clipped = low | dual
    push_l1 = 2.0 * adv.abs() * ratio * (1.0 - inputs["logp"].detach().exp())  # [B, T] per unit of lambda
    out = {
        "num_tokens": mask.sum(),
        "ratio/mean": mean(ratio, mask),
        "clip_ratio/low_mean": mean(low, mask),
        "clip_ratio/high_mean": mean(high, mask),
        "clip_ratio/dual_mean": mean(dual, mask),
        "clip_ratio/region_mean": mean(low | high | dual, mask),
        "clip_frac/pos": mean(high, pos),
        "clip_frac/neg": mean(clipped, neg),
        "clip_grad_frac/neg": share(push_l1 * clipped, push_l1, neg),
        "frac_neg_tokens": mean(neg, mask),
    }
    if kl_tok is not None:
        out["kl"] = mean(kl_tok, mask)
    if "entropy" in inputs:
        out["entropy"] = mean(inputs["entropy"], mask)
    if "topk_ce" in aux:
        out["topk_kl/ce_neg"] = mean(aux["topk_ce"], neg)
    if "cov_selected" in aux:
        out["cov/selected_frac"] = mean(aux["cov_selected"], mask)
    if "simko_selected" in aux:
        out["simko/selected_frac"] = mean(aux["simko_selected"], mask)
        out["simko/top1_penalised_frac"] = mean(aux["simko_top1_penalised"], neg)
    if "dppo_masked" in aux:
        out["dppo/masked_frac"] = mean(aux["dppo_masked"], mask)
    if "entropy_selected" in aux:
        out["entropy_select/frac"] = mean(aux["entropy_selected"], mask)
    if "r_anchor" in aux:
        out.update(_apo_diagnostics(cfg, aux, inputs, adv, mask, neg, clipped, push_l1, mean, share, tok_w))
    return out


def _apo_diagnostics(cfg, aux, inputs, adv, mask, neg, clipped, push_l1, mean, share, tok_w) -> dict[str, Tensor]:
    """APO's anchor statistics and the pull's share of the negative tokens' logit force.

    Logit-space L1 norms per token (docs/theory.md section 7): push lambda |A| w 2 (1 - pi(y_t));
    pull beta |A| F with F = |grad_z r_anchor|_1 = sum_{k in S} |c_k - pi_k r| + r (1 - M_S),
    r_anchor = sum_S c_k (parts of `anchor_ratio_reading`); for "ref" F = 2 M_S (1 - M_S) / Z_ref.
    Each counts only where it is not clipped (rectified: both go together; push_only: the push
    by its clip, the pull by its cap). The log-ratio clamp of old_token is ignored here.
    """
    parts, pi_s = aux["anchor_parts"], aux["anchor_pi"]  # [B, T, K]
    r = parts.sum(-1)
    unit = (parts - pi_s * r[..., None]).abs().sum(-1) + r * (1.0 - pi_s.sum(-1))  # [B, T] F
    push_f = cfg.apo_lambda * push_l1 * ~clipped
    pull_cut = clipped if cfg.apo_clip == "rectified" else aux["pull_capped"]
    pull_f = cfg.apo_beta * adv.abs() * unit * ~pull_cut
    sampled_in_topk = inputs["anchor_is_sampled"].any(-1)
    return {
        "apo/r_anchor_mean": mean(aux["r_anchor"], neg),
        "apo/r_anchor_median": _weighted_median(aux["r_anchor"], tok_w, neg),
        "apo/pull": mean(aux["pull"], neg),
        "apo/z_ref_mean": mean(aux["z_ref"], mask),
        "apo/neg_clipped_frac": mean(clipped, neg),
        "apo/neg_clipped_grad_frac": share(push_l1 * clipped, push_l1, neg),
        "apo/pull_force_share": share(pull_f, push_f + pull_f, neg),
        "apo/pull_capped_frac": mean(aux["pull_capped"], neg),
        "apo/manifold_mass": mean(aux["manifold"], mask),
        "apo/outside_topk_frac": mean(~sampled_in_topk, mask),
    }


def _weighted_median(x: Tensor, tok_w: Tensor, sel: Tensor) -> Tensor:
    """Lower weighted median: the smallest selected x_i whose cumulative weight (x sorted) reaches
    half the total; 0 if nothing is selected. No boolean indexing, so no host sync."""
    if x.numel() == 0:
        return x.new_zeros(())
    vals, order = torch.where(sel, x.detach(), math.inf).flatten().sort()  # unselected last, weight 0
    cum = (tok_w * sel).flatten()[order].cumsum(0)
    i = torch.searchsorted(cum, 0.5 * cum[-1:]).clamp(max=vals.numel() - 1)
    return torch.where(cum[-1] > 0, vals[i][0], torch.zeros_like(cum[-1]))


def _check_inputs(cfg: LossConfig, logp, old_logp, advantages, mask, ref_logp, anchor_logp,
                  anchor_ref_logp, anchor_is_sampled, kl_full, entropy, weights, anchor_old_logp=None,
                  policy_topk_logp=None) -> dict[str, Tensor]:
    """Validate shapes and presence; zero out pad positions; raise ValueError naming the argument."""
    if not isinstance(logp, Tensor) or logp.dim() != 2:
        raise ValueError(f"logp: expected a [B, T] tensor, got {_shape(logp)}")
    bt = tuple(logp.shape)
    need = required_inputs(cfg)
    given = dict(old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, anchor_logp=anchor_logp,
                 anchor_ref_logp=anchor_ref_logp, anchor_is_sampled=anchor_is_sampled, kl_full=kl_full,
                 entropy=entropy, weights=weights, anchor_old_logp=anchor_old_logp,
                 policy_topk_logp=policy_topk_logp)
    for name in OPTIONAL_INPUTS:
        if name in need and given[name] is None:
            raise ValueError(f"{name}: required by LossConfig(name={cfg.name!r}, kl_coef={cfg.kl_coef}, "
                             f"kl_estimator={cfg.kl_estimator!r}, ent_coef={cfg.ent_coef}, "
                             f"apo_anchor_norm={cfg.apo_anchor_norm!r}) but is None")
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
    anchor_names = [n for n in ("anchor_ref_logp", "anchor_is_sampled", "anchor_old_logp") if n in need]
    if cfg.needs_anchors:
        k_shape = tuple(anchor_logp.shape) if isinstance(anchor_logp, Tensor) else None
        if k_shape is None or len(k_shape) != 3 or k_shape[:2] != bt or k_shape[2] < 1:
            raise ValueError(f"anchor_logp: expected shape [B, T, K]=[{bt[0]}, {bt[1]}, K>=1], got {_shape(anchor_logp)}")
        for name in anchor_names:
            x = given[name]
            if not isinstance(x, Tensor) or tuple(x.shape) != k_shape:
                raise ValueError(f"{name}: expected shape {list(k_shape)} (as anchor_logp), got {_shape(x)}")

    if cfg.needs_policy_topk:
        x = policy_topk_logp
        if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != bt or x.shape[2] < 1:
            raise ValueError(f"policy_topk_logp: expected shape [B, T, K]=[{bt[0]}, {bt[1]}, K>=1], got {_shape(x)}")
        if x.shape[2] > cfg.simko_k:  # the mean runs over the config's K; fewer only from a smaller vocabulary
            raise ValueError(f"policy_topk_logp: expected K = simko_k = {cfg.simko_k} candidates (fewer only when "
                             f"the vocabulary is smaller), got K = {x.shape[2]}")

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
        for name in ["anchor_logp"] + [n for n in anchor_names if n != "anchor_is_sampled"]:
            out[name] = _clean(name, given[name], mk, allow_inf=True, fill=-math.inf, all_on=all_on)
        out["anchor_is_sampled"] = anchor_is_sampled.bool()
    if cfg.needs_policy_topk:  # finite on response positions: the policy's most likely tokens
        out["policy_topk_logp"] = _clean("policy_topk_logp", policy_topk_logp, m[..., None].expand_as(policy_topk_logp),
                                         allow_inf=False, all_on=all_on)
    if weights is not None:
        if not torch.isfinite(weights.sum()) and not torch.isfinite(weights).all():  # sum: see _clean
            raise ValueError("weights: contains NaN or inf")
        out["weights"] = weights
    return out


def _clean(name: str, x: Tensor, m: Tensor, *, allow_inf: bool, fill: float = 0.0, all_on: bool = False) -> Tensor:
    """Report NaN (and inf where not meaningful) on response positions; blank pad positions.

    Fast path: one sum. A NaN anywhere makes the sum NaN and an inf makes it inf or NaN, so a
    finite sum (a non-NaN one where inf is allowed) proves x clean without the elementwise
    isnan/isfinite pass and its bool tensor (~20x dearer on the simulator's exact batches).
    A sum that overflows or meets inf - inf only falls back to the elementwise check.
    """
    s = x.sum()
    if not bool(torch.isnan(s) if allow_inf else ~torch.isfinite(s)):
        return x if all_on else torch.where(m, x, torch.full_like(x, fill))
    bad = torch.isnan(x) if allow_inf else ~torch.isfinite(x)
    n_bad = int((bad & m).sum())  # pad positions may hold anything: they are blanked below
    if n_bad:
        raise ValueError(f"{name}: {n_bad} response position(s) hold {'NaN' if allow_inf else 'NaN or inf'}")
    return torch.where(m, x, torch.full_like(x, fill))


def _shape(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


# --------------------------------------------------------------------------------------------
# Advantage estimators (docs/objectives.md; groups are consecutive blocks of G rewards)
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
    """c_r(p, G) = E[A_i | r_i = r] for a prompt with success probability p (docs/theory.md section 4).

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
