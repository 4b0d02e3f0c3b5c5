"""The mechanism-separation controls `apo_silence` and `apo_antisharp` (apo_llm/objectives.py,
section "Controls"), against hand-derived gradients in float64.

Rows as in test_obj_readings: row i holds logits z_i [V], behaviour logits, a reference and a
sampled token y_i; the expected gradients below use the full-vocabulary softmax pi, mu = pi_old:

    grad_z w = w (e_y - pi),   grad_z pi_y = pi_y (e_y - pi)
    silence, A < 0:   -dL/dz = (|A|/N) lambda w (pi - e_y)            where APO's r_APO >= 1 - eps_low
                      0                                               where APO's r_APO <  1 - eps_low
    antisharp, A < 0: rho = lambda w - beta (1 - pi_y)/(1 - mu_y)
                      -dL/dz = (|A|/N) (lambda w + beta pi_y/(1 - mu_y)) (pi - e_y)   where rho >= 1 - eps_low
    both, A > 0: GRPO, -dL/dz = (A/N) w (e_y - pi) where w <= 1 + eps_high, else 0
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from apo_llm.objectives import LossConfig, policy_loss
from tests.core.test_obj_readings import NORMS, draw_rows, r_anchor_expr, rows_loss, set_indicator

torch_default_dtype = torch.float64
F64 = torch.float64
TIGHT = dict(rtol=0.0, atol=1e-10)
QUICK = settings(max_examples=40, deadline=None)

rows = dict(seed=st.integers(0, 2**31), N=st.integers(1, 4), V=st.integers(3, 10), K=st.integers(1, 10),
            scale=st.floats(0.1, 3.0), drift=st.floats(0.0, 0.3), y_in_topk=st.booleans(),
            adv=st.floats(-3.0, 3.0).filter(lambda a: abs(a) > 0.01), lam=st.floats(0.5, 2.0),
            beta=st.floats(0.0, 1.5))


def _probs(z, z_old, y):
    pi, mu = torch.softmax(z.detach(), -1), torch.softmax(z_old, -1)
    onehot = torch.nn.functional.one_hot(y, z.shape[1]).to(F64)
    return pi, mu, onehot, (pi / mu).gather(1, y[:, None])  # w [N, 1]


def _grpo_pos(adv, N, w, pi, onehot):
    """-dL/dz of GRPO's A > 0 rows: (A/N) w (e_y - pi) inside the clip window, else 0."""
    return torch.where(w <= 1.2, adv / N * w * (onehot - pi), 0.0)


@QUICK
@given(norm=st.sampled_from(NORMS), anchoring=st.sampled_from(["exclusive", "inclusive"]), **rows)
@pytest.mark.filterwarnings("ignore:LossConfig")
def test_silence_gradient_closed_form(norm, anchoring, seed, N, V, K, scale, drift, y_in_topk, adv, lam, beta):
    """Silence only: APO's push on exactly APO's unsilenced negative tokens, no pull anywhere."""
    K = min(K, V)
    z, z_old, log_rho, y = draw_rows(seed, N, V, K, scale, drift, y_in_topk)
    cfg = LossConfig(name="apo_silence", apo_k=K, apo_lambda=lam, apo_beta=beta, apo_anchor_norm=norm,
                     apo_anchoring=anchoring)
    loss, m, topk = rows_loss(cfg, z, z_old, log_rho, y, torch.full((N,), adv, dtype=F64))
    (g,) = torch.autograd.grad(loss, z)
    pi, mu, onehot, w = _probs(z, z_old, y)
    ra = r_anchor_expr(norm, pi, mu, log_rho.exp(), set_indicator(topk, y, V, anchoring))[:, None]
    rho_apo = lam * w - beta * ra
    if adv > 0:
        assume(bool(((w - 1.2).abs() > 1e-9).all()))
        want = _grpo_pos(adv, N, w, pi, onehot)
    else:
        assume(bool(((rho_apo - 0.8).abs() > 1e-9).all()))
        want = torch.where(rho_apo > 0.8, abs(adv) / N * lam * w * (pi - onehot), 0.0)
        assert m["apo/neg_clipped_frac"] == pytest.approx(float((rho_apo < 0.8).double().mean()), abs=1e-12)
        assert m["apo/pull"] == 0.0 and m["apo/pull_force_share"] == 0.0
    torch.testing.assert_close(-g, want, **TIGHT)


@pytest.mark.filterwarnings("ignore:LossConfig")
def test_silence_silences_what_apo_clips():
    """Same rows, same theta: apo_silence's zero-gradient rows are exactly APO's clipped rows, and
    its gradient elsewhere is APO's minus APO's pull (beta = 0 makes the two losses one)."""
    V, K, N = 8, 4, 6
    z, z_old, log_rho, y = draw_rows(5, N, V, K, 2.5, 0.2, True)
    adv = torch.full((N,), -1.0, dtype=F64)
    kw = dict(apo_k=K, apo_beta=0.4)
    _, m_apo, _ = rows_loss(LossConfig(name="apo", **kw), z, z_old, log_rho, y, adv)
    _, m_sil, _ = rows_loss(LossConfig(name="apo_silence", **kw), z, z_old, log_rho, y, adv)
    assert 0.0 < m_apo["apo/neg_clipped_frac"] < 1.0  # the draw has both kinds of rows
    assert m_sil["apo/neg_clipped_frac"] == m_apo["apo/neg_clipped_frac"]
    ga = torch.autograd.grad(rows_loss(LossConfig(name="apo", apo_k=K, apo_beta=0.0), z, z_old, log_rho, y, adv)[0], z)
    gs = torch.autograd.grad(rows_loss(LossConfig(name="apo_silence", apo_k=K, apo_beta=0.0), z, z_old, log_rho, y,
                                       adv)[0], z)
    torch.testing.assert_close(gs[0], ga[0], **TIGHT)


@QUICK
@given(clip=st.sampled_from(["rectified", "push_only"]), **rows)
@pytest.mark.filterwarnings("ignore:LossConfig")
def test_antisharp_gradient_closed_form(clip, seed, N, V, K, scale, drift, y_in_topk, adv, lam, beta):
    """Anti-sharpening: the pull beta |A| grad (1 - pi_y)/(1 - mu_y) = beta |A| pi_y/(1 - mu_y) (e_y - pi)."""
    K = min(K, V)
    z, z_old, log_rho, y = draw_rows(seed, N, V, K, scale, drift, y_in_topk)
    N = z.shape[0]
    lp, lp_old = torch.log_softmax(z, -1), torch.log_softmax(z_old, -1)
    cfg = LossConfig(name="apo_antisharp", apo_lambda=lam, apo_beta=beta, apo_clip=clip, apo_pull_cap=math.inf)
    loss, m = policy_loss(cfg, lp.gather(1, y[:, None]), lp_old.gather(1, y[:, None]), torch.full((N,), adv, dtype=F64),
                          torch.ones(N, 1, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, z)
    pi, mu, onehot, w = _probs(z, z_old, y)
    pi_y, mu_y = pi.gather(1, y[:, None]), mu.gather(1, y[:, None])
    r_anti = (1 - pi_y) / (1 - mu_y)
    push = abs(adv) / N * lam * w * (pi - onehot)
    pull = abs(adv) / N * beta * pi_y / (1 - mu_y) * (pi - onehot)
    if adv > 0:
        assume(bool(((w - 1.2).abs() > 1e-9).all()))
        want = _grpo_pos(adv, N, w, pi, onehot)
    elif clip == "rectified":
        rho = lam * w - beta * r_anti
        assume(bool(((rho - 0.8).abs() > 1e-9).all()))
        want = torch.where(rho > 0.8, push + pull, 0.0)
    else:
        assume(bool(((w - 0.8).abs() > 1e-9).all()))
        want = torch.where(w > 0.8, push, 0.0) + pull
    torch.testing.assert_close(-g, want, **TIGHT)


def test_antisharp_at_theta_old_is_one_and_exact_near_one():
    """r_anti = 1 at theta_old (rho = lambda - beta), and 1 - pi_y is exact when pi_y ~ 1 - 1e-12."""
    lp = torch.tensor([[math.log1p(-1e-12)]], dtype=F64, requires_grad=True)
    cfg = LossConfig(name="apo_antisharp", apo_lambda=1.05, apo_beta=0.1)
    loss, m = policy_loss(cfg, lp, lp.detach(), torch.tensor([-1.0], dtype=F64), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.95, rel=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    # d rho / d log pi = lambda w + beta pi / (1 - pi_old) = 1.05 + 0.1 (1 - 1e-12) / 1e-12
    assert float(g) == pytest.approx(1.05 + 0.1 * (1 - 1e-12) / 1e-12, rel=1e-6)
