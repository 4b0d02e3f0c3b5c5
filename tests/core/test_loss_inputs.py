"""Bad input to the loss module is a ValueError that names the argument or field; NaN on response
positions is reported, NaN on padded positions changes nothing; metrics are plain floats; importing
the loss module pulls in no heavy library."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm.objectives import OPTIONAL_INPUTS, LossConfig, POLICY_TERMS, group_advantages, policy_loss, required_inputs

F64 = torch.float64
B, T, K = 3, 4, 2


def _names(field: str) -> str:
    """Regex: the message names `field` as a word (LossConfig.<field> or <field>:)."""
    return rf"(^|\.|\b){field}\b"


# --------------------------------------------------------------------------------------------
# LossConfig
# --------------------------------------------------------------------------------------------


BAD_CONFIGS = [
    ("name", "ppo"), ("eps_low", 0.0), ("eps_low", 1.0), ("eps_low", -0.1), ("eps_high", 1.5),
    ("eps_high", 0.0), ("clip_c", 1.0), ("clip_c", 0.5), ("kl_coef", -0.1), ("kl_coef", math.nan),
    ("kl_estimator", "k4"), ("ent_coef", -1.0), ("ent_coef", math.inf), ("apo_lambda", 0.0),
    ("apo_lambda", -1.05), ("apo_lambda", math.inf), ("apo_beta", -0.1), ("apo_beta", math.nan),
    ("apo_k", 0), ("apo_k", 1.5), ("apo_k", True), ("apo_clip", "both"), ("apo_anchoring", "none"),
    ("loss_agg", "seq-mean"), ("loss_norm_len", 0), ("loss_norm_len", True),
    ("loss_norm_len", 2.5), ("loss_norm_len", math.inf), ("loss_norm_len", math.nan), ("loss_norm_len", "8"),
    ("apo_anchor_norm", "old"), ("apo_anchor_norm", None), ("apo_pull_cap", 0.0), ("apo_pull_cap", -1.0),
    ("apo_pull_cap", math.nan), ("apo_pull_cap", "1.2"), ("topk_kl_coef", -0.1), ("topk_kl_coef", math.inf),
    ("cov_frac", 0.0), ("cov_frac", 1.5), ("cov_frac", math.nan), ("cov_lb", math.nan), ("cov_ub", 0.5),
    ("cov_ub", math.inf), ("kl_cov_coef", -1.0), ("eps_low", True),
    ("cispo_eps_max", 0.0), ("cispo_eps_max", math.inf), ("sapo_tau_pos", 0.0), ("sapo_tau_neg", -1.0),
    ("simko_k", 0), ("simko_k", 2.5), ("simko_alpha", 1.5), ("simko_alpha", -0.1), ("simko_lambda", 0.0),
    ("simko_entropy_quantile", 1.0), ("simko_entropy_quantile", -0.1), ("top_entropy_quantile", -0.1),
    ("top_entropy_quantile", 1.5), ("top_entropy_quantile", math.nan), ("dppo_delta_low", 0.0),
    ("dppo_delta_high", math.inf), ("dppo_trunc", -1.0),
]


@pytest.mark.parametrize("field, value", BAD_CONFIGS)
def test_bad_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field}\b"):
        LossConfig(name="apo", **{field: value}) if field != "name" else LossConfig(name=value)


@pytest.mark.parametrize("field, value", [f for f in BAD_CONFIGS if f[0] != "name"])
def test_config_mutated_after_construction_is_rejected_by_policy_loss(field, value):
    """policy_loss re-validates: a field edited after construction is caught at the call."""
    cfg = LossConfig(name="apo")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"LossConfig\.{field}\b"):
        policy_loss(cfg, **_inputs())


def test_kl_losses_without_kl_coef_warn():
    for name in ("grpo_kl", "kl_on_wrong"):
        with pytest.warns(UserWarning, match="kl_coef"):
            LossConfig(name=name)


def test_positive_only_rectified_arm_warns_and_validate_says_so():
    """lambda - beta < 1 - eps_low with the rectified clip: every negative token starts flat."""
    with pytest.warns(UserWarning, match="positive-only learning, not APO"):
        cfg = LossConfig(name="apo", apo_beta=0.3)  # 1.05 - 0.3 = 0.75 < 0.8
    assert cfg.is_positive_only and any("positive-only" in n for n in cfg.validate())
    for ok in (LossConfig(name="apo"), LossConfig(name="apo", apo_beta=0.3, apo_clip="push_only"),
               LossConfig(name="apo", apo_beta=0.3, eps_low=0.3), LossConfig(name="grpo", apo_beta=0.3)):
        assert not ok.is_positive_only and ok.validate() == []
    with pytest.warns(UserWarning, match="topk_kl_coef"):
        LossConfig(name="topk_kl_on_wrong")


@pytest.mark.parametrize("cfg_kw, want", [
    (dict(name="grpo"), set()),
    (dict(name="grpo", ent_coef=0.01), {"entropy"}),
    (dict(name="grpo_kl", kl_coef=0.1), {"ref_logp"}),
    (dict(name="kl_on_wrong", kl_coef=0.1, kl_estimator="full"), {"kl_full"}),
    (dict(name="apo"), {"anchor_logp", "anchor_ref_logp", "anchor_is_sampled"}),
    (dict(name="apo", apo_anchor_norm="old_mass"), {"anchor_logp", "anchor_ref_logp", "anchor_is_sampled",
                                                    "anchor_old_logp"}),
    (dict(name="apo", apo_anchor_norm="old_token", kl_coef=0.1), {"anchor_logp", "anchor_ref_logp",
                                                                  "anchor_is_sampled", "anchor_old_logp", "ref_logp"}),
    (dict(name="topk_kl_on_wrong", topk_kl_coef=0.1, apo_anchor_norm="old_mass"),
     {"anchor_logp", "anchor_ref_logp", "anchor_is_sampled"}),
    (dict(name="clip_cov"), set()), (dict(name="kl_cov"), set()),
    (dict(name="cispo"), set()), (dict(name="gspo"), set()), (dict(name="gspo_token"), set()),
    (dict(name="sapo"), set()), (dict(name="gmpo"), set()), (dict(name="gpg"), set()),
    (dict(name="dppo_tv"), set()), (dict(name="dppo_kl"), set()),
    (dict(name="simko"), {"entropy", "policy_topk_logp"}),
    (dict(name="simko", simko_entropy_quantile=None), {"entropy", "policy_topk_logp"}),
    (dict(name="gspo", top_entropy_quantile=0.2), {"entropy"}),
])
def test_required_inputs(cfg_kw, want):
    """The one decision of what to compute; policy_loss accepts exactly that set (others None)."""
    cfg = LossConfig(**cfg_kw)
    assert set(required_inputs(cfg)) == want and want <= set(OPTIONAL_INPUTS)
    assert cfg.needs_anchor_old == ("anchor_old_logp" in want)
    x = _inputs()
    for name in OPTIONAL_INPUTS:
        if name not in want:
            x[name] = None
    loss, _ = policy_loss(cfg, **x)
    assert math.isfinite(float(loss.detach()))


def test_sign_split_and_batch_coupling_flags():
    """What an expected-update caller (the simulator's exact mode) must know."""
    assert LossConfig(name="kl_on_wrong", kl_coef=0.1).needs_sign_split
    assert LossConfig(name="topk_kl_on_wrong", topk_kl_coef=0.1).needs_sign_split
    assert not LossConfig(name="apo").needs_sign_split and not LossConfig(name="grpo_kl", kl_coef=0.1).needs_sign_split
    assert LossConfig(name="clip_cov").batch_coupled and LossConfig(name="kl_cov").batch_coupled
    assert not LossConfig(name="apo").batch_coupled
    assert LossConfig(name="kl_cov").cov_frac == 2e-3 and LossConfig(name="clip_cov").cov_frac == 2e-4
    assert LossConfig().pull_cap == pytest.approx(1.2) and LossConfig(eps_high=0.28).pull_cap == pytest.approx(1.28)


def test_needs_properties():
    """What each objective asks the caller to compute."""
    assert LossConfig(name="apo").needs_anchors and LossConfig(name="apo").needs_reference
    assert not LossConfig(name="grpo").needs_reference
    kl = LossConfig(name="grpo_kl", kl_coef=0.1)
    assert kl.needs_ref_logp and not kl.needs_kl_full and not kl.needs_anchors
    full = LossConfig(name="kl_on_wrong", kl_coef=0.1, kl_estimator="full")
    assert full.needs_kl_full and not full.needs_ref_logp and full.needs_reference
    assert LossConfig(ent_coef=0.01).needs_entropy and not LossConfig().needs_entropy
    assert set(POLICY_TERMS) >= {"grpo", "dapo", "grpo_kl", "kl_on_wrong", "apo"}


# --------------------------------------------------------------------------------------------
# policy_loss: shapes, missing tensors, NaN
# --------------------------------------------------------------------------------------------


def _inputs(seed: int = 0, adv_per_token: bool = False) -> dict:
    """A valid full set of inputs [B, T] / [B, T, K] (every optional tensor present)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    old = -1.0 - 2.0 * r(B, T)
    return dict(
        logp=(old + 0.2 * r(B, T) - 0.1).requires_grad_(), old_logp=old,
        advantages=(r(B, T) if adv_per_token else r(B)) * 2 - 1,
        mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
        ref_logp=old + 0.1, anchor_logp=(-1.0 - 2.0 * r(B, T, K)).requires_grad_(),
        anchor_ref_logp=-1.0 - 2.0 * r(B, T, K), anchor_is_sampled=r(B, T, K) > 0.7,
        kl_full=r(B, T).requires_grad_(), entropy=(1.0 + r(B, T)).requires_grad_(), weights=1.0 + r(B),
        anchor_old_logp=-1.0 - 2.0 * r(B, T, K),
        policy_topk_logp=(-0.5 - r(B, T, K)).sort(-1, descending=True).values.requires_grad_(),
    )


CFG_ALL = dict(name="apo", kl_coef=0.1, ent_coef=0.01)  # needs anchors, ref_logp, entropy
CFG_OLD = dict(CFG_ALL, apo_anchor_norm="old_token")  # and anchor_old_logp


@pytest.mark.parametrize(
    "arg, value",
    [
        ("logp", torch.zeros(B)), ("logp", torch.zeros(B, T, 1)), ("logp", [[0.0] * T] * B),
        ("old_logp", torch.zeros(B, T + 1)), ("mask", torch.ones(B + 1, T)), ("advantages", torch.zeros(B + 1)),
        ("advantages", torch.zeros(B, T + 1)), ("advantages", torch.zeros(B, T, 1)), ("ref_logp", torch.zeros(B, 1)),
        ("entropy", torch.zeros(T, B)), ("weights", torch.ones(B, 1)), ("weights", torch.ones(B + 1)),
        ("anchor_logp", torch.zeros(B, T)), ("anchor_logp", torch.zeros(B, T + 1, K)),
        ("anchor_logp", torch.zeros(B, T, 0)), ("anchor_ref_logp", torch.zeros(B, T, K + 1)),
        ("anchor_is_sampled", torch.zeros(B, T, K - 1, dtype=torch.bool)),
    ],
)
def test_shape_mismatch_names_the_argument(arg, value):
    x = _inputs()
    x[arg] = value
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        policy_loss(LossConfig(**CFG_ALL), **x)


@pytest.mark.parametrize("value", [torch.zeros(B, T, K + 1), torch.zeros(B, T), [[[0.0] * K] * T] * B])
def test_anchor_old_logp_shape_is_named(value):
    x = _inputs()
    x["anchor_old_logp"] = value
    with pytest.raises(ValueError, match=r"^anchor_old_logp: expected shape"):
        policy_loss(LossConfig(**CFG_OLD), **x)
    policy_loss(LossConfig(**CFG_ALL), **x)  # "ref" does not read it


def test_nan_in_anchor_old_logp_is_reported():
    x = _inputs()
    x["anchor_old_logp"][0, 0, 1] = math.nan
    with pytest.raises(ValueError, match=r"^anchor_old_logp:.*NaN"):
        policy_loss(LossConfig(**CFG_OLD), **x)


def test_kl_full_shape_is_checked():
    x = _inputs()
    x["kl_full"] = torch.zeros(B, T, 1)
    with pytest.raises(ValueError, match=r"^kl_full:"):
        policy_loss(LossConfig(name="grpo_kl", kl_coef=0.1, kl_estimator="full"), **x)


@pytest.mark.parametrize(
    "cfg_kw, arg",
    [
        (dict(name="grpo_kl", kl_coef=0.1, kl_estimator="k1"), "ref_logp"),
        (dict(name="grpo_kl", kl_coef=0.1, kl_estimator="k2"), "ref_logp"),
        (dict(name="kl_on_wrong", kl_coef=0.1), "ref_logp"),
        (dict(name="grpo_kl", kl_coef=0.1, kl_estimator="full"), "kl_full"),
        (dict(name="grpo", ent_coef=0.01), "entropy"),
        (dict(name="apo"), "anchor_logp"), (dict(name="apo"), "anchor_ref_logp"),
        (dict(name="apo"), "anchor_is_sampled"), (dict(name="grpo"), "old_logp"), (dict(name="grpo"), "mask"),
    ],
)
def test_missing_tensor_names_the_argument(cfg_kw, arg):
    x = _inputs()
    x[arg] = None
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        policy_loss(LossConfig(**cfg_kw), **x)


@pytest.mark.parametrize("arg", ["logp", "old_logp", "advantages", "ref_logp", "anchor_logp", "anchor_ref_logp",
                                 "entropy", "weights"])
def test_nan_on_a_response_position_is_reported(arg):
    x = _inputs(adv_per_token=True)
    x[arg] = x[arg].detach().clone()
    x[arg].view(-1)[0] = math.nan  # position [0, 0] (anchor [0, 0, 0], weight of sequence 0): a response
    with pytest.raises(ValueError, match=rf"^{arg}:.*NaN"):
        policy_loss(LossConfig(**CFG_ALL), **x)


@pytest.mark.parametrize("fill", [-math.inf, math.inf])
def test_infinite_old_logp_on_a_response_position_is_reported(fill):
    """pi_old(y) = 0 for a sampled token is impossible; with logp = -inf too it used to give a NaN loss."""
    x = _inputs()
    x["logp"] = x["logp"].detach().clone()
    x["logp"][0, 0] = -math.inf
    x["old_logp"][0, 0] = fill
    with pytest.raises(ValueError, match=r"^old_logp:.*inf"):
        policy_loss(LossConfig(), **x)


def test_logp_minus_inf_is_allowed():
    """pi_theta(y) may underflow to 0: the log-ratio is clamped at -20 and the loss stays finite."""
    x = _inputs()
    x["logp"] = x["logp"].detach().clone()
    x["logp"][0, 0] = -math.inf
    loss, _ = policy_loss(LossConfig(), **x)
    assert math.isfinite(float(loss))


@pytest.mark.parametrize("arg, value", [("global_tokens", 0), ("global_tokens", -3.0), ("global_seqs", 0.0),
                                        ("global_seqs", math.nan), ("global_tokens", math.inf)])
def test_bad_global_counts_are_named(arg, value):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        policy_loss(LossConfig(), **_inputs(), **{arg: value})


def test_nan_in_kl_full_and_inf_advantage_are_reported():
    x = _inputs()
    x["kl_full"] = x["kl_full"].detach().clone()
    x["kl_full"][2, 3] = math.nan
    with pytest.raises(ValueError, match=r"^kl_full:.*NaN"):
        policy_loss(LossConfig(name="grpo_kl", kl_coef=0.1, kl_estimator="full"), **x)
    x = _inputs()
    x["advantages"][1] = math.inf
    with pytest.raises(ValueError, match=r"^advantages:.*inf"):
        policy_loss(LossConfig(), **x)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), name=st.sampled_from(sorted(POLICY_TERMS)),
       est=st.sampled_from(["k1", "k2", "k3", "full"]),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
       apo_clip=st.sampled_from(["rectified", "push_only"]), clip_c=st.one_of(st.none(), st.just(3.0)),
       norm=st.sampled_from(["ref", "old_mass", "old_token"]))
def test_nan_on_padded_positions_changes_nothing(seed, name, est, agg, apo_clip, clip_c, norm):
    """Pads holding NaN (or -inf / +inf) give the same loss and gradients as pads holding finite
    junk; gradients at pads are exactly zero."""
    cfg = LossConfig(name=name, kl_coef=0.1, kl_estimator=est, ent_coef=0.01, loss_agg=agg, apo_clip=apo_clip,
                     clip_c=clip_c, apo_anchor_norm=norm, topk_kl_coef=0.1, cov_frac=0.3)
    results = []
    for fill in (math.nan, 7.0, -math.inf):
        x = _inputs(seed, adv_per_token=True)
        pad = ~x["mask"]
        for k in ("logp", "old_logp", "advantages", "ref_logp", "kl_full", "entropy", "anchor_logp",
                  "anchor_ref_logp", "anchor_old_logp", "policy_topk_logp"):
            at_pad = pad if x[k].dim() == 2 else pad[..., None]  # anchors: [B, T, K]
            filled = torch.where(at_pad, torch.full_like(x[k], fill), x[k].detach())
            x[k] = filled.requires_grad_() if x[k].requires_grad else filled
        loss, m = policy_loss(cfg, **x, generator=torch.Generator().manual_seed(seed))
        leaves = [x[k] for k in ("logp", "anchor_logp", "kl_full", "entropy", "policy_topk_logp")]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(lf) if gr is None else gr for lf, gr in zip(leaves, grads)]
        assert math.isfinite(float(loss.detach())) and all(math.isfinite(v) for v in m.values())
        for gr in grads:
            assert torch.isfinite(gr).all()
            assert not gr[pad].any()
        results.append((loss.detach(), grads, m))
    for loss, grads, m in results[1:]:
        assert torch.equal(loss, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.equal(a, b)
        assert m == results[0][2]


def test_fully_padded_sequence_with_nan_advantage():
    """A [B] advantage may be NaN for a sequence that has no response tokens at all."""
    x = _inputs()
    x["mask"][1] = False
    x["advantages"][1] = math.nan
    loss, _ = policy_loss(LossConfig(**CFG_ALL), **x)
    assert math.isfinite(float(loss.detach()))


@pytest.mark.parametrize("name", sorted(POLICY_TERMS))
@pytest.mark.parametrize("est", ["k3", "full"])
def test_metrics_are_floats(name, est):
    cfg = LossConfig(name=name, kl_coef=0.1, kl_estimator=est, ent_coef=0.01, clip_c=3.0, topk_kl_coef=0.1)
    loss, m = policy_loss(cfg, **_inputs())
    assert m and all(isinstance(k, str) and type(v) is float for k, v in m.items()), m
    assert {"loss", "pg_loss", "num_tokens", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "entropy"} <= set(m)
    assert m["loss"] == pytest.approx(float(loss.detach()), abs=1e-12) and m["num_tokens"] == 9.0
    if cfg.needs_anchors:
        assert {"apo/r_anchor_mean", "apo/pull", "apo/manifold_mass", "apo/outside_topk_frac",
                "apo/neg_clipped_frac"} <= set(m) or "topk_kl/ce_neg" in m
    assert "clip_grad_frac/neg" in m


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(rewards=[1.0, 0.0], group_size=1), "group_size"),
        (dict(rewards=[1.0, 0.0], group_size=0), "group_size"),
        (dict(rewards=[1.0, 0.0, 1.0], group_size=2), "group_size"),  # G does not divide N
        (dict(rewards=[1.0, 0.0], group_size=True), "group_size"),
        (dict(rewards=[1.0, 0.0], group_size=2.0), "group_size"),
        (dict(rewards=[], group_size=2), "group_size"),
        (dict(rewards=[[1.0, 0.0]], group_size=2), "rewards"),
        (dict(rewards=[1.0, math.nan], group_size=2), "rewards"),
        (dict(rewards=[1.0, math.inf], group_size=2), "rewards"),
        (dict(rewards=[1.0, 0.0], group_size=2, estimator="ppo"), "estimator"),
        (dict(rewards=[1.0, 0.0], group_size=2, std="sample"), "std"),
        (dict(rewards=[1.0, 0.0], group_size=2, eps=-1e-6), "eps"),
        (dict(rewards=[1.0, 0.5], group_size=2, estimator="w_reinforce"), "rewards"),
        (dict(rewards=[1.0, 0.5], group_size=2, estimator="passk", k=1), "rewards"),
        (dict(rewards=[1.0, 0.0], group_size=2, estimator="passk"), "k"),
        (dict(rewards=[1.0, 0.0], group_size=2, estimator="passk", k=0), "k"),
        (dict(rewards=[1.0, 0.0], group_size=2, estimator="passk", k=3), "k"),
    ],
)
def test_group_advantages_bad_input(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        group_advantages(**kwargs)


# --------------------------------------------------------------------------------------------
# import hygiene
# --------------------------------------------------------------------------------------------


def test_loss_module_imports_no_heavy_library():
    code = ("import apo_llm.objectives, apo_llm.metrics, sys; "
            "heavy = [m for m in ('transformers', 'peft', 'datasets', 'accelerate') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
