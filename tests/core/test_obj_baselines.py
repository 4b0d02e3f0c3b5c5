"""The baselines registered next to APO (docs/objectives.md), in float64 against closed forms or
an independent computation:

- topk_kl_on_wrong: GRPO + coef * CE(q, pi_theta) on A < 0 tokens, q = pi_ref renormalised on S;
  -dL/dz = A w (e_y - pi) [GRPO, unclipped] + coef (q 1_S - pi) [A < 0 only], per row / N.
- clip_cov: GRPO with the gradient of ceil(frac N) random tokens of the band lb < cov < ub removed.
- kl_cov: GRPO + coef |log pi - log pi_old| on the ceil(frac N) tokens of largest cov.
  cov_t = (A_t - mean A)(log pi_t - mean log pi) over response tokens, recomputed here in numpy.

PSR / NSR / W-REINFORCE / pass@k are advantage estimators (tests/core/test_advantages.py checks each
against the table and the expected-direction identity); the entropy bonus is checked in
tests/core/test_objectives.py::test_entropy_bonus_gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from apo_llm.objectives import LossConfig, policy_loss
from tests.core.test_obj_readings import draw_rows, rows_loss, set_indicator
from tests.core.test_objectives import _rand

F64 = torch.float64
TIGHT = dict(rtol=0.0, atol=1e-10)
QUICK = settings(max_examples=40, deadline=None)


@QUICK
@given(seed=st.integers(0, 2**31), N=st.integers(1, 6), V=st.integers(3, 10), K=st.integers(1, 10),
       scale=st.floats(0.1, 3.0), drift=st.floats(0.0, 0.15), y_in_topk=st.booleans(), coef=st.floats(0.0, 2.0),
       anchoring=st.sampled_from(["exclusive", "inclusive"]))
@pytest.mark.filterwarnings("ignore:LossConfig")
def test_topk_kl_on_wrong_gradient_closed_form(seed, N, V, K, scale, drift, y_in_topk, coef, anchoring):
    K = min(K, V)
    z, z_old, log_rho, y = draw_rows(seed, N, V, K, scale, drift, y_in_topk)
    adv = torch.round(_rand(seed + 9, N, scale=2.0), decimals=1)  # mixed signs and zeros
    cfg = LossConfig(name="topk_kl_on_wrong", topk_kl_coef=coef, apo_k=K, apo_anchoring=anchoring)
    loss, m, topk = rows_loss(cfg, z, z_old, log_rho, y, adv)
    (g,) = torch.autograd.grad(loss, z)
    pi, mu, rho = torch.softmax(z.detach(), -1), torch.softmax(z_old, -1), log_rho.exp()
    w = (pi / mu).gather(1, y[:, None])  # [N, 1]
    assume(bool(((w - 0.8).abs() > 1e-9).all() and ((w - 1.2).abs() > 1e-9).all()))
    S = set_indicator(topk, y, V, anchoring)
    Z = (rho * S).sum(-1, keepdim=True)
    q = torch.where(Z > 0, rho * S / Z.clamp(min=1e-300), 0.0)
    A = adv[:, None]
    onehot = torch.nn.functional.one_hot(y, V).to(F64)
    flat = ((A > 0) & (w > 1.2)) | ((A < 0) & (w < 0.8))
    grpo = torch.where(flat, 0.0, A * w * (onehot - pi))
    shape = torch.where(A < 0, coef * (q - pi * (Z > 0)), 0.0)  # S empty: no term
    torch.testing.assert_close(-g, (grpo + shape) / N, **TIGHT)
    ce = -(torch.where(q > 0, q * pi.log(), 0.0)).sum(-1)
    neg = adv < 0
    assert m["topk_kl/ce_neg"] == pytest.approx(float(ce[neg].mean()) if neg.any() else 0.0, rel=1e-10, abs=1e-12)


def _cov_numpy(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """cov_t over the masked tokens, by numpy; NaN at pads."""
    a, lp, mk = adv.detach().numpy(), logp.detach().numpy(), mask.numpy()
    cov = (a - a[mk].mean()) * (lp - lp[mk].mean())
    return np.where(mk, cov, np.nan)


def _cov_batch(seed, B, T, drift):
    old = _rand(seed, B, T, scale=2.0) - 2.5
    logp = (old + _rand(seed + 1, B, T, scale=drift)).requires_grad_()
    adv = _rand(seed + 2, B, T, scale=2.0)
    mask = _rand(seed + 3, B, T) > -0.6
    mask[0, 0] = True
    return logp, old, adv, mask


@QUICK
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), T=st.integers(1, 8), frac=st.floats(0.01, 1.0),
       lb=st.floats(-1.0, 0.5), width=st.floats(0.05, 2.0))
def test_clip_cov_removes_gradient_of_random_band_tokens(seed, B, T, frac, lb, width):
    """At theta = theta_old (no PPO clip binds, every GRPO gradient is nonzero): the tokens whose
    gradient differs from GRPO's are exactly ceil(frac N) tokens of the band (or all of it if
    smaller), their gradient is 0, and the loss value is GRPO's; the choice follows the generator."""
    logp, old, adv, mask = _cov_batch(seed, B, T, 0.0)
    old = logp.detach().clone()
    cfg = LossConfig(name="clip_cov", cov_frac=frac, cov_lb=lb, cov_ub=lb + width)
    cov = _cov_numpy(adv, logp, mask)
    band = mask.numpy() & (cov > lb) & (cov < lb + width)
    on = cov[mask.numpy()]
    assume(bool(np.all(np.abs(on - lb) > 1e-9) and np.all(np.abs(on - lb - width) > 1e-9)))  # off the edges
    n_want = min(int(band.sum()), math.ceil(frac * int(mask.sum())))
    l_grpo, _ = policy_loss(LossConfig(name="grpo"), logp, old, adv, mask)
    (g_grpo,) = torch.autograd.grad(l_grpo, logp)
    picks = []
    for gseed in (seed, seed, seed + 1):
        loss, m = policy_loss(cfg, logp, old, adv, mask, generator=torch.Generator().manual_seed(gseed))
        (g,) = torch.autograd.grad(loss, logp)
        changed = (g != g_grpo).numpy()
        assert int(changed.sum()) == n_want and not changed[~band].any()
        assert not g[torch.from_numpy(changed)].any()
        assert loss.detach().item() == l_grpo.detach().item()
        assert m["cov/selected_frac"] == pytest.approx(n_want / int(mask.sum()))
        picks.append(changed)
    assert np.array_equal(picks[0], picks[1])  # same generator seed, same tokens


def test_clip_cov_choice_is_random_over_the_band():
    """Band of 10 tokens, 1 picked: over 30 generator seeds more than one token is chosen."""
    logp, _, adv, mask = _cov_batch(5, 4, 8, 0.0)
    mask[:] = True
    cov = _cov_numpy(adv, logp, mask)
    lb = float(np.sort(cov.ravel())[-10]) - 1e-9  # the 10 largest cov form the band
    cfg = LossConfig(name="clip_cov", cov_frac=1 / 32, cov_lb=lb, cov_ub=float(cov.max()) + 1.0)
    old = logp.detach().clone()
    chosen = set()
    for s in range(30):
        loss, m = policy_loss(cfg, logp, old, adv, mask, generator=torch.Generator().manual_seed(s))
        (g,) = torch.autograd.grad(loss, logp)
        assert int((g == 0).sum()) == 1
        idx = int(torch.nonzero(g.flatten() == 0)[0])
        assert cov.ravel()[idx] > lb
        chosen.add(idx)
    assert len(chosen) > 1


@QUICK
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), T=st.integers(1, 8), frac=st.floats(0.01, 1.0),
       coef=st.floats(0.1, 3.0), drift=st.floats(0.01, 0.15))
def test_kl_cov_penalises_top_cov_tokens(seed, B, T, frac, coef, drift):
    """d(loss)/d logp - GRPO's = coef sign(logp - old) / N on the ceil(frac N) tokens of largest
    cov (numpy) and 0 elsewhere; the loss exceeds GRPO's by coef sum |logp - old| / N over them."""
    logp, old, adv, mask = _cov_batch(seed, B, T, drift)
    cfg = LossConfig(name="kl_cov", cov_frac=frac, kl_cov_coef=coef)
    cov = _cov_numpy(adv, logp, mask)
    n_tok = int(mask.sum())
    n_sel = math.ceil(frac * n_tok)
    flat = np.where(mask.numpy(), cov, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")
    assume(n_sel == n_tok or flat[order[n_sel - 1]] - flat[order[n_sel]] > 1e-12)  # no tie at the cut
    sel = np.zeros(flat.size, dtype=bool)
    sel[order[:n_sel]] = True
    sel = torch.from_numpy(sel.reshape(B, T))
    loss, m = policy_loss(cfg, logp, old, adv, mask)
    (g,) = torch.autograd.grad(loss, logp)
    l_grpo, _ = policy_loss(LossConfig(name="grpo"), logp, old, adv, mask)
    (g_grpo,) = torch.autograd.grad(l_grpo, logp)
    diff = (logp - old).detach()
    torch.testing.assert_close(g - g_grpo, torch.where(sel, coef * diff.sign() / n_tok, 0.0), **TIGHT)
    assert float((loss - l_grpo).detach()) == pytest.approx(coef * float(diff.abs()[sel].sum()) / n_tok, abs=1e-12)
    assert m["cov/selected_frac"] == pytest.approx(n_sel / n_tok)


def test_kl_cov_has_no_gradient_at_theta_old():
    logp, _, adv, mask = _cov_batch(3, 3, 5, 0.0)
    old = logp.detach().clone()
    g = torch.autograd.grad(policy_loss(LossConfig(name="kl_cov", cov_frac=1.0), logp, old, adv, mask)[0], logp)[0]
    g0 = torch.autograd.grad(policy_loss(LossConfig(name="grpo"), logp, old, adv, mask)[0], logp)[0]
    assert torch.equal(g, g0)
