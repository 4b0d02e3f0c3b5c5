"""APO's readings of r_anchor, the push_only pull cap, the gradient-counting diagnostics and the
gradient-alignment claim (docs/method.md open points; docs/theory.md section 7), in float64.

Positions are rows: row i holds logits z_i [V] (requires_grad), behaviour logits z_old_i, a
reference rho_i and a sampled token y_i; the shipped `policy_loss` gets the sampled and anchor
log-probs gathered from them (anchors = TopK(rho_i)). Every expected value below is computed
from the full-vocabulary softmax, by hand or by autograd of an independent expression:

    ref        r_anchor = M_S / Z_ref                      grad_z r = (1/Z) pi (1_S - M_S)
    old_mass   r_anchor = M_S / M_S(old)                   grad_z r = (1/M_old) pi (1_S - M_S)
    old_token  r_anchor = sum_S q_k pi_k / mu_k            grad_z r = q (pi/mu) 1_S - pi r_anchor
               (q = rho 1_S / Z_ref, mu = pi_old)
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from apo_llm.objectives import LossConfig, policy_loss
from tests.core.test_objectives import _rand

# These properties draw rectified arms with large beta on purpose; the positive-only note they trigger
# is tested where it is the subject (tests/core/test_loss_inputs.py), here it would only be log noise.
pytestmark = pytest.mark.filterwarnings("ignore:LossConfig.*positive-only:UserWarning")

F64 = torch.float64
TIGHT = dict(rtol=0.0, atol=1e-10)
QUICK = settings(max_examples=40, deadline=None)
NORMS = ("ref", "old_mass", "old_token")


def rows_loss(cfg: LossConfig, z, z_old, log_rho, y, adv, weights=None):
    """policy_loss on N one-token rows; z, z_old, log_rho [N, V]; y [N] long; adv [N]."""
    N, K = z.shape[0], cfg.apo_k
    lp, lp_old = torch.log_softmax(z, -1), torch.log_softmax(z_old, -1).detach()
    topk = torch.topk(log_rho, K, dim=-1).indices  # [N, K]
    anc = lambda x: x.gather(1, topk).reshape(N, 1, K)  # noqa: E731  [N, V] -> [N, T=1, K]
    loss, m = policy_loss(
        cfg, lp.gather(1, y[:, None]), lp_old.gather(1, y[:, None]), adv,  # [N, T=1]
        torch.ones(N, 1, dtype=torch.bool), anchor_logp=anc(lp), anchor_ref_logp=anc(log_rho),
        anchor_is_sampled=(topk == y[:, None]).reshape(N, 1, K), anchor_old_logp=anc(lp_old), weights=weights,
    )
    return loss, m, topk


def set_indicator(topk, y, V, anchoring):
    """[N, V] indicator of S_i: TopK_i minus y_i (exclusive) or TopK_i (inclusive)."""
    s = torch.zeros(topk.shape[0], V, dtype=F64).scatter_(1, topk, 1.0)
    if anchoring == "exclusive":
        s.scatter_(1, y[:, None], 0.0)
    return s


def r_anchor_expr(norm, pi, mu, rho, S):
    """r_anchor per row from full-vocabulary probabilities [N, V] (differentiable in pi)."""
    Z, M = (rho * S).sum(-1), (pi * S).sum(-1)
    if norm == "ref":
        den = Z
        num = M
    elif norm == "old_mass":
        den = (mu * S).sum(-1)
        num = M
    else:
        den = Z
        num = (rho * S * pi / mu).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num))


def grad_r_closed_form(norm, pi, mu, rho, S):
    """grad_z r_anchor [N, V], by hand (module docstring)."""
    Z, M = (rho * S).sum(-1, keepdim=True), (pi * S).sum(-1, keepdim=True)
    if norm == "ref":
        return torch.where(Z > 0, pi * (S - M) / Z.clamp(min=1e-300), 0.0)
    if norm == "old_mass":
        M_old = (mu * S).sum(-1, keepdim=True)
        return torch.where(M_old > 0, pi * (S - M) / M_old.clamp(min=1e-300), 0.0)
    q = torch.where(Z > 0, rho * S / Z.clamp(min=1e-300), 0.0)
    r = (q * pi / mu).sum(-1, keepdim=True)
    return q * pi / mu * S - pi * r


def draw_rows(seed, N, V, K, scale, drift, y_in_topk):
    """Logits, behaviour logits (z + drift noise), reference log-probs, sampled tokens."""
    z = _rand(seed, N, V, scale=scale).requires_grad_()
    z_old = z.detach() + _rand(seed + 1, N, V, scale=drift)
    log_rho = torch.log_softmax(_rand(seed + 2, N, V, scale=scale), -1)
    order = torch.argsort(log_rho, -1, descending=True)
    pick = torch.arange(N) + seed
    y = torch.where(torch.tensor(y_in_topk) | (K == V), order[torch.arange(N), pick % K],
                    order[torch.arange(N), K + pick % max(V - K, 1)] if V > K else order[:, 0])
    return z, z_old, log_rho, y


rows = dict(seed=st.integers(0, 2**31), N=st.integers(1, 4), V=st.integers(3, 10), K=st.integers(1, 10),
            scale=st.floats(0.1, 3.0), drift=st.floats(0.0, 0.3), y_in_topk=st.booleans(),
            adv=st.floats(-3.0, -0.01), lam=st.floats(0.5, 2.0), beta=st.floats(0.0, 1.5),
            anchoring=st.sampled_from(["exclusive", "inclusive"]), norm=st.sampled_from(NORMS))


# --------------------------------------------------------------------------------------------
# Item 1: closed-form gradient of every reading
# --------------------------------------------------------------------------------------------


@QUICK
@given(clip=st.sampled_from(["push_only", "rectified"]), **rows)
@pytest.mark.filterwarnings("ignore:LossConfig")
def test_reading_gradient_closed_form(clip, seed, N, V, K, scale, drift, y_in_topk, adv, lam, beta, anchoring, norm):
    """-dL/dz_i = (|A|/N) [lambda w (pi - e_y) + beta grad_z r_anchor] on every unclipped row; a
    rectified row with r_APO < 1 - eps_low is flat (zero gradient), push_only is uncapped here."""
    K = min(K, V)
    z, z_old, log_rho, y = draw_rows(seed, N, V, K, scale, drift, y_in_topk)
    cfg = LossConfig(name="apo", apo_clip=clip, apo_k=K, apo_lambda=lam, apo_beta=beta, apo_anchoring=anchoring,
                     apo_anchor_norm=norm, apo_pull_cap=math.inf)
    loss, m, topk = rows_loss(cfg, z, z_old, log_rho, y, torch.full((N,), adv, dtype=F64))
    (g,) = torch.autograd.grad(loss, z)
    pi, mu, rho = torch.softmax(z.detach(), -1), torch.softmax(z_old, -1), log_rho.exp()
    S = set_indicator(topk, y, V, anchoring)
    w = (pi / mu).gather(1, y[:, None])  # [N, 1]
    ra = r_anchor_expr(norm, pi, mu, rho, S)[:, None]
    onehot = torch.nn.functional.one_hot(y, V).to(F64)
    want = abs(adv) / N * (lam * w * (pi - onehot) + beta * grad_r_closed_form(norm, pi, mu, rho, S))
    rho_apo = lam * w - beta * ra if clip == "rectified" else w
    assume(bool(((rho_apo - 0.8).abs() > 1e-9).all()))
    active = rho_apo > 0.8
    if clip == "push_only":  # only the push is cut below the window; the uncapped pull stays
        want = torch.where(active, want, abs(adv) / N * beta * grad_r_closed_form(norm, pi, mu, rho, S))
    else:
        want = torch.where(active, want, 0.0)
    torch.testing.assert_close(-g, want, **TIGHT)
    assert m["apo/r_anchor_mean"] == pytest.approx(float(ra.mean()), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("anchoring", ["exclusive", "inclusive"])
def test_readings_at_theta_old(anchoring):
    """At theta = theta_old: old_mass has r_anchor = 1 and pull = beta |A| grad log M_S; old_token
    has r_anchor = 1 and pull = beta |A| grad sum_S q_k log pi_k (a Top-K forward-KL pull)."""
    V, K = 7, 4
    z, _, log_rho, y = draw_rows(11, 3, V, K, 1.5, 0.0, True)
    adv = torch.tensor([-1.0, -0.5, -2.0], dtype=F64)
    for norm in ("old_mass", "old_token"):
        cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=K, apo_anchoring=anchoring, apo_anchor_norm=norm,
                         apo_lambda=1.0, apo_beta=0.3, apo_pull_cap=math.inf)
        zz = z.detach().clone().requires_grad_()
        loss, m, topk = rows_loss(cfg, zz, zz.detach(), log_rho, y, adv)
        (g,) = torch.autograd.grad(loss, zz)
        assert m["apo/r_anchor_mean"] == pytest.approx(1.0, rel=1e-12)
        S = set_indicator(topk, y, V, anchoring)
        z2 = z.detach().clone().requires_grad_()
        lp = torch.log_softmax(z2, -1)
        q = log_rho.exp() * S / (log_rho.exp() * S).sum(-1, keepdim=True)
        target = torch.logsumexp(lp.masked_fill(S == 0, -math.inf), -1) if norm == "old_mass" else (q * lp).sum(-1)
        (g_target,) = torch.autograd.grad((0.3 * adv.abs() * target).sum() / 3, z2)
        pi = lp.detach().exp()
        push = (adv.abs()[:, None] / 3) * (pi - torch.nn.functional.one_hot(y, V).to(F64))
        torch.testing.assert_close(-g, push + g_target, **TIGHT)


def test_missing_anchor_old_logp_is_named():
    for norm in ("old_mass", "old_token"):
        cfg = LossConfig(name="apo", apo_anchor_norm=norm)
        assert cfg.needs_anchor_old
        with pytest.raises(ValueError, match=r"^anchor_old_logp: required"):
            policy_loss(cfg, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([-1.0]),
                        torch.ones(1, 1, dtype=torch.bool), anchor_logp=torch.zeros(1, 1, 2),
                        anchor_ref_logp=torch.zeros(1, 1, 2), anchor_is_sampled=torch.zeros(1, 1, 2, dtype=torch.bool))
    assert not LossConfig(name="apo").needs_anchor_old


def test_old_token_anchor_with_zero_old_probability_contributes_nothing():
    """pi_old(k) = 0 (log -inf) at an anchor: its term is 0 and nothing is NaN."""
    cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=3, apo_anchor_norm="old_token", apo_pull_cap=math.inf)
    an = torch.log(torch.tensor([[[0.2, 0.1, 0.05]]], dtype=F64)).requires_grad_()
    old = torch.log(torch.tensor([[[0.1, 0.0, 0.05]]], dtype=F64))
    ref = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]], dtype=F64))
    logp = torch.full((1, 1), math.log(0.6), dtype=F64, requires_grad=True)
    loss, m = policy_loss(cfg, logp, logp.detach(), torch.tensor([-1.0], dtype=F64), torch.ones(1, 1, dtype=torch.bool),
                          anchor_logp=an, anchor_ref_logp=ref, anchor_is_sampled=torch.zeros(1, 1, 3, dtype=torch.bool),
                          anchor_old_logp=old)
    g = torch.autograd.grad(loss, an)[0]
    assert m["apo/r_anchor_mean"] == pytest.approx(0.5 * 2.0 + 0.2 * 1.0, rel=1e-12)
    assert torch.isfinite(g).all() and g[0, 0, 1] == 0.0


# --------------------------------------------------------------------------------------------
# Item 2: the push_only pull cap bounds the logit force as Z_ref -> 0
# --------------------------------------------------------------------------------------------


def peaked_position(z_exp: int, mass_s: float, V: int = 6, K: int = 3):
    """Reference top-1 = y = token 0 with rho = 1 - Z; S = tokens 1, 2 share Z = 10^-z_exp.
    The policy holds mass_s on S, the rest on y and outside the Top-K."""
    Z = 10.0 ** -z_exp
    rho = torch.tensor([1 - Z, Z * 0.6, Z * 0.4] + [Z * 1e-3 / (V - 3)] * (V - 3), dtype=F64)
    rho = rho / rho.sum()
    pi = torch.tensor([0.5 * (1 - mass_s), mass_s * 0.7, mass_s * 0.3] + [0.5 * (1 - mass_s) / (V - 3)] * (V - 3),
                      dtype=F64)
    return pi.log()[None], rho.log()[None], torch.tensor([0])


@settings(max_examples=30, deadline=None)
@given(z_exp=st.integers(1, 9), mass_s=st.floats(1e-9, 0.9), norm=st.sampled_from(NORMS),
       cap=st.one_of(st.none(), st.floats(0.5, 3.0)), beta=st.floats(0.01, 2.0), adv=st.floats(-3.0, -0.1))
def test_pull_cap_bounds_logit_force(z_exp, mass_s, norm, cap, beta, adv):
    """With the push flat (w = 0.5), the loss gradient is the pull alone; with a cap its L1 norm
    in logit space stays <= 2 beta |A| cap for every Z_ref (docs/theory.md section 7)."""
    z, log_rho, y = peaked_position(z_exp, mass_s)
    z_old = z + math.log(2.0) * torch.nn.functional.one_hot(y, z.shape[1]).to(F64)  # w = pi_y / mu_y ~ 0.5
    z_old = z_old - 0.5  # a shift of all logits keeps the softmax; mu(S) != pi(S) for old_* readings
    zz = z.clone().requires_grad_()
    cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=3, apo_beta=beta, apo_anchor_norm=norm, apo_pull_cap=cap)
    loss, m, _ = rows_loss(cfg, zz, z_old, log_rho, y, torch.tensor([adv], dtype=F64))
    (g,) = torch.autograd.grad(loss, zz)
    assert m["clip_frac/neg"] == 1.0  # the push is flat: g is the pull alone
    cap_v = 1.2 if cap is None else cap
    assert float(g.abs().sum()) <= 2 * beta * abs(adv) * cap_v * (1 + 1e-12)


def test_uncapped_pull_force_grows_like_one_over_z_ref():
    """The same position without a cap ("ref"): force = 2 beta |A| M_S (1 - M_S) / Z_ref, which
    exceeds any bound as Z_ref -> 0, so the capped test above can fail."""
    forces = []
    for z_exp in (2, 5, 8):
        z, log_rho, y = peaked_position(z_exp, 0.3)
        z_old = z + math.log(2.0) * torch.nn.functional.one_hot(y, z.shape[1]).to(F64)
        zz = z.clone().requires_grad_()
        cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=3, apo_pull_cap=math.inf)
        loss, m, topk = rows_loss(cfg, zz, z_old, log_rho, y, torch.tensor([-1.0], dtype=F64))
        (g,) = torch.autograd.grad(loss, zz)
        S = set_indicator(topk, y, 6, "exclusive")
        Z = float((log_rho.exp() * S).sum())
        forces.append(float(g.abs().sum()))
        assert forces[-1] == pytest.approx(2 * 0.1 * 0.3 * 0.7 / Z, rel=1e-9)
    assert forces[-1] > 1e6 * 2 * 0.1 * 1.2  # far above the capped bound 2 beta |A| cap


# --------------------------------------------------------------------------------------------
# Item 4: diagnostics that count gradient
# --------------------------------------------------------------------------------------------


def _l1_grad(expr: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Row-wise L1 norm [N] of d expr_i / d z_i for a per-row expression expr [N]."""
    (g,) = torch.autograd.grad(expr.sum(), z, retain_graph=True)
    return g.abs().sum(-1)


@QUICK
@example(clip="push_only", cap=0.7, weighted=False, seed=3, N=3, V=6, K=3, scale=1.0, drift=0.0, y_in_topk=False,
         lam=1.0, beta=0.5, anchoring="exclusive", norm="old_mass")  # r_anchor = 1 > cap: pull capped
@given(clip=st.sampled_from(["push_only", "rectified"]), cap=st.one_of(st.none(), st.floats(0.3, 3.0)),
       weighted=st.booleans(), seed=st.integers(0, 2**31), N=st.integers(1, 7), V=st.integers(3, 10),
       K=st.integers(1, 10), scale=st.floats(0.1, 3.0), drift=st.floats(0.0, 0.5), y_in_topk=st.booleans(),
       lam=st.floats(0.8, 1.5), beta=st.floats(0.0, 0.6), anchoring=st.sampled_from(["exclusive", "inclusive"]),
       norm=st.sampled_from(NORMS))
def test_gradient_counting_diagnostics(clip, cap, weighted, seed, N, V, K, scale, drift, y_in_topk, lam, beta,
                                       anchoring, norm):
    """apo/neg_clipped_grad_frac, apo/pull_force_share and apo/r_anchor_median against autograd of
    the separate push (lambda |A| w) and pull (beta |A| r_anchor) expressions, row by row,
    each counted only where its piecewise condition says it is not flat; rows weighted by |weights|."""
    K = min(K, V)
    z, z_old, log_rho, y = draw_rows(seed, N, V, K, scale, drift, y_in_topk)
    adv = torch.round(_rand(seed + 9, N, scale=2.0), decimals=1)  # mixed signs
    wts = (_rand(seed + 8, N) + 1.2) if weighted else None
    cfg = LossConfig(name="apo", apo_clip=clip, apo_k=K, apo_lambda=lam, apo_beta=beta, apo_anchoring=anchoring,
                     apo_anchor_norm=norm, apo_pull_cap=cap, eps_low=0.2)
    _, m, topk = rows_loss(cfg, z, z_old, log_rho, y, adv, weights=wts)
    pi = torch.softmax(z, -1)
    mu, rho = torch.softmax(z_old, -1), log_rho.exp()
    S = set_indicator(topk, y, V, anchoring)
    w = (pi / mu).gather(1, y[:, None])[:, 0]  # [N], differentiable
    ra = r_anchor_expr(norm, pi, mu, rho, S)
    push = _l1_grad(lam * adv.abs() * w, z)  # [N]
    pull = _l1_grad(beta * adv.abs() * ra, z)
    w_d, ra_d = w.detach(), ra.detach()
    if clip == "rectified":
        r_apo = lam * w_d - beta * ra_d
        assume(bool(((r_apo - 0.8).abs() > 1e-9).all()))
        push_cut = pull_cut = r_apo < 0.8
    else:
        cap_v = 1.2 if cap is None else cap
        assume(bool(((w_d - 0.8).abs() > 1e-9).all() and ((ra_d - cap_v).abs() > 1e-9).all()))
        push_cut, pull_cut = w_d < 0.8, ra_d > cap_v
    neg = adv < 0
    tw = torch.ones(N, dtype=F64) if wts is None else wts.abs()
    tot = lambda x: float((x * tw * neg).sum())  # noqa: E731
    clipped_mass = tot(push * push_cut)
    assert m["apo/neg_clipped_grad_frac"] == pytest.approx(clipped_mass / tot(push) if tot(push) > 0 else 0.0,
                                                           rel=1e-9, abs=1e-12)
    assert m["clip_grad_frac/neg"] == m["apo/neg_clipped_grad_frac"]
    pu, ps = pull * ~pull_cut, push * ~push_cut
    if tot(pu + ps) > 1e-9:  # both forces at rounding level (e.g. S = the whole vocabulary): share is 0/0
        assert m["apo/pull_force_share"] == pytest.approx(tot(pu) / tot(pu + ps), rel=1e-9, abs=1e-12)
    # lower weighted median of r_anchor over negative rows, by brute force over candidates
    vals = [(float(ra_d[i]), float(tw[i])) for i in range(N) if neg[i]]
    half = sum(x for _, x in vals) / 2
    want = min((v for v, _ in vals if sum(x for u, x in vals if u <= v) >= half), default=0.0)
    assert m["apo/r_anchor_median"] == pytest.approx(want, rel=1e-12)
    assert m["apo/pull_capped_frac"] == pytest.approx(
        (tot(pull_cut.to(F64)) / tot(torch.ones(N, dtype=F64)) if clip == "push_only" else 0.0) if neg.any() else 0.0,
        rel=1e-12, abs=1e-15)


def test_clipped_grad_frac_counts_gradient_not_tokens():
    """Two negative tokens, one clipped: by tokens 1/2; by gradient the clipped one has
    pi(y) = 0.99 and carries 2 |A| w (1 - 0.99), the other pi(y) = 0.5: share 0.01 w1 / (0.01 w1 + 0.5 w2)."""
    cfg = LossConfig(name="grpo")
    logp = torch.log(torch.tensor([[0.99], [0.5]], dtype=F64))
    w = torch.tensor([[0.7], [1.0]], dtype=F64)  # row 0 below 1 - eps_low: clipped
    _, m = policy_loss(cfg, logp, logp - w.log(), torch.tensor([-1.0, -1.0], dtype=F64),
                       torch.ones(2, 1, dtype=torch.bool))
    assert m["clip_frac/neg"] == 0.5
    assert m["clip_grad_frac/neg"] == pytest.approx(0.01 * 0.7 / (0.01 * 0.7 + 0.5 * 1.0), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Item 8: gradient alignment, checked as a claim about the update (finite differences)
# --------------------------------------------------------------------------------------------


def _pull_step(norm, z, z_old, log_rho, y, adv, K, anchoring, eta):
    """One SGD step of size eta on the shipped loss with the push flat (w ~ 0.5): the pull alone.
    Returns (z after the step, the step's L1 size)."""
    cfg = LossConfig(name="apo", apo_clip="push_only", apo_k=K, apo_anchoring=anchoring, apo_anchor_norm=norm,
                     apo_pull_cap=math.inf, apo_beta=0.5)
    zz = z.detach().clone().requires_grad_()
    opt = torch.optim.SGD([zz], lr=eta)
    loss, m, _ = rows_loss(cfg, zz, z_old, log_rho, y, adv)
    assert m["clip_frac/neg"] == 1.0
    loss.backward()
    step = float(zz.grad.abs().sum()) * eta
    opt.step()
    return zz.detach(), step


@QUICK
@given(seed=st.integers(0, 2**31), N=st.integers(1, 4), V=st.integers(3, 10), K=st.integers(1, 10),
       scale=st.floats(0.1, 3.0), drift=st.floats(0.0, 0.3), y_in_topk=st.booleans(),
       anchoring=st.sampled_from(["exclusive", "inclusive"]), norm=st.sampled_from(NORMS))
def test_negative_update_raises_safe_mass_by_its_first_order_amount(seed, N, V, K, scale, drift, y_in_topk,
                                                                    anchoring, norm):
    """For every row, the measured change of M_S after one small step on the total negative-sample
    pull equals, to first order, eta beta (|A_i|/N) grad M_S . grad r_anchor (grad M_S by autograd of
    the softmax, grad r_anchor by hand). For ref and old_mass this is eta beta |A| a |grad M_S|^2
    >= 0 (a = 1/Z_ref or 1/M_S(old)): each row's safe mass goes up. old_token carries no such
    sign (see the counterexample below)."""
    K = min(K, V)
    z, z_old, log_rho, y = draw_rows(seed, N, V, K, scale, drift, y_in_topk)
    push_off = math.log(2.0) * torch.nn.functional.one_hot(y, V).to(F64)  # mu_y doubled: w < 0.8
    z_old = z_old + push_off
    adv = -(_rand(seed + 5, N).abs() + 0.1)
    topk = torch.topk(log_rho, K, dim=-1).indices
    S = set_indicator(topk, y, V, anchoring)
    zz = z.detach().clone().requires_grad_()
    mass = (torch.softmax(zz, -1) * S).sum(-1)  # [N] M_S per row
    (g_m,) = torch.autograd.grad(mass.sum(), zz)  # row i's gradient only depends on z_i
    pi, mu, rho = torch.softmax(z.detach(), -1), torch.softmax(z_old, -1), log_rho.exp()
    assume(bool((pi.gather(1, y[:, None]) / mu.gather(1, y[:, None]) < 0.79).all()))
    g_r = grad_r_closed_form(norm, pi, mu, rho, S)
    eta = 1e-4
    z_new, step = _pull_step(norm, z, z_old, log_rho, y, adv, K, anchoring, eta)
    measured = (torch.softmax(z_new, -1) * S).sum(-1) - mass.detach()
    predicted = eta * 0.5 * adv.abs() / N * (g_m * g_r).sum(-1)
    torch.testing.assert_close(measured, predicted, rtol=1e-3, atol=10 * step**2 + 1e-15)
    if norm != "old_token":
        assert bool((predicted >= -1e-15).all())  # S = whole vocabulary: grad M_S = 0 up to rounding
        assert bool((measured >= -(10 * step**2 + 1e-15)).all())


def test_old_token_pull_can_lower_safe_mass():
    """Reference mass on S sits on anchor a (q_a ~ 1) while the policy's sits on anchor b: the
    old_token pull matches the reference's shape inside S and lowers M_S; ref and old_mass raise it."""
    V, K = 5, 2
    log_rho = torch.log(torch.tensor([[0.1, 0.6, 1e-4, 0.05, 0.2499]], dtype=F64))  # Top-2 = {1, 4}
    pi = torch.tensor([[0.04, 0.01, 0.03, 0.02, 0.9]], dtype=F64)  # S = {1, 4}, M_S = 0.91, y = 0
    z, y = pi.log(), torch.tensor([0])
    z_old = z + math.log(2.0) * torch.nn.functional.one_hot(y, V).to(F64)
    S = set_indicator(torch.tensor([[1, 4]]), y, V, "exclusive")
    before = float((pi * S).sum())
    changes = {}
    for norm in NORMS:
        z_new, _ = _pull_step(norm, z, z_old, log_rho, y, torch.tensor([-1.0], dtype=F64), K, "exclusive", 1e-2)
        changes[norm] = float((torch.softmax(z_new, -1) * S).sum()) - before
    assert changes["ref"] > 0 and changes["old_mass"] > 0
    assert changes["old_token"] < 0, changes
