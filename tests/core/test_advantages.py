"""Group advantage estimators (docs/objectives.md table) and docs/theory.md section 4: in expectation every
exchangeable group estimator moves along the policy gradient, E[(1/G) sum_i A_i grad log pi(a_i)]
= d(p, G) grad p with d = c_1 - c_0 from `expected_group_advantage`.

Formulas are recomputed here with the `statistics` and `math` modules, group by group; the
direction claim is checked by exhaustive enumeration of all G-tuples of arms of a small bandit.
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apo_llm.objectives import ADVANTAGE_ESTIMATORS, LossConfig, expected_group_advantage, group_advantages, policy_loss

F64 = torch.float64
QUICK = settings(max_examples=40, deadline=None)


def reference_advantages(group: list[float], estimator: str, std: str, eps: float, lambda_pos: float, k) -> list[float]:
    """One group's advantages straight from the docs/objectives.md table."""
    G, mean = len(group), statistics.fmean(group)
    if estimator == "grpo":
        if len(set(group)) == 1:
            return [0.0] * G
        s = statistics.stdev(group) if std == "unbiased" else statistics.pstdev(group)
        return [(r - mean) / (s + eps) for r in group]
    if estimator == "dr_grpo":
        return [r - mean for r in group]
    if estimator == "rloo":
        return [r - (sum(group) - r) / (G - 1) for r in group]
    if estimator in ("reinforce", "psr"):
        return list(group)
    if estimator == "nsr":
        return [r - 1.0 for r in group]
    if estimator == "w_reinforce":
        return [lambda_pos if r == 1.0 else -1.0 for r in group]
    assert estimator == "passk"
    n, c = G, int(sum(group))
    rho = 1 - math.comb(n - c, k) / math.comb(n, k)
    sigma = math.sqrt(rho * (1 - rho))
    if sigma + eps == 0.0:  # c = 0 or rho = 1: both numerators are 0 as well; 0/(0 + eps) = 0
        return [0.0] * G
    a_pos = (1 - rho) / (sigma + eps)
    a_neg = (1 - rho - math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)) / (sigma + eps) if c < n else 0.0
    return [a_pos if r == 1.0 else a_neg for r in group]


@QUICK
@given(data=st.data(), G=st.integers(2, 8), n_groups=st.integers(1, 4),
       estimator=st.sampled_from(ADVANTAGE_ESTIMATORS), std=st.sampled_from(["unbiased", "population"]),
       eps=st.sampled_from([1e-6, 1e-3, 0.0]), lambda_pos=st.floats(0.01, 2.0), binary=st.booleans())
def test_estimators_match_table(data, G, n_groups, estimator, std, eps, lambda_pos, binary):
    """Every estimator, group by group, float64, including all-equal groups and eps = 0."""
    binary = binary or estimator in ("w_reinforce", "passk")
    # real rewards on a 0.01 grid: distinct values differ enough for rel 1e-9 comparisons
    value = st.sampled_from([0.0, 1.0]) if binary else st.integers(-500, 500).map(lambda x: x / 100)
    rewards = data.draw(st.lists(value, min_size=G * n_groups, max_size=G * n_groups))
    k = data.draw(st.integers(1, G)) if estimator == "passk" else None
    got = group_advantages(torch.tensor(rewards, dtype=F64), G, estimator=estimator, std=std, eps=eps,
                           lambda_pos=lambda_pos, k=k)
    assert got.dtype == F64 and got.shape == (G * n_groups,)
    for i in range(n_groups):
        group = rewards[i * G:(i + 1) * G]
        want = reference_advantages(group, estimator, std, eps, lambda_pos, k)
        if estimator == "grpo" and len(set(group)) > 1 and eps == 0.0:
            assert got[i * G:(i + 1) * G].tolist() == pytest.approx(want, rel=1e-9)
        else:
            assert got[i * G:(i + 1) * G].tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


@QUICK
@example(value=0.998, G=4, dtype=torch.float32, std="unbiased", eps=1e-6)  # gave |A| = 0.056 before the fix
@example(value=1.0, G=3, dtype=torch.float64, std="population", eps=0.0)  # gave NaN before the fix
@given(value=st.floats(-10.0, 10.0, allow_subnormal=False), G=st.integers(2, 16),
       dtype=st.sampled_from([torch.float32, torch.float64]), std=st.sampled_from(["unbiased", "population"]),
       eps=st.sampled_from([1e-6, 0.0]))
def test_grpo_all_equal_groups_are_exactly_zero(value, G, dtype, std, eps):
    """No advantage from a group without reward variance, whatever the dtype or value."""
    adv = group_advantages(torch.full((2 * G,), value, dtype=dtype), G, std=std, eps=eps)
    assert adv.dtype == dtype and not adv.any()
    # python floats give the default dtype (float32) and the same zeros
    assert not group_advantages([value] * G, G, std=std, eps=eps).any()


def test_population_vs_unbiased_std():
    """For G = 4 rewards (1, 0, 0, 0): squared deviations sum to 3/4, so the unbiased std is
    sqrt(3/4 / 3) = 1/2 and the population std sqrt(3/4 / 4); A_0 = (3/4) / std."""
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    unb = group_advantages(r, 4, std="unbiased", eps=0.0)
    pop = group_advantages(r, 4, std="population", eps=0.0)
    assert float(unb[0]) == pytest.approx(1.5, rel=1e-12)
    assert float(pop[0]) == pytest.approx(0.75 / math.sqrt(3 / 16), rel=1e-12)
    assert float(pop[0] / unb[0]) == pytest.approx(math.sqrt(4 / 3), rel=1e-12)


def test_passk_worked_example():
    """n = 4, c = 1, k = 2: rho = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2,
    A_pos = 1, A_neg = (1/2 - C(2,1)/C(3,1)) / (1/2) = -1/3 (eps = 0); rho = 1 gives zeros."""
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), 4, "passk", k=2, eps=0.0)
    assert adv.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3], rel=1e-12)
    # n - c < k: every k-subset holds a correct answer, rho = 1, sigma = 0: no signal, no 0/0
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64), 4, "passk", k=3, eps=0.0)
    assert not adv.any()
    # c = 0 and c = n: all-equal groups, zero advantages (used to raise ZeroDivisionError at eps = 0)
    for rewards in ([0.0] * 4, [1.0] * 4):
        assert not group_advantages(torch.tensor(rewards, dtype=F64), 4, "passk", k=2, eps=0.0).any()


# --------------------------------------------------------------------------------------------
# docs/theory.md section 4: direction invariance
# --------------------------------------------------------------------------------------------


def _est_kwargs(estimator: str):
    if estimator == "grpo_pop":
        return dict(estimator="grpo", std="population")
    if estimator == "w_reinforce":
        return dict(estimator="w_reinforce", lambda_pos=0.1)
    if estimator.startswith("passk"):
        return dict(estimator="passk", k=int(estimator[-1]))
    return dict(estimator=estimator)


DIRECTION_ESTIMATORS = ["grpo", "grpo_pop", "dr_grpo", "rloo", "reinforce", "nsr", "w_reinforce", "passk1", "passk2"]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), G=st.integers(2, 5), V=st.integers(2, 4), scale=st.floats(0.1, 2.0))
@pytest.mark.parametrize("estimator", DIRECTION_ESTIMATORS)
def test_expected_direction_is_policy_gradient(estimator, seed, G, V, scale):
    """Exhaustive enumeration over all V^G tuples of arms: the expected group surrogate, built with
    the shipped policy_loss (weights = P(tuple), one token per sample), has gradient d * grad p."""
    kw = _est_kwargs(estimator)  # passk's k <= 2 <= G
    gen = torch.Generator().manual_seed(seed)
    z = ((torch.rand(V, generator=gen, dtype=F64) * 2 - 1) * scale).requires_grad_()
    correct = torch.zeros(V, dtype=F64)
    correct[torch.randperm(V, generator=gen)[: 1 + seed % (V - 1)]] = 1.0  # mixed correct / wrong arms
    logp = torch.log_softmax(z, -1)
    tuples = torch.tensor(list(itertools.product(range(V), repeat=G)))  # [V^G, G] arm of sample i
    prob = logp.detach()[tuples].sum(-1).exp()  # [V^G] P(tuple) under pi_old = pi
    adv = group_advantages(correct[tuples].reshape(-1), G, **kw)  # [V^G * G]
    lp = logp[tuples].reshape(-1, 1)  # [V^G * G, 1]: one sequence per sample, one token each
    cfg = LossConfig(name="grpo", loss_agg="seq-mean-token-sum-norm", loss_norm_len=1)
    loss, _ = policy_loss(cfg, lp, lp.detach(), adv, torch.ones_like(lp, dtype=torch.bool),
                          weights=prob.repeat_interleave(G), global_seqs=G)  # sum_t P_t (1/G) sum_i (-A w)
    (g,) = torch.autograd.grad(loss, z)
    pi = logp.detach().exp()
    p = (pi * correct).sum()
    c0, c1 = expected_group_advantage(p, G, **kw)
    torch.testing.assert_close(-g, (c1 - c0) * pi * (correct - p), rtol=1e-10, atol=1e-12)


@QUICK
@given(p=st.floats(0.0, 1.0), G=st.integers(2, 12), lam=st.floats(0.01, 2.0))
def test_closed_form_direction_factors(p, G, lam):
    """d = c_1 - c_0: Dr. GRPO (G-1)/G, RLOO 1, REINFORCE 1, NSR 1, W-REINFORCE 1 + lambda."""
    pt = torch.tensor(p, dtype=F64)
    for kw, d in ((dict(estimator="dr_grpo"), (G - 1) / G), (dict(estimator="rloo"), 1.0),
                  (dict(estimator="reinforce"), 1.0), (dict(estimator="psr"), 1.0), (dict(estimator="nsr"), 1.0),
                  (dict(estimator="w_reinforce", lambda_pos=lam), 1.0 + lam)):
        c0, c1 = expected_group_advantage(pt, G, **kw)
        assert float(c1 - c0) == pytest.approx(d, rel=1e-12, abs=1e-12), kw


@QUICK
@given(p=st.floats(0.0, 1.0), G=st.integers(2, 8), estimator=st.sampled_from(DIRECTION_ESTIMATORS))
def test_expected_group_advantage_by_enumeration(p, G, estimator):
    """c_r = E[A_i | r_i = r] by enumerating all 2^G reward vectors with their Bernoulli(p)
    probabilities, independent of the binomial sum in the shipped code."""
    kw = _est_kwargs(estimator)  # passk's k <= 2 <= G
    vecs = list(itertools.product([0.0, 1.0], repeat=G))
    adv = group_advantages(torch.tensor(vecs, dtype=F64).reshape(-1), G, **kw).view(len(vecs), G)
    num, den = [0.0, 0.0], [0.0, 0.0]
    for v, a in zip(vecs, adv.tolist()):
        rest = v[1:]
        w = math.prod(p if x else 1 - p for x in rest)  # P(others) given sample 0's reward
        num[int(v[0])] += w * a[0]
        den[int(v[0])] += w
    c0, c1 = expected_group_advantage(torch.tensor(p, dtype=F64), G, **kw)
    assert float(c0) == pytest.approx(num[0] / den[0], rel=1e-10, abs=1e-12)
    assert float(c1) == pytest.approx(num[1] / den[1], rel=1e-10, abs=1e-12)


def test_worked_direction_numbers():
    """docs/theory.md: p = 0.5242, G = 5."""
    p = torch.tensor(0.5242, dtype=F64)
    want = {"grpo": 1.5432, "grpo_pop": 1.7254, "dr_grpo": 0.8, "rloo": 1.0, "w_reinforce": 1.1}
    for est, d in want.items():
        c0, c1 = expected_group_advantage(p, 5, **_est_kwargs(est))
        assert float(c1 - c0) == pytest.approx(d, abs=5e-5), est


def test_grpo_direction_tends_to_inverse_std():
    """GRPO's d(p, G) -> 1 / sqrt(p (1 - p)) as G grows, from below, for both std choices."""
    for p in (0.2, 0.5, 0.9):
        limit = 1 / math.sqrt(p * (1 - p))
        for std in ("unbiased", "population"):
            gaps = []
            for G in (5, 40, 320):
                c0, c1 = expected_group_advantage(torch.tensor(p, dtype=F64), G, estimator="grpo", std=std)
                gaps.append(limit - float(c1 - c0))
            assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] / limit < 0.01, (p, std, gaps)
