"""Property tests of the GRPO-family loss in apo_llm/objectives.py (docs/theory.md sections 1 and 6,
docs/objectives.md clipping and aggregation).

Every test builds its quantity with the shipped code (`policy_loss`, `kl_estimate`, `aggregate`)
and compares it, in float64, with an independent computation: torch autograd of a plain softmax
expression, exact enumeration over a small vocabulary, or a piecewise derivation by hand.

The "enumeration" trick used below: a position with vocabulary V is turned into a batch of V
one-token sequences, sequence y holding the sampled token y. With weights = pi (detached, the
sampling distribution), `seq-mean-token-sum-norm`, loss_norm_len = 1 and global_seqs = 1 the
shipped aggregation returns sum_y pi_y loss(y) = E_{y ~ pi}[loss(y)], so autograd of the loss is
the exact expected gradient of the sampled estimator.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from apo_llm.objectives import K3_CLAMP, LOG_RATIO_CLAMP, LossConfig, aggregate, kl_estimate, policy_loss

F64 = torch.float64
TIGHT = dict(rtol=0.0, atol=1e-10)
QUICK = settings(max_examples=40, deadline=None)


def _rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=F64) * 2.0 - 1.0) * scale


def _enumerate(cfg: LossConfig, z: torch.Tensor, adv: torch.Tensor, **extra) -> torch.Tensor:
    """E_{y~pi}[loss(y)] at one position, via the shipped policy_loss (see module docstring).

    z: [V] logits (requires_grad). adv: [V], advantage of the sequence that sampled y.
    extra: optional per-y tensors [V] (ref_logp, entropy, kl_full) reshaped to [V, 1].
    """
    logp = torch.log_softmax(z, -1)  # [V]
    pi = logp.exp().detach()
    col = lambda x: x.reshape(-1, 1)  # noqa: E731  [V] -> [V, 1]: one sequence per token
    kwargs = {k: col(v) for k, v in extra.items()}
    loss, _ = policy_loss(cfg, col(logp), col(logp.detach()), adv, torch.ones(len(z), 1, dtype=torch.bool),
                          weights=pi, global_seqs=1, **kwargs)
    return loss


def _sum_norm_cfg(name: str, **kw) -> LossConfig:
    return LossConfig(name=name, loss_agg="seq-mean-token-sum-norm", loss_norm_len=1, **kw)


# --------------------------------------------------------------------------------------------
# docs/theory.md section 1: one node
# --------------------------------------------------------------------------------------------


@QUICK
@given(seed=st.integers(0, 2**31), V=st.integers(2, 12), scale=st.floats(0.1, 4.0))
def test_expected_reward_gradient_through_policy_loss(seed, V, scale):
    """-grad_z E_{y~pi}[GRPO loss with A = r_y] at theta_old = d(pi.r)/dz = pi * (r - p)."""
    z = _rand(seed, V, scale=scale).requires_grad_()
    r = (_rand(seed + 1, V) > 0).to(F64)
    loss = _enumerate(_sum_norm_cfg("grpo"), z, r)
    (grad,) = torch.autograd.grad(loss, z)
    pi = torch.softmax(z.detach(), -1)
    p = (pi * r).sum()
    torch.testing.assert_close(-grad, pi * (r - p), **TIGHT)
    # and the same against autograd of the expected reward itself
    zz = z.detach().clone().requires_grad_()
    (g_pr,) = torch.autograd.grad((torch.softmax(zz, -1) * r).sum(), zz)
    torch.testing.assert_close(-grad, g_pr, **TIGHT)


@QUICK
@given(seed=st.integers(0, 2**31), V=st.integers(2, 12), scale=st.floats(0.1, 5.0))
def test_one_node_softmax_identities(seed, V, scale):
    """Documentation test of the pure-softmax formulas of docs/theory.md section 1 against autograd."""
    z0, lr = _rand(seed, V, scale=scale), _rand(seed + 7, V, scale=scale)
    log_rho = torch.log_softmax(lr, -1)
    rho = log_rho.exp()

    def grad(fn):
        z = z0.clone().requires_grad_()
        return torch.autograd.grad(fn(z), z)[0]

    pi = torch.softmax(z0, -1)
    log_pi = torch.log_softmax(z0, -1)
    kl_rev = (pi * (log_pi - log_rho)).sum()
    H = -(pi * log_pi).sum()
    # reverse KL: pi * (log pi - log rho - KL)
    g = grad(lambda z: (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - log_rho)).sum())
    torch.testing.assert_close(g, pi * (log_pi - log_rho - kl_rev), **TIGHT)
    # forward KL: pi - rho
    g = grad(lambda z: (rho * (log_rho - torch.log_softmax(z, -1))).sum())
    torch.testing.assert_close(g, pi - rho, **TIGHT)
    # entropy: -pi * (log pi + H)
    g_H = grad(lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum())
    torch.testing.assert_close(g_H, -pi * (log_pi + H), **TIGHT)
    # d log pi_a / dz = e_a - pi
    a = seed % V
    g = grad(lambda z: torch.log_softmax(z, -1)[a])
    torch.testing.assert_close(g, torch.eye(V, dtype=F64)[a] - pi, **TIGHT)
    # entropy gradient flow: dH = grad H . dz = -Cov_{a~pi}(log pi_a, dz_a)
    dz = _rand(seed + 3, V)
    cov = (pi * log_pi * dz).sum() - (pi * log_pi).sum() * (pi * dz).sum()
    torch.testing.assert_close((g_H * dz).sum(), -cov, **TIGHT)


@QUICK
@given(seed=st.integers(0, 2**31), V=st.integers(2, 10), coef=st.floats(0.01, 2.0))
def test_entropy_bonus_gradient(seed, V, coef):
    """policy_loss with ent_coef subtracts ent_coef * H_t: -grad_z loss = ent_coef * dH/dz."""
    z = _rand(seed, V, scale=2.0).requires_grad_()
    logp = torch.log_softmax(z, -1)
    H = -(logp.exp() * logp).sum()
    cfg = LossConfig(name="grpo", ent_coef=coef)
    lp = logp[:1].reshape(1, 1)
    loss, metrics = policy_loss(cfg, lp, lp.detach(), torch.zeros(1), torch.ones(1, 1), entropy=H.reshape(1, 1))
    (g,) = torch.autograd.grad(loss, z)
    pi, log_pi = logp.exp().detach(), logp.detach()
    torch.testing.assert_close(-g, coef * (-pi * (log_pi + H.detach())), **TIGHT)
    assert metrics["entropy"] == pytest.approx(float(H.detach()), abs=1e-12)


def test_restoring_force_on_collapsed_child():
    """A child with pi_a -> 0 and rho_a > 0: reverse KL pushes it up by ~ pi_a log(rho_a/pi_a) -> 0,
    forward KL by rho_a - pi_a -> rho_a (does not vanish)."""
    V, a = 6, 2
    log_rho = torch.log_softmax(torch.linspace(-0.5, 0.5, V, dtype=F64), -1)
    rho = log_rho.exp()
    rev, fwd = [], []
    for depth in (4.0, 8.0, 16.0, 30.0):
        z = torch.zeros(V, dtype=F64)
        z[a] = -depth
        z.requires_grad_()
        log_pi = torch.log_softmax(z, -1)
        (g_rev,) = torch.autograd.grad((log_pi.exp() * (log_pi - log_rho)).sum(), z, retain_graph=True)
        (g_fwd,) = torch.autograd.grad((rho * (log_rho - log_pi)).sum(), z)
        pi_a = float(log_pi[a].detach().exp())
        rev.append(-float(g_rev[a]))
        fwd.append(-float(g_fwd[a]))
        # restoring force = pi_a (log(rho_a/pi_a) + KL): the leading term is pi_a log(rho_a/pi_a)
        assert rev[-1] > 0 and fwd[-1] > 0
        assert fwd[-1] == pytest.approx(float(rho[a]) - pi_a, abs=1e-12)
    assert rev[-1] < 1e-10 and rev == sorted(rev, reverse=True)  # vanishes with the child
    assert fwd[-1] == pytest.approx(float(rho[a]), abs=1e-12)  # tends to rho_a


# --------------------------------------------------------------------------------------------
# docs/theory.md section 6: KL estimators as losses, by exact enumeration
# --------------------------------------------------------------------------------------------


@QUICK
@given(seed=st.integers(0, 2**31), V=st.integers(2, 10), scale=st.floats(0.05, 1.0),
       est=st.sampled_from(["k1", "k2", "k3"]), name=st.sampled_from(["grpo_kl", "kl_on_wrong"]))
def test_kl_estimator_expected_gradients(seed, V, scale, est, name):
    """E_{y~pi}[grad_z k(y)]: k1 -> 0, k2 -> reverse-KL gradient, k3 -> pi - rho (forward KL).

    A = -1 on every sequence so that kl_on_wrong also applies its KL everywhere; the policy term
    contributes grad_z E[-A w] = |A| * sum_y pi_y (e_y - pi) = 0 at theta_old, so only the KL is left.
    """
    z = _rand(seed, V, scale=scale).requires_grad_()
    log_rho = torch.log_softmax(_rand(seed + 11, V, scale=scale), -1)
    log_pi = torch.log_softmax(z.detach(), -1)
    d = log_rho - log_pi
    assume(bool(((d.exp() - 1 - d) < K3_CLAMP - 1e-6).all()))  # formula holds where k3 is unclamped
    cfg = _sum_norm_cfg(name, kl_coef=1.0, kl_estimator=est)
    loss = _enumerate(cfg, z, -torch.ones(V, dtype=F64), ref_logp=log_rho)
    (g,) = torch.autograd.grad(loss, z)
    pi, rho = log_pi.exp(), log_rho.exp()
    kl_rev = (pi * (log_pi - log_rho)).sum()
    expected = {"k1": torch.zeros(V, dtype=F64), "k2": pi * (log_pi - log_rho - kl_rev), "k3": pi - rho}[est]
    torch.testing.assert_close(g, expected, **TIGHT)


@QUICK
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), T=st.integers(1, 5), scale=st.floats(0.01, 2.0))
def test_kl_estimate_values(seed, B, T, scale):
    """k1, k2, k3 values with delta = log rho - log pi, inside the clamps."""
    logp, ref = _rand(seed, B, T, scale=scale), _rand(seed + 1, B, T, scale=scale)
    d = ref - logp
    torch.testing.assert_close(kl_estimate("k1", logp, ref, None), logp - ref, **TIGHT)
    torch.testing.assert_close(kl_estimate("k2", logp, ref, None), 0.5 * (logp - ref) ** 2, **TIGHT)
    k3 = torch.exp(ref) / torch.exp(logp) - 1.0 - d
    torch.testing.assert_close(kl_estimate("k3", logp, ref, None), k3.clamp(max=K3_CLAMP), **TIGHT)
    full = _rand(seed + 2, B, T)
    assert kl_estimate("full", logp, None, full) is full


def test_k3_and_log_ratio_clamps():
    """k3 is capped at +10 and log-ratios at +-20; beyond a clamp the value is the cap and the
    gradient is exactly zero."""
    assert K3_CLAMP == 10.0 and LOG_RATIO_CLAMP == 20.0
    # delta = ref - logp = 3: k3 = e^3 - 4 = 16.1 > 10 -> 10, no gradient; delta = 2: 4.39, gradient 1 - e^2
    logp = torch.tensor([[-3.0, -2.0, -30.0, 30.0]], dtype=F64, requires_grad=True)
    ref = torch.zeros(1, 4, dtype=F64)
    k3 = kl_estimate("k3", logp, ref, None)
    (g,) = torch.autograd.grad(k3.sum(), logp)
    assert k3[0, 0] == K3_CLAMP and g[0, 0] == 0.0
    assert float(k3.detach()[0, 1]) == pytest.approx(math.exp(2) - 3, abs=1e-12)
    assert float(g[0, 1]) == pytest.approx(1 - math.exp(2), abs=1e-12)
    assert k3[0, 2] == K3_CLAMP and g[0, 2] == 0.0
    # delta = -30: k3 = e^-30 + 29 is also capped at 10 (k3 > 10 for every delta < -11)
    assert k3[0, 3] == K3_CLAMP and g[0, 3] == 0.0
    k1 = kl_estimate("k1", logp, ref, None)
    k2 = kl_estimate("k2", logp, ref, None)
    (g1,) = torch.autograd.grad(k1.sum(), logp)
    (g2,) = torch.autograd.grad(k2.sum(), logp)
    assert k1[0, 2] == -20.0 and k1[0, 3] == 20.0 and g1[0, 2] == 0.0 and g1[0, 3] == 0.0
    assert k2[0, 2] == 200.0 and g2[0, 2] == 0.0 and g1[0, 0] == 1.0

    # the policy ratio: log(pi/pi_old) = +25 -> w = e^20 with zero gradient (A < 0 keeps the
    # unclipped branch), -25 -> w = e^-20 with zero gradient (A > 0 keeps the unclipped branch)
    cfg = LossConfig(name="grpo")
    for lr, adv, w in ((25.0, -1.0, math.exp(20)), (-25.0, 1.0, math.exp(-20)), (19.0, -1.0, math.exp(19))):
        lp = torch.tensor([[lr]], dtype=F64, requires_grad=True)
        loss, _ = policy_loss(cfg, lp, torch.zeros(1, 1, dtype=F64), torch.tensor([adv], dtype=F64),
                              torch.ones(1, 1))
        (g,) = torch.autograd.grad(loss, lp)
        assert float(loss.detach()) == pytest.approx(-adv * w, rel=1e-12)
        assert float(g) == (0.0 if abs(lr) > 20 else pytest.approx(-adv * w, rel=1e-12))


def test_k3_clamp_removes_the_forward_kl_restoring_force():
    """Consequence of the verl clamp worth knowing: once rho_a / pi_a > ~13.6 (k3 > 10) the
    sampled k3 penalty no longer restores a collapsed child, unlike the exact forward KL."""
    V, a = 5, 0
    log_rho = torch.log_softmax(torch.zeros(V, dtype=F64), -1)  # rho_a = 0.2
    z = torch.zeros(V, dtype=F64)
    z[a] = -12.0  # pi_a ~ 2.5e-6: rho_a / pi_a ~ 8e4
    z.requires_grad_()
    loss = _enumerate(_sum_norm_cfg("grpo_kl", kl_coef=1.0, kl_estimator="k3"), z, torch.zeros(V, dtype=F64),
                      ref_logp=log_rho)
    (g,) = torch.autograd.grad(loss, z)
    pi_a = float(torch.softmax(z.detach(), -1)[a])
    assert -float(g[a]) < 10 * pi_a  # O(pi_a): no restoring force
    assert float(log_rho[a].exp()) - pi_a > 0.19  # what the unclamped forward KL would give


# --------------------------------------------------------------------------------------------
# clipping: gradient w.r.t. logp vs an independent piecewise derivation
# --------------------------------------------------------------------------------------------


def piecewise_grpo(w: float, A: float, el: float, eh: float, c) -> tuple[float, float]:
    """(loss, dloss/dw) of the PPO surrogate, written out case by case.

    A > 0: loss = -A min(w, 1 + eh)                     flat for w > 1 + eh
    A < 0: loss = |A| min(max(w, 1 - el), c)            flat for w < 1 - el and (dual) w > c
    """
    if A > 0:
        return (-A * w, -A) if w < 1 + eh else (-A * (1 + eh), 0.0)
    if A < 0:
        if w < 1 - el:
            return -A * (1 - el), 0.0
        if c is not None and w > c:
            return -A * c, 0.0
        return -A * w, -A
    return 0.0, 0.0


def _far(x: torch.Tensor, edges) -> bool:
    return all(bool(((x - e).abs() > 1e-6).all()) for e in edges if e is not None)


@QUICK
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), T=st.integers(1, 6),
       preset=st.sampled_from(["grpo", "dapo", "drawn"]), el=st.floats(0.05, 0.6), eh=st.floats(0.05, 0.6),
       clip_c=st.one_of(st.none(), st.floats(1.05, 3.0)))
def test_clipping_piecewise(seed, B, T, preset, el, eh, clip_c):
    """Loss, gradient and clip-fraction metrics of grpo/dapo vs `piecewise_grpo` token by token."""
    kw = dict(eps_low=el, eps_high=eh) if preset == "drawn" else {}
    cfg = LossConfig(name="dapo" if preset == "dapo" else "grpo", clip_c=clip_c, **kw)
    el, eh = cfg.eps_low, cfg.eps_high
    old = _rand(seed, B, T, scale=3.0) - 2.0
    logp = (old + _rand(seed + 1, B, T, scale=1.0)).requires_grad_()
    adv = torch.round(_rand(seed + 2, B, T, scale=2.0), decimals=1)  # includes A = 0
    mask = _rand(seed + 3, B, T) > -0.6
    assume(bool(mask.any()))
    w = (logp - old).exp().detach()
    assume(_far(w, (1 - el, 1 + eh, clip_c)))
    loss, m = policy_loss(cfg, logp, old, adv, mask)
    (g,) = torch.autograd.grad(loss, logp)

    n = int(mask.sum())
    exp_loss, flat = 0.0, {"pos": 0, "neg": 0, "low": 0, "high": 0, "dual": 0}
    for b in range(B):
        for t in range(T):
            wi, Ai = float(w[b, t]), float(adv[b, t])
            li, gi = piecewise_grpo(wi, Ai, el, eh, clip_c)
            if not mask[b, t]:
                assert g[b, t] == 0.0
                continue
            exp_loss += li
            assert float(g[b, t]) == pytest.approx(gi * wi / n, abs=1e-12)  # chain rule dw/dlogp = w
            if gi == 0.0 and Ai != 0.0:
                assert g[b, t] == 0.0  # flat means exactly flat
                flat["pos" if Ai > 0 else "neg"] += 1
                flat["high" if Ai > 0 else ("low" if wi < 1 - el else "dual")] += 1
    assert float(loss.detach()) == pytest.approx(exp_loss / n, abs=1e-12)
    n_pos, n_neg = int((mask & (adv > 0)).sum()), int((mask & (adv < 0)).sum())
    assert m["clip_ratio/low_mean"] == pytest.approx(flat["low"] / n)
    assert m["clip_ratio/high_mean"] == pytest.approx(flat["high"] / n)
    assert m["clip_ratio/dual_mean"] == pytest.approx(flat["dual"] / n)
    assert m["clip_ratio/region_mean"] == pytest.approx((flat["pos"] + flat["neg"]) / n)
    assert m["clip_frac/pos"] == pytest.approx(flat["pos"] / max(n_pos, 1))
    assert m["clip_frac/neg"] == pytest.approx(flat["neg"] / max(n_neg, 1))
    assert m["frac_neg_tokens"] == pytest.approx(n_neg / n)


def test_dapo_preset_and_defaults():
    """Issue defaults: eps 0.2/0.2, dapo clip-higher 0.28; explicit values override presets."""
    cfg = LossConfig()
    assert (cfg.name, cfg.eps_low, cfg.eps_high, cfg.clip_c, cfg.kl_coef, cfg.kl_estimator) == \
        ("grpo", 0.2, 0.2, None, 0.0, "k3")
    assert (cfg.apo_lambda, cfg.apo_beta, cfg.apo_k, cfg.apo_clip, cfg.loss_agg, cfg.loss_norm_len) == \
        (1.05, 0.1, 8, "rectified", "token-mean", None)
    assert (LossConfig(name="dapo").eps_low, LossConfig(name="dapo").eps_high) == (0.2, 0.28)
    assert LossConfig(name="dapo", eps_high=0.3).eps_high == 0.3


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------


@QUICK
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), T=st.integers(1, 7), weighted=st.booleans(),
       norm_len=st.one_of(st.none(), st.integers(1, 12)), g_tok=st.one_of(st.none(), st.integers(1, 50)),
       g_seq=st.one_of(st.none(), st.integers(1, 9)))
def test_aggregate_formulas(seed, B, T, weighted, norm_len, g_tok, g_seq):
    """The three reductions against loops over sequences and tokens (pads hold NaN: no leak)."""
    lt = _rand(seed, B, T, scale=3.0)
    mask = _rand(seed + 1, B, T) > -0.5
    lt = torch.where(mask, lt, torch.full_like(lt, float("nan")))
    w = (_rand(seed + 2, B) + 1.5) if weighted else None
    wl = [1.0] * B if w is None else w.tolist()
    rows = [[float(lt[b, t]) for t in range(T) if mask[b, t]] for b in range(B)]
    n_tok = g_tok if g_tok is not None else sum(len(r) for r in rows)
    n_seq = g_seq if g_seq is not None else B
    L = norm_len if norm_len is not None else T
    kw = dict(weights=w, global_tokens=g_tok, global_seqs=g_seq, loss_norm_len=norm_len)
    tok = aggregate(lt, mask, "token-mean", **kw)
    if n_tok > 0:
        assert float(tok) == pytest.approx(sum(wb * sum(r) for wb, r in zip(wl, rows)) / n_tok, abs=1e-12)
    seq = aggregate(lt, mask, "seq-mean-token-mean", **kw)
    expected = sum(wb * (sum(r) / len(r) if r else 0.0) for wb, r in zip(wl, rows)) / n_seq
    assert float(seq) == pytest.approx(expected, abs=1e-12)
    dr = aggregate(lt, mask, "seq-mean-token-sum-norm", **kw)
    assert float(dr) == pytest.approx(sum(wb * sum(r) for wb, r in zip(wl, rows)) / (n_seq * L), abs=1e-12)


def test_token_mean_of_an_all_padded_batch_is_zero():
    """A micro-batch without response tokens contributes 0 (not 0/0 = NaN) to the loss."""
    logp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss, m = policy_loss(LossConfig(loss_agg=agg), logp, logp.detach(), torch.ones(2, dtype=F64),
                              torch.zeros(2, 3))
        (g,) = torch.autograd.grad(loss, logp)
        assert float(loss.detach()) == 0.0 and m["loss"] == 0.0 and not g.any(), agg


def _random_apo_batch(seed: int, B: int, T: int, K: int):
    """A random APO batch with KL reference and entropy; leaves for every differentiable input."""
    old = _rand(seed, B, T, scale=2.0) - 2.5
    logp = (old + _rand(seed + 1, B, T, scale=0.4)).requires_grad_()
    anchor_logp = (_rand(seed + 2, B, T, K, scale=1.0) - 3.0).requires_grad_()
    batch = dict(
        logp=logp, old_logp=old, advantages=_rand(seed + 3, B, scale=2.0),
        mask=_rand(seed + 4, B, T) > -0.4, ref_logp=old + _rand(seed + 5, B, T, scale=0.3),
        anchor_logp=anchor_logp, anchor_ref_logp=_rand(seed + 6, B, T, K) - 3.0,
        anchor_is_sampled=_rand(seed + 7, B, T, K) > 0.6,
        entropy=(_rand(seed + 8, B, T) + 2.0).requires_grad_(),
        weights=_rand(seed + 9, B) + 1.5,
    )
    return batch


@pytest.mark.filterwarnings("ignore:LossConfig.*positive-only:UserWarning")  # beta 0.3 draws: intended
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(2, 7), T=st.integers(1, 6), K=st.integers(1, 4),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
       apo_clip=st.sampled_from(["rectified", "push_only"]), clip_c=st.one_of(st.none(), st.just(3.0)),
       cuts=st.lists(st.integers(1, 6), min_size=0, max_size=4), weighted=st.booleans())
def test_micro_batching_matches_full_batch(seed, B, T, K, agg, apo_clip, clip_c, cuts, weighted):
    """Summing micro-batch losses (global_tokens / global_seqs = whole-batch counts) gives the
    full-batch loss and, at 1e-12, the full-batch gradient of every differentiable input."""
    cfg = LossConfig(name="apo", loss_agg=agg, loss_norm_len=8, kl_coef=0.05, ent_coef=0.01,
                     apo_clip=apo_clip, clip_c=clip_c, apo_beta=0.3)
    data = _random_apo_batch(seed, B, T, K)
    if not weighted:
        data["weights"] = None
    assume(bool(data["mask"].any()))
    leaves = [data["logp"], data["anchor_logp"], data["entropy"]]
    full, _ = policy_loss(cfg, **data)
    g_full = torch.autograd.grad(full, leaves)

    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    bounds = sorted({c % B for c in cuts} - {0})
    n_tok, n_seq = float(data["mask"].sum()), float(B)
    total = 0.0
    for idx in torch.tensor_split(perm, bounds):  # random micro-batches of random sizes
        micro = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        part, _ = policy_loss(cfg, **micro, global_tokens=n_tok, global_seqs=n_seq)
        total = total + part
    g_micro = torch.autograd.grad(total, leaves)
    assert float(total.detach()) == pytest.approx(float(full.detach()), abs=1e-12)
    for a, b in zip(g_micro, g_full):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12)


@QUICK
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), T=st.integers(1, 6),
       est=st.sampled_from(["k1", "k2", "k3", "full"]), coef=st.floats(0.01, 1.0),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]))
def test_kl_on_wrong_applies_kl_only_to_negative_tokens(seed, B, T, est, coef, agg):
    """Token by token: kl_on_wrong has grpo_kl's gradient where A < 0 and plain GRPO's where
    A >= 0 (no KL there at all: kl_full gets no gradient)."""
    old = _rand(seed, B, T, scale=2.0) - 2.5
    mask = _rand(seed + 4, B, T) > -0.5
    adv = torch.round(_rand(seed + 3, B, T, scale=2.0), decimals=1)
    ref = old + _rand(seed + 5, B, T, scale=0.5)
    kl_full0 = _rand(seed + 6, B, T) + 1.0

    def grads(name: str, kl_coef: float):
        logp = (old + _rand(seed + 1, B, T, scale=0.4)).requires_grad_()
        kl_full = kl_full0.clone().requires_grad_()
        cfg = LossConfig(name=name, kl_coef=kl_coef, kl_estimator=est, loss_agg=agg)
        loss, _ = policy_loss(cfg, logp, old, adv, mask, ref_logp=ref, kl_full=kl_full)
        return torch.autograd.grad(loss, [logp, kl_full], allow_unused=True)

    g_wrong, g_wrong_full = grads("kl_on_wrong", coef)
    g_all, g_all_full = grads("grpo_kl", coef)
    g_plain, _ = grads("grpo", 0.0)
    neg = adv < 0
    assert torch.equal(g_wrong[neg], g_all[neg]) and torch.equal(g_wrong[~neg], g_plain[~neg])
    if est == "full":
        assert torch.equal(g_wrong_full[neg], g_all_full[neg]) and not g_wrong_full[~neg].any()


def test_diagnostics_are_weighted_by_sequence_weights():
    """With weights (the simulator's exact mode), clip fractions are shares of weight, not of rows."""
    cfg = LossConfig(name="grpo")
    old = torch.zeros(2, 1, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5)], [0.0]], dtype=torch.float64)  # row 0: w = 1.5 > 1.2, clipped
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    _, unweighted = policy_loss(cfg, logp, old, adv, mask)
    _, weighted = policy_loss(cfg, logp, old, adv, mask, weights=torch.tensor([0.9, 0.1], dtype=torch.float64))
    assert unweighted["clip_frac/pos"] == pytest.approx(0.5)
    assert weighted["clip_frac/pos"] == pytest.approx(0.9)
    assert weighted["ratio/mean"] == pytest.approx(0.9 * 1.5 + 0.1 * 1.0)
    assert weighted["num_tokens"] == 2.0
