"""APO at one position in logit space (docs/theory.md section 7) and APO's clipping, via policy_loss.

One position with vocabulary V, logits z (requires_grad), pi = softmax(z), reference rho,
sampled (wrong) token y, anchors = TopK(rho). The shipped loss gets

    logp = log pi_y, old_logp = logp - log r (so w = r), anchor_logp = log pi[TopK],
    anchor_ref_logp = log rho[TopK], anchor_is_sampled = (TopK == y)

and its autograd gradient w.r.t. z is compared with the closed form (unclipped, A < 0)

    -dL/dz_j = |A| [ lambda r (pi_j - 1[j = y]) + (beta / Z) pi_j (1[j in S] - M_S) ]

with S = TopK \\ {y} (exclusive, the paper) or TopK (inclusive), M_S = pi(S), Z = rho(S).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from apo_llm.objectives import LossConfig, policy_loss
from tests.core.test_objectives import _far, _rand, piecewise_grpo

# These properties draw rectified arms with large beta on purpose; the positive-only note they trigger
# is tested where it is the subject (tests/core/test_loss_inputs.py), here it would only be log noise.
pytestmark = pytest.mark.filterwarnings("ignore:LossConfig.*positive-only:UserWarning")

F64 = torch.float64
TIGHT = dict(rtol=0.0, atol=1e-10)
QUICK = settings(max_examples=40, deadline=None)


def apo_position(cfg: LossConfig, z: torch.Tensor, log_rho: torch.Tensor, y: int, adv: float, r: float = 1.0):
    """Feed one position to policy_loss; return (loss, metrics, topk ids)."""
    K = cfg.apo_k
    logp_all = torch.log_softmax(z, -1)  # [V]
    topk = torch.topk(log_rho, K).indices  # [K] safe manifold ids
    logp = logp_all[y].reshape(1, 1)
    old = logp.detach() - math.log(r)  # w = pi / pi_old = r
    loss, metrics = policy_loss(
        cfg, logp, old, torch.tensor([adv], dtype=F64), torch.ones(1, 1, dtype=torch.bool),
        anchor_logp=logp_all[topk].reshape(1, 1, K), anchor_ref_logp=log_rho[topk].reshape(1, 1, K),
        anchor_is_sampled=(topk == y).reshape(1, 1, K),
    )
    return loss, metrics, topk


def anchor_set(topk: torch.Tensor, y: int, V: int, anchoring: str) -> torch.Tensor:
    """Indicator [V] of S: TopK minus y (exclusive) or TopK (inclusive)."""
    s = torch.zeros(V, dtype=F64)
    s[topk] = 1.0
    if anchoring == "exclusive":
        s[y] = 0.0
    return s


def closed_form(pi, rho, S, y, adv, lam, beta, r):
    """-dL/dz of section 7; the pull vanishes when S is empty (Z = 0)."""
    V = len(pi)
    M, Z = float((pi * S).sum()), float((rho * S).sum())
    push = lam * r * (pi - torch.eye(V, dtype=F64)[y])
    pull = (beta / Z) * pi * (S - M) if Z > 0 else torch.zeros(V, dtype=F64)
    return abs(adv) * (push + pull)


position = dict(
    seed=st.integers(0, 2**31), V=st.integers(3, 12), K=st.integers(1, 12), scale=st.floats(0.1, 3.0),
    adv=st.floats(-3.0, -0.01), lam=st.floats(0.5, 2.0), beta=st.floats(0.0, 1.5),
    anchoring=st.sampled_from(["exclusive", "inclusive"]), y_in_topk=st.booleans(),
)


def _draw_position(seed, V, K, scale, y_in_topk):
    K = min(K, V)
    z = _rand(seed, V, scale=scale).requires_grad_()
    log_rho = torch.log_softmax(_rand(seed + 5, V, scale=scale), -1)
    order = torch.argsort(log_rho, descending=True)
    # y inside the Top-K (exclusive anchoring matters) or outside it when there is room
    y = int(order[seed % K]) if (y_in_topk or K == V) else int(order[K + seed % (V - K)])
    return K, z, log_rho, y


@QUICK
@given(r=st.floats(0.85, 1.5), **position)
def test_push_only_gradient_closed_form(seed, V, K, scale, adv, lam, beta, anchoring, y_in_topk, r):
    """push_only with w = r inside the window and no pull cap: the closed form holds for any r,
    beta, lambda (the capped pull is tested in tests/core/test_obj_readings.py)."""
    K, z, log_rho, y = _draw_position(seed, V, K, scale, y_in_topk)
    cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=K, apo_lambda=lam, apo_beta=beta,
                     apo_anchoring=anchoring, apo_pull_cap=math.inf)
    loss, m, topk = apo_position(cfg, z, log_rho, y, adv, r)
    (g,) = torch.autograd.grad(loss, z)
    pi, rho = torch.softmax(z.detach(), -1), log_rho.exp()
    S = anchor_set(topk, y, V, anchoring)
    torch.testing.assert_close(-g, closed_form(pi, rho, S, y, adv, lam, beta, r), **TIGHT)
    # the diagnostics report the same anchor quantities
    Z = float((rho * S).sum())
    r_anchor = float((pi * S).sum()) / Z if Z > 0 else 0.0
    assert m["apo/r_anchor_mean"] == pytest.approx(r_anchor, abs=1e-12)
    assert m["apo/z_ref_mean"] == pytest.approx(Z, abs=1e-12)
    assert m["apo/pull"] == pytest.approx(abs(adv) * beta * r_anchor, abs=1e-12)
    assert m["apo/manifold_mass"] == pytest.approx(float(pi[topk].sum()), abs=1e-12)
    assert m["apo/outside_topk_frac"] == float(y not in topk.tolist())
    assert m["loss"] == pytest.approx(abs(adv) * (lam * r - beta * r_anchor), abs=1e-12)


@QUICK
@given(**position)
def test_rectified_gradient_closed_form_or_exactly_zero(seed, V, K, scale, adv, lam, beta, anchoring, y_in_topk):
    """rectified at theta_old (r = 1): r_APO = lambda - beta r_anchor. Inside the window
    (r_APO > 1 - eps_low) the closed form holds; below it the whole token is flat: zero gradient,
    push included, and the token is counted as a clipped negative."""
    K, z, log_rho, y = _draw_position(seed, V, K, scale, y_in_topk)
    cfg = LossConfig(name="apo", apo_clip="rectified", apo_k=K, apo_lambda=lam, apo_beta=beta,
                     apo_anchoring=anchoring)
    loss, m, topk = apo_position(cfg, z, log_rho, y, adv)
    (g,) = torch.autograd.grad(loss, z)
    pi, rho = torch.softmax(z.detach(), -1), log_rho.exp()
    S = anchor_set(topk, y, V, anchoring)
    Z = float((rho * S).sum())
    r_apo = lam - beta * (float((pi * S).sum()) / Z if Z > 0 else 0.0)
    assume(abs(r_apo - (1 - cfg.eps_low)) > 1e-9)
    if r_apo > 1 - cfg.eps_low:
        torch.testing.assert_close(-g, closed_form(pi, rho, S, y, adv, lam, beta, 1.0), **TIGHT)
        assert m["apo/neg_clipped_frac"] == 0.0
    else:
        assert not g.any()
        assert m["apo/neg_clipped_frac"] == 1.0 and m["clip_ratio/low_mean"] == 1.0


def test_rectified_default_zero_gradient_example():
    """Defaults lambda 1.05, beta 0.1, eps 0.2: the token leaves the window once r_anchor > 2.5.
    Here Z = 0.2 while the policy holds 0.6 on S (r_anchor = 3): no push and no pull."""
    V = 6
    rho = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], dtype=F64)  # Top-2 = {0, 1}, y = 0
    pi = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.05, 0.05], dtype=F64)
    z = pi.log().requires_grad_()
    cfg = LossConfig(name="apo", apo_k=2)
    loss, m, _ = apo_position(cfg, z, rho.log(), 0, -1.0)
    (g,) = torch.autograd.grad(loss, z)
    assert m["apo/r_anchor_mean"] == pytest.approx(3.0)
    assert not g.any() and m["apo/neg_clipped_frac"] == 1.0
    # push_only without a cap keeps both forces at the same point
    uncapped = LossConfig(name="apo", apo_k=2, apo_clip="push_only", apo_pull_cap=math.inf)
    loss, _, _ = apo_position(uncapped, z, rho.log(), 0, -1.0)
    (g,) = torch.autograd.grad(loss, z)
    S = anchor_set(torch.tensor([0, 1]), 0, V, "exclusive")
    torch.testing.assert_close(-g, closed_form(pi, rho, S, 0, -1.0, 1.05, 0.1, 1.0), **TIGHT)
    # with the default cap (1 + eps_high = 1.2 < r_anchor = 3) only the push is left
    loss, m, _ = apo_position(LossConfig(name="apo", apo_k=2, apo_clip="push_only"), z, rho.log(), 0, -1.0)
    (g,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(-g, closed_form(pi, rho, S, 0, -1.0, 1.05, 0.0, 1.0), **TIGHT)
    assert m["apo/pull_capped_frac"] == 1.0 and m["apo/pull"] == pytest.approx(0.1 * 1.2)


@QUICK
@given(seed=st.integers(0, 2**31), V=st.integers(3, 12), K=st.integers(2, 12), adv=st.floats(-3.0, -0.01))
def test_exclusive_anchoring_leaves_sampled_token_out(seed, V, K, adv):
    """y inside the Top-K: exclusive anchoring never pulls y up (-dL/dz_y < 0 and r_anchor omits
    pi_y, rho_y); inclusive anchoring puts y in both sums."""
    K, z, log_rho, y = _draw_position(seed, V, K, 1.0, True)
    pi, rho = torch.softmax(z.detach(), -1), log_rho.exp()
    topk = torch.topk(log_rho, K).indices
    mass, ref = float(pi[topk].sum()), float(rho[topk].sum())
    for anchoring, r_anchor in (("exclusive", (mass - float(pi[y])) / (ref - float(rho[y]))),
                                ("inclusive", mass / ref)):
        cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=K, apo_anchoring=anchoring, apo_pull_cap=math.inf)
        loss, m, _ = apo_position(cfg, z, log_rho, y, adv)
        (g,) = torch.autograd.grad(loss, z)
        assert m["apo/r_anchor_mean"] == pytest.approx(r_anchor, rel=1e-12)
        if anchoring == "exclusive":
            assert float(-g[y]) < 0.0  # the wrong token only goes down


def test_empty_anchor_set_has_no_pull():
    """K = 1 and y = the reference's Top-1: S is empty, Z = 0, r_anchor = 0, no NaN."""
    z = torch.tensor([0.3, -0.2, 0.1], dtype=F64, requires_grad=True)
    log_rho = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=F64))
    for clip in ("rectified", "push_only"):
        cfg = LossConfig(name="apo", apo_k=1, apo_clip=clip)
        loss, m, _ = apo_position(cfg, z, log_rho, 0, -1.0)
        (g,) = torch.autograd.grad(loss, z)
        pi = torch.softmax(z.detach(), -1)
        torch.testing.assert_close(-g, 1.05 * (pi - torch.eye(3, dtype=F64)[0]), **TIGHT)
        assert m["apo/r_anchor_mean"] == 0.0 and m["apo/z_ref_mean"] == 0.0


# --------------------------------------------------------------------------------------------
# APO == GRPO where it must
# --------------------------------------------------------------------------------------------


def _batch(seed, B, T, K):
    old = _rand(seed, B, T, scale=2.0) - 2.5
    return dict(
        logp=(old + _rand(seed + 1, B, T, scale=0.5)).requires_grad_(), old_logp=old,
        mask=_rand(seed + 4, B, T) > -0.4,
        anchor_logp=(_rand(seed + 2, B, T, K) - 3.0).requires_grad_(),
        anchor_ref_logp=_rand(seed + 6, B, T, K) - 3.0, anchor_is_sampled=_rand(seed + 7, B, T, K) > 0.6,
    )


grpo_vs_apo = dict(
    seed=st.integers(0, 2**31), B=st.integers(1, 5), T=st.integers(1, 6), K=st.integers(1, 5),
    apo_clip=st.sampled_from(["rectified", "push_only"]), anchoring=st.sampled_from(["exclusive", "inclusive"]),
    clip_c=st.one_of(st.none(), st.floats(1.05, 4.0)),
    agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
)


@QUICK
@given(**grpo_vs_apo)
def test_apo_equals_grpo_on_nonnegative_advantages(seed, B, T, K, apo_clip, anchoring, clip_c, agg):
    """Per token: where A >= 0, APO's loss and gradient are GRPO's exactly and the anchors get no
    gradient; a batch with only A >= 0 gives the identical scalar."""
    data = _batch(seed, B, T, K)
    adv = torch.round(_rand(seed + 3, B, T, scale=2.0), decimals=1)  # mixed signs, some zeros
    apo = LossConfig(name="apo", apo_clip=apo_clip, apo_anchoring=anchoring, clip_c=clip_c, loss_agg=agg,
                     apo_beta=0.4)
    grpo = LossConfig(name="grpo", clip_c=clip_c, loss_agg=agg)
    l_apo, _ = policy_loss(apo, advantages=adv, **data)
    g_apo, g_anchor = torch.autograd.grad(l_apo, [data["logp"], data["anchor_logp"]])
    l_grpo, _ = policy_loss(grpo, advantages=adv, **{k: data[k] for k in ("logp", "old_logp", "mask")})
    (g_grpo,) = torch.autograd.grad(l_grpo, data["logp"])
    keep = adv >= 0
    assert torch.equal(g_apo[keep], g_grpo[keep])
    assert not g_anchor[keep].any()

    adv_pos = adv.abs()
    l_apo, _ = policy_loss(apo, advantages=adv_pos, **data)
    l_grpo, _ = policy_loss(grpo, advantages=adv_pos, **{k: data[k] for k in ("logp", "old_logp", "mask")})
    assert torch.equal(l_apo, l_grpo)


@QUICK
@given(**grpo_vs_apo)
def test_apo_with_lambda_one_beta_zero_is_grpo(seed, B, T, K, apo_clip, anchoring, clip_c, agg):
    """lambda = 1, beta = 0: APO is GRPO on every token, both clip placements, dual-clip included."""
    data = _batch(seed, B, T, K)
    adv = _rand(seed + 3, B, scale=2.0)
    apo = LossConfig(name="apo", apo_clip=apo_clip, apo_anchoring=anchoring, clip_c=clip_c, loss_agg=agg,
                     apo_lambda=1.0, apo_beta=0.0)
    grpo = LossConfig(name="grpo", clip_c=clip_c, loss_agg=agg)
    l_apo, _ = policy_loss(apo, advantages=adv, **data)
    g_apo = torch.autograd.grad(l_apo, data["logp"])[0]
    l_grpo, _ = policy_loss(grpo, advantages=adv, **{k: data[k] for k in ("logp", "old_logp", "mask")})
    g_grpo = torch.autograd.grad(l_grpo, data["logp"])[0]
    assert torch.equal(l_apo, l_grpo) and torch.equal(g_apo, g_grpo)


# --------------------------------------------------------------------------------------------
# APO clipping, both placements, vs a piecewise derivation
# --------------------------------------------------------------------------------------------


@QUICK
@example(seed=1, B=1, T=1, K=1, apo_clip="push_only", lam=0.75, beta=0.0, el=0.5, eh=0.5, clip_c=1.5, cap=None)
@example(seed=3, B=3, T=4, K=2, apo_clip="push_only", lam=1.9, beta=0.2, el=0.05, eh=0.3, clip_c=1.2, cap=math.inf)
@example(seed=0, B=1, T=1, K=1, apo_clip="push_only", lam=2.0, beta=0.0, el=0.125, eh=0.5, clip_c=1.5, cap=0.5)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), T=st.integers(1, 5), K=st.integers(1, 4),
       apo_clip=st.sampled_from(["rectified", "push_only"]), lam=st.floats(0.5, 2.0), beta=st.floats(0.0, 0.6),
       el=st.floats(0.05, 0.5), eh=st.floats(0.05, 0.5), clip_c=st.one_of(st.none(), st.floats(1.05, 3.0)),
       cap=st.one_of(st.none(), st.just(math.inf), st.floats(0.01, 3.0)))
def test_apo_clipping_piecewise(seed, B, T, K, apo_clip, lam, beta, el, eh, clip_c, cap):
    """Token by token: loss, d/dlogp and d/danchor_logp of APO vs piecewise formulas, and the
    negative-token clip metrics vs where the push is flat.

    rectified: rho = lambda w - beta r_anchor goes through the PPO surrogate (`piecewise_grpo`).
    push_only: lambda * surrogate(w) without dual-clip, then capped at |A| c; plus A beta
    min(r_anchor, cap) (cap None: 1 + eps_high), flat in r_anchor above the cap.
    """
    cfg = LossConfig(name="apo", apo_clip=apo_clip, apo_k=K, apo_lambda=lam, apo_beta=beta, eps_low=el,
                     eps_high=eh, clip_c=clip_c, apo_pull_cap=cap)
    cap = 1.0 + eh if cap is None else cap
    data = _batch(seed, B, T, K)
    adv = torch.round(_rand(seed + 3, B, T, scale=2.0), decimals=1)
    assume(bool(data["mask"].any()))
    w = (data["logp"] - data["old_logp"]).exp().detach()
    in_s = (~data["anchor_is_sampled"]).to(F64)
    ra = (data["anchor_logp"].detach().exp() * in_s).sum(-1) / (data["anchor_ref_logp"].exp() * in_s).sum(-1)
    ra = torch.nan_to_num(ra, nan=0.0)  # empty S: no pull
    rho = lam * w - beta * ra
    assume(_far(w, (1 - el, 1 + eh, clip_c)) and _far(rho, (1 - el, 1 + eh, clip_c)))
    if clip_c is not None:
        assume(_far(lam * w, (clip_c,)))
    assume(_far(ra, (cap,)))
    loss, m = policy_loss(cfg, advantages=adv, **data)
    g_lp, g_an = torch.autograd.grad(loss, [data["logp"], data["anchor_logp"]])

    n = int(data["mask"].sum())
    total, n_neg, neg_flat, dual = 0.0, 0, 0, 0
    for b in range(B):
        for t in range(T):
            if not data["mask"][b, t]:
                assert g_lp[b, t] == 0.0 and not g_an[b, t].any()
                continue
            A, wi, rai = float(adv[b, t]), float(w[b, t]), float(ra[b, t])
            if A >= 0:
                li, dw = piecewise_grpo(wi, A, el, eh, clip_c)
                dra = 0.0
            elif apo_clip == "rectified":
                li, drho = piecewise_grpo(float(rho[b, t]), A, el, eh, clip_c)
                dw, dra = lam * drho, -beta * drho
                flat = drho == 0.0
                is_dual = flat and float(rho[b, t]) > 1 - el
            else:
                lp, dlp = piecewise_grpo(wi, A, el, eh, None)
                push, dpush = lam * lp, lam * dlp
                capped = clip_c is not None and push > -A * clip_c
                if capped:
                    push, dpush = -A * clip_c, 0.0
                is_dual = capped and dlp != 0.0  # counted as dual only if not already flat (low)
                li, dw, dra = push + A * beta * min(rai, cap), dpush, (A * beta if rai <= cap else 0.0)
                flat = dpush == 0.0
            if A < 0:
                n_neg += 1
                neg_flat += flat
                dual += is_dual
            total += li
            assert float(g_lp[b, t]) == pytest.approx(dw * wi / n, abs=1e-12)
            Z = float((data["anchor_ref_logp"][b, t].exp() * in_s[b, t]).sum())
            d_anchor = dra * data["anchor_logp"][b, t].detach().exp() * in_s[b, t] / (Z if Z > 0 else 1.0) / n
            torch.testing.assert_close(g_an[b, t], d_anchor, rtol=0.0, atol=1e-12)
    assert float(loss.detach()) == pytest.approx(total / n, abs=1e-12)
    assert m["clip_frac/neg"] == pytest.approx(neg_flat / max(n_neg, 1))
    assert m["apo/neg_clipped_frac"] == pytest.approx(neg_flat / max(n_neg, 1))
    assert m["clip_ratio/dual_mean"] == pytest.approx(dual / n)
