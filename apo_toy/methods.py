"""Named training methods: a LossConfig + an advantage estimator + optimizer settings.

Every method except `npg` is trained through `apo_llm.objectives.policy_loss`, the function the
LLM trainer uses. `npg` (natural policy gradient, dz_{s,a} = lr (Q(s,a) - V(s))) is a
NON-TRAINABLE YARDSTICK computed directly from the tree; it is not a loss of the project.

Build variants for sweeps with `get_method("grpo_kl", kl_coef=0.1)` or `method.variant(...)`:
LossConfig fields go to the loss, advantage-estimator settings (estimator, k, lambda_pos, ...) to
`group_advantages`, `lr` / `lr_scale` / `optimizer` to the optimizer, the rest is rejected.

A rectified APO arm whose negative tokens all start outside the clip window
(`LossConfig.is_positive_only`) is positive-only learning: `report_label` marks it so, and it is
never reported as APO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from apo_llm.objectives import LossConfig

OPTIMIZERS = ("sgd", "adam")
_LOSS_FIELDS = {f.name for f in dataclasses.fields(LossConfig)}


@dataclass(frozen=True)
class Method:
    """One arm of an experiment."""

    name: str = field(metadata={"help": "label used in tables and figures"})
    loss: dict = field(default_factory=dict, metadata={"help": "LossConfig fields"})
    adv: dict = field(default_factory=lambda: {"estimator": "grpo"}, metadata={"help": "group_advantages kwargs"})
    lr: Optional[float] = field(default=None, metadata={"help": "learning rate; None = the run's lr"})
    lr_scale: float = field(default=1.0, metadata={"help": "multiplies the learning rate (GRPO at a lower lr: the null)"})
    optimizer: Optional[str] = field(default=None, metadata={"help": "sgd | adam; None = the run's optimizer"})
    yardstick: bool = field(default=False, metadata={"help": "True: natural PG, computed directly (not a loss)"})
    help: str = ""

    def loss_config(self) -> LossConfig:
        return LossConfig(**self.loss)

    def variant(self, name: Optional[str] = None, **kw) -> "Method":
        """A copy with LossConfig fields / advantage kwargs / lr / optimizer overridden."""
        loss, adv, top = dict(self.loss), dict(self.adv), {}
        for key, value in kw.items():
            if key in ("lr", "optimizer", "lr_scale"):
                top[key] = value
            elif key in _LOSS_FIELDS:
                loss[key] = value
            elif key in ("estimator", "std", "lambda_pos", "k", "eps"):
                adv[key] = value
            else:
                raise ValueError(f"method {self.name!r}: unknown setting {key!r}")
        label = name or self.name + "".join(f"[{k}={v}]" for k, v in kw.items())
        m = dataclasses.replace(self, name=label, loss=loss, adv=adv, **top)
        if not m.yardstick:
            m.loss_config()  # validate now, errors name the field
        if not m.lr_scale > 0:
            raise ValueError(f"method {m.name!r}: lr_scale={m.lr_scale!r} must be > 0")
        if m.optimizer is not None and m.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {m.optimizer!r} not in {OPTIMIZERS}")
        return m


KL_COEF = 0.05  # default KL strength of the KL baselines (tradeoff preset sweeps it)

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("grpo", {"name": "grpo"}, help="GRPO: PPO clip 0.2, group-normalised advantages"),
        Method("dr_grpo", {"name": "grpo", "loss_agg": "seq-mean-token-sum-norm"}, {"estimator": "dr_grpo"},
               help="Dr. GRPO: r - mean, constant normaliser"),
        Method("dapo", {"name": "dapo"}, help="DAPO clip-higher (0.2/0.28), token-mean; no dynamic sampling"),
        Method("w_reinforce", {"name": "grpo"}, {"estimator": "w_reinforce", "lambda_pos": 0.1},
               help="W-REINFORCE: +0.1 on correct, -1 on wrong"),
        Method("grpo_kl", {"name": "grpo_kl", "kl_coef": KL_COEF, "kl_estimator": "k3"},
               help="GRPO + k3 KL in the loss (in expectation a forward-KL pull)"),
        Method("grpo_kl_full", {"name": "grpo_kl", "kl_coef": KL_COEF, "kl_estimator": "full"},
               help="GRPO + exact reverse KL(pi || pi_ref) per visited node"),
        Method("kl_on_wrong", {"name": "kl_on_wrong", "kl_coef": KL_COEF, "kl_estimator": "k3"},
               help="GRPO + k3 KL only on negative-advantage tokens"),
        Method("apo", {"name": "apo", "apo_clip": "rectified"},
               help="APO, rectified ratio lambda w - beta r_anchor clipped as a whole"),
        Method("apo_push_only", {"name": "apo", "apo_clip": "push_only"},
               help="APO, clip the push only, pull unclipped"),
        Method("apo_inclusive", {"name": "apo", "apo_anchoring": "inclusive"},
               help="APO with S = TopK (sampled token kept in the anchor set): ablation"),
        Method("apo_old_mass", {"name": "apo", "apo_clip": "rectified", "apo_anchor_norm": "old_mass"},
               help="APO reading C: r_anchor = M_S(theta) / M_S(theta_old) (1 at the start of each update)"),
        Method("apo_old_token", {"name": "apo", "apo_clip": "rectified", "apo_anchor_norm": "old_token"},
               help="APO reading H: r_anchor = sum_S (pi_ref/Z_ref) pi_theta/pi_old"),
        Method("apo_silence", {"name": "apo_silence"},
               help="control: APO's push on exactly the tokens APO's clip leaves active, no pull (reading A)"),
        Method("apo_silence_old_mass", {"name": "apo_silence", "apo_anchor_norm": "old_mass"},
               help="control: silence only, silenced tokens as APO reading C"),
        Method("apo_antisharp", {"name": "apo_antisharp"},
               help="control: APO's rectified pull towards all non-sampled tokens, r = (1-pi(y))/(1-pi_old(y))"),
        Method("entropy", {"name": "grpo", "ent_coef": 0.01}, help="GRPO + entropy bonus 0.01"),
        Method("grpo_low_lr", {"name": "grpo"}, lr_scale=0.5,
               help="GRPO at half the learning rate: the null a regulariser must beat (as GRPO early-stopped)"),
        Method("psr", {"name": "grpo"}, {"estimator": "psr"},
               help="PSR: positive-only learning, A = r (reinforce on correct responses only)"),
        Method("nsr", {"name": "grpo"}, {"estimator": "nsr"},
               help="NSR: negative-only learning, A = r - 1 (push down wrong responses only)"),
        Method("passk", {"name": "grpo"}, {"estimator": "passk", "k": 4},
               help="Pass@k training advantage (k = 4 of G = 8)"),
        Method("topk_kl_on_wrong", {"name": "topk_kl_on_wrong", "topk_kl_coef": 0.05},
               help="GRPO + forward KL to pi_ref renormalised on S, wrong responses only (shape vs support control)"),
        Method("clip_cov", {"name": "clip_cov"}, help="Clip-Cov (Cui et al. 2025); sampled mode only"),
        Method("kl_cov", {"name": "kl_cov"}, help="KL-Cov (Cui et al. 2025); sampled mode only"),
        # peers shipped by TRL / verl, and SimKO (apo_llm/objectives.py). Exact mode: per-token terms
        # on the edge path, the sequence-coupled ones (GSPO, GMPO, SimKO's quantile) on the leaf path.
        # The aggregation is set here, not left to LOSS_PRESETS (every toy response has length D,
        # so token-mean and seq-mean-token-mean give the same loss anyway)
        Method("cispo", {"name": "cispo", "loss_agg": "token-mean"}, help="CISPO: sg(min(w, 5)) A log pi on every token; exact and sampled"),
        Method("gspo", {"name": "gspo", "loss_agg": "seq-mean-token-mean"},
               help="GSPO: sequence-level length-normalised ratio, clip 3e-4/4e-4; exact (leaf path) and sampled"),
        Method("gspo_token", {"name": "gspo_token", "loss_agg": "seq-mean-token-mean"},
               help="GSPO-token: sg(s_i) pi/sg(pi), = GSPO for sequence advantages; exact (leaf path) and sampled"),
        Method("sapo", {"name": "sapo", "loss_agg": "seq-mean-token-mean"},
               help="SAPO: soft gate (4/tau) sigmoid(tau (w - 1)) for the clip; exact and sampled"),
        Method("gmpo", {"name": "gmpo", "loss_agg": "seq-mean-token-mean"},
               help="GMPO: geometric mean of token ratios, log-space clip 0.4; exact (leaf path) and sampled"),
        Method("gpg", {"name": "gpg"}, help="GPG: -A log pi, no ratio or clip; exact and sampled"),
        Method("dppo_tv", {"name": "dppo_tv"}, help="DPPO-Binary-TV: trust-region mask |p - p_old| <= 0.15; exact and sampled"),
        Method("dppo_kl", {"name": "dppo_kl"}, help="DPPO-Binary-KL: mask on the binary KL <= 0.05; exact and sampled"),
        Method("simko", {"name": "simko", "loss_agg": "token-mean"},
               help="SimKO: Top-3 boost on correct, 1.1x on wrong top-1, top-20% entropy per sequence; exact (leaf path) and sampled"),
        Method("simko_token", {"name": "simko", "simko_entropy_quantile": None},
               help="SimKO on every token (no entropy quantile): a per-token term, so exact mode runs it"),
        Method("npg", {}, {"estimator": "grpo"}, yardstick=True,
               help="natural PG yardstick dz = lr (Q - V); not a loss, not trainable at LLM scale"),
    ]
}


def report_label(method: Method) -> str:
    """The name to report: a positive-only rectified arm is marked as such, never shown as plain APO."""
    if not method.yardstick and method.loss_config().is_positive_only:
        return f"{method.name} (positive-only, not APO)"
    return method.name


def get_method(spec: Union[str, Method], **overrides) -> Method:
    """Method by name (ValueError naming it if unknown), optionally with overrides."""
    if isinstance(spec, Method):
        return spec.variant(**overrides) if overrides else spec
    if spec not in METHODS:
        raise ValueError(f"method: unknown {spec!r}; choose from {sorted(METHODS)}")
    return METHODS[spec].variant(**overrides) if overrides else METHODS[spec]
