"""apo_toy dynamics: exact mode = expectation of the sampled loss; sampled mode mechanics.

The exact-mode identity is checked two independent ways:
  * by enumeration: every group of G leaves of a tiny tree, weighted by its probability under
    pi_old, goes through the sampled path (`sampled_loss` -> policy_loss) in one batch; the
    expected loss and its gradient must equal `exact_loss` at theta != theta_old (clipping on);
  * statistically: the mean gradient of many sampled first updates against the exact gradient,
    with a tolerance of a few standard errors (1/sqrt(samples)).
The leaf path (sequence-coupled losses) is checked against the same enumeration, and against the
edge path on per-token losses.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from apo_llm.objectives import group_advantages
from apo_toy import METHODS, Suite, SuiteSpec, build_suite, get_method
from apo_toy.dynamics import exact_batch, exact_loss, leaf_rollouts, sample_rollouts, sampled_loss
from apo_toy.training import exact_update, sampled_update

torch_default_dtype = torch.float64  # every test here runs in float64 (tests/conftest.py)

LOSS_METHODS = [m for m in METHODS if not METHODS[m].yardstick]
# Clip-Cov / KL-Cov select tokens by a batch statistic (exact mode refuses them); GSPO / GMPO / SimKO
# (entropy quantile) read the whole sequence: the edge path refuses them, the leaf path runs them (tests below)
EXACT_METHODS = [m for m in LOSS_METHODS if not (METHODS[m].loss_config().batch_coupled
                                                 or METHODS[m].loss_config().sequence_coupled)]


def tiny_suite(seed=0, b=3, depth=2, prompts=1, top_k=2) -> Suite:
    return build_suite(SuiteSpec(n_prompts=prompts, branching=b, depth=depth, top_k=top_k, seed=seed,
                                 n_extra_correct=1, hardness_high=1.0))


def enumerated_expectation(suite, cfg, logits, logits_old, G, adv_kwargs):
    """E over all G-tuples of leaves (P = 1) of the sampled loss, via one weighted policy_loss call."""
    L, D = suite.n_leaves, suite.depth
    pi_old = torch.softmax(logits_old, -1)
    from apo_toy.tree import reach_and_leaf_logp

    _, leaf_logp = reach_and_leaf_logp(torch.log_softmax(logits_old, -1), D)
    groups = torch.tensor(list(itertools.product(range(L), repeat=G)))  # [L^G, G]
    prob = leaf_logp[0].exp()[groups].prod(-1)  # [L^G] probability of the ordered group
    leaf = groups.reshape(-1)
    roll = leaf_rollouts(suite, torch.zeros_like(leaf), leaf)
    adv = group_advantages(roll["reward"], G, **adv_kwargs)
    old = torch.log_softmax(logits_old, -1)[0]
    old_logp = old[roll["nodes"], roll["actions"]]
    weights = prob.repeat_interleave(G)
    if cfg.loss_agg == "token-mean":
        norm = {"global_tokens": float(G * D)}
    else:
        norm = {"global_seqs": float(G)}
    del pi_old
    return sampled_loss(suite, cfg, logits, roll, old_logp, adv, weights=weights,
                        old_logpi=torch.log_softmax(logits_old, -1), **norm)


CASES = EXACT_METHODS + ["apo_dual", "grpo_seqmean", "kl_on_wrong_full", "grpo_k2", "apo_old_mass", "apo_old_token",
                        "apo_push_old_mass"]


def case_method(name, k=2):
    """The named method (or a variant), with the anchor set size fitted to the tiny trees."""
    m = _case_method(name)
    if m.adv.get("estimator") == "passk":  # the tests use groups of G = 2..4
        m = m.variant(name=m.name, k=2)
    return m.variant(name=m.name, apo_k=k) if m.loss_config().needs_anchors else m


def _case_method(name):
    extra = {
        "apo_dual": ("apo", {"clip_c": 3.0}),
        "grpo_seqmean": ("grpo", {"loss_agg": "seq-mean-token-mean"}),
        "kl_on_wrong_full": ("kl_on_wrong", {"kl_estimator": "full", "kl_coef": 0.3}),
        "grpo_k2": ("grpo_kl", {"kl_estimator": "k2", "kl_coef": 0.3}),
        "apo_old_mass": ("apo", {"apo_anchor_norm": "old_mass"}),  # r_anchor normalised by pi_old
        "apo_old_token": ("apo", {"apo_anchor_norm": "old_token"}),
        "apo_push_old_mass": ("apo_push_only", {"apo_anchor_norm": "old_mass"}),
    }
    if name in extra:
        base, kw = extra[name]
        return get_method(base, **kw)
    return get_method(name)


@pytest.mark.parametrize("name", CASES)
def test_exact_equals_enumerated_expectation_off_policy(name):
    """exact_loss(theta) == E[sampled loss](theta) and same gradient, at theta far from theta_old."""
    m = case_method(name)
    cfg = m.loss_config()
    suite = tiny_suite(seed=3)
    G = 3
    g = torch.Generator().manual_seed(1)
    logits_old = suite.ref_logits + 0.5 * torch.randn(suite.ref_logits.shape, generator=g)
    # a large move so that clipping binds for many tokens
    theta = (logits_old + 0.8 * torch.randn(logits_old.shape, generator=g)).requires_grad_(True)
    want, _ = enumerated_expectation(suite, cfg, theta, logits_old, G, m.adv)
    (g_want,) = torch.autograd.grad(want, theta)
    batch = exact_batch(suite, cfg, logits_old, G, m.adv)
    got, met = exact_loss(suite, cfg, theta, batch)
    (g_got,) = torch.autograd.grad(got, theta)
    assert met["clip_ratio/region_mean"] > 0  # the check covers the clipped regime
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10, abs=1e-12)
    assert torch.allclose(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_exact_equals_enumeration_on_unnormalised_sum_norm_with_length():
    """seq-mean-token-sum-norm with an explicit loss_norm_len (constant normaliser)."""
    m = get_method("dr_grpo", loss_norm_len=5)
    cfg = m.loss_config()
    suite = tiny_suite(seed=4)
    logits_old = suite.ref_logits.clone()
    theta = (logits_old + 0.3).requires_grad_(True)
    theta.data[0, 0, 0] += 0.7
    want, _ = enumerated_expectation(suite, cfg, theta, logits_old, 2, m.adv)
    got, _ = exact_loss(suite, cfg, theta, exact_batch(suite, cfg, logits_old, 2, m.adv))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)


@pytest.mark.parametrize("name", ["grpo", "apo", "grpo_kl", "kl_on_wrong"])
def test_exact_gradient_matches_mean_of_sampled_first_updates(name):
    """Statistical: mean gradient of n sampled first updates -> exact gradient (5 standard errors).

    n = chunks x per_chunk batches of G rollouts per prompt. One policy_loss call per chunk sees
    per_chunk batches side by side (groups are consecutive blocks of G samples of one prompt), so
    its token-mean is the mean of the per-batch losses; the chunk means give the standard error.
    """
    m = case_method(name, k=3)
    cfg = m.loss_config()
    suite = build_suite(SuiteSpec(n_prompts=3, branching=4, depth=2, top_k=3, seed=7, n_extra_correct=2))
    G, chunks, per_chunk = 4, 40, 50
    z0 = suite.ref_logits
    z = z0.clone().requires_grad_(True)
    exact, _ = exact_loss(suite, cfg, z, exact_batch(suite, cfg, z0, G, m.adv))
    (g_exact,) = torch.autograd.grad(exact, z)
    gen = torch.Generator().manual_seed(123)
    P, N, b = z0.shape
    old = torch.log_softmax(z0, -1).reshape(P * N, b)
    means = []
    for _ in range(chunks):
        roll = sample_rollouts(suite, z0, G * per_chunk, gen)  # per prompt: per_chunk groups of G
        adv = group_advantages(roll["reward"], G, **m.adv)
        old_logp = old[roll["prompt"][:, None] * N + roll["nodes"], roll["actions"]]
        loss, _ = sampled_loss(suite, cfg, z, roll, old_logp, adv)
        means.append(torch.autograd.grad(loss, z)[0])
    gs = torch.stack(means)
    mean, se = gs.mean(0), gs.std(0) / math.sqrt(chunks)
    err = (mean - g_exact).abs()
    assert g_exact.abs().max() > 1e-3
    assert (err <= 5 * se + 1e-12).all(), float((err / (se + 1e-12)).max())
    # the test has power: a gradient off by a factor 1.5 is rejected
    assert not ((mean - 1.5 * g_exact).abs() <= 5 * se + 1e-12).all()


def test_sampled_update_reports_diagnostics_and_moves_logits():
    suite = build_suite(SuiteSpec(n_prompts=4, branching=6, depth=2, top_k=4, seed=0))
    m = case_method("apo", k=4)
    z = suite.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)
    out = sampled_update(suite, m.loss_config(), z, opt, 8, m.adv, torch.Generator().manual_seed(0),
                         epochs=2, minibatches=2)
    for key in ("zero_var_frac", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_frac/neg",
                "apo/manifold_mass", "reward"):
        assert key in out
    assert 0.0 <= out["zero_var_frac"] <= 1.0
    assert not torch.equal(z.detach(), suite.ref_logits)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_zero_support_irreversibility_sampled(name):
    """A child with pi = 0 stays at exactly 0 under every sampled-token estimator.

    Its logit does not move either, except under two anchor terms whose logit gradient does not
    carry the factor pi_k: APO's old_token reading (r_anchor holds the likelihood ratio
    pi_theta(k) / pi_old(k), gradient (pi_theta/pi_old)(1 - pi_k) ~ 1 however small pi_k is) and
    Top-K KL on wrong (-q_k log pi_k, gradient q_k - pi_k sum q). Both pull a dead anchor's
    (finite) logit up; the probability still rounds to 0 after these few steps.
    """
    suite = build_suite(SuiteSpec(n_prompts=2, branching=6, depth=2, top_k=4, seed=1))
    z = suite.ref_logits.clone()
    # kill the reference's top-2 child at the root (inside the safe manifold): pi = exp(-1e4) = 0
    dead = suite.ref_topk[:, 0, 1]
    z[torch.arange(2), 0, dead] = -1e4
    z.requires_grad_(True)
    m = case_method(name, k=4)
    opt = torch.optim.SGD([z], lr=5.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        sampled_update(suite, m.loss_config(), z, opt, 8, m.adv, gen, epochs=2, minibatches=2)
    p_dead = torch.softmax(z.detach(), -1)[torch.arange(2), 0, dead]
    assert torch.all(p_dead == 0.0)
    moved = z.detach()[torch.arange(2), 0, dead] + 1e4
    cfg = m.loss_config()
    if (cfg.apo_anchor_norm == "old_token" and cfg.needs_anchor_old) or cfg.topk_kl_coef > 0:
        assert torch.all(moved > 1e-3), moved  # the ratio reading pulls the dead anchor's logit up
    else:
        assert torch.all(moved == 0.0), moved  # not even the logit moved


def test_natural_pg_is_not_bound_by_zero_support():
    """Contrast: the natural-PG yardstick (dz = Q - V) moves a dead correct child."""
    from apo_toy.dynamics import npg_update

    suite = build_suite(SuiteSpec(n_prompts=1, branching=6, depth=1, top_k=4, seed=2))
    correct = int(suite.rewards[0].argmax())
    z = suite.ref_logits.clone()
    z[0, 0, correct] = -50.0
    before = float(z[0, 0, correct])
    npg_update(suite, z, 1.0)
    assert float(z[0, 0, correct]) > before


def test_exact_row_cache_matches_a_fresh_suite_across_methods():
    """The row maps / anchor tensors cached on a suite are reused only when valid: alternating
    methods with different reward-class layouts (KL-on-Wrong has three) and Top-K sizes on one suite
    gives bit-identical losses and gradients to a fresh suite each time."""
    shared = tiny_suite(seed=5, prompts=2)
    g = torch.Generator().manual_seed(2)
    z_old = shared.ref_logits + 0.3 * torch.randn(shared.ref_logits.shape, generator=g)
    z_new = z_old + 0.5 * torch.randn(z_old.shape, generator=g)
    for name, k in (("apo", 2), ("kl_on_wrong", 2), ("apo", 3), ("grpo", 2), ("apo", 2)):
        m = case_method(name, k=k)
        cfg = m.loss_config()
        out = []
        for suite in (shared, tiny_suite(seed=5, prompts=2)):
            z = z_new.clone().requires_grad_(True)
            loss, _ = exact_loss(suite, cfg, z, exact_batch(suite, cfg, z_old, 4, m.adv))
            out.append((loss.detach(), torch.autograd.grad(loss, z)[0]))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]), (name, k)


@pytest.mark.parametrize("name", ["apo", "apo_old_token", "apo_push_only", "topk_kl_on_wrong", "kl_on_wrong_full"])
def test_diagnostics_off_gives_the_same_loss_and_gradient(name):
    """policy_loss(diagnostics=False), used on the simulator's unmeasured steps, changes no value:
    loss and gradient bit-identical, exact and sampled."""
    m = case_method(name)
    cfg = m.loss_config()
    suite = tiny_suite(seed=6, prompts=2)
    g = torch.Generator().manual_seed(4)
    z_old = suite.ref_logits + 0.4 * torch.randn(suite.ref_logits.shape, generator=g)
    theta = z_old + 0.6 * torch.randn(z_old.shape, generator=g)
    roll = sample_rollouts(suite, z_old, 4, torch.Generator().manual_seed(0))
    adv = group_advantages(roll["reward"], 4, **m.adv)
    P, N, b = z_old.shape
    old = torch.log_softmax(z_old, -1).reshape(P * N, b)
    old_logp = old[roll["prompt"][:, None] * N + roll["nodes"], roll["actions"]]
    batch = exact_batch(suite, cfg, z_old, 4, m.adv)
    for loss_fn in (lambda z, d: exact_loss(suite, cfg, z, batch, diagnostics=d),
                    lambda z, d: sampled_loss(suite, cfg, z, roll, old_logp, adv, old_logpi=old, diagnostics=d)):
        out = []
        for d in (True, False):
            z = theta.clone().requires_grad_(True)
            loss, met = loss_fn(z, d)
            out.append((loss.detach(), torch.autograd.grad(loss, z)[0], met))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        assert len(out[0][2]) > 5 and set(out[1][2]) == {"loss"} and out[1][2]["loss"] == out[0][2]["loss"]


@pytest.mark.parametrize("name", ["grpo", "apo", "kl_on_wrong", "grpo_seqmean", "dr_grpo"])
def test_leaf_path_equals_edge_path_for_per_token_losses(name):
    """The leaf path (one length-D row per (class, leaf)) and the edge path (one length-1 row per
    (class, edge)) are two groupings of the same expectation: value and gradient to 1e-12."""
    m = case_method(name)
    cfg = m.loss_config()
    suite = tiny_suite(seed=5, b=3, depth=3)
    g = torch.Generator().manual_seed(2)
    z_old = suite.ref_logits + 0.5 * torch.randn(suite.ref_logits.shape, generator=g)
    theta = (z_old + 0.8 * torch.randn(z_old.shape, generator=g)).requires_grad_(True)
    out = {}
    for path in ("edge", "leaf"):
        batch = exact_batch(suite, cfg, z_old, 4, m.adv, path=path)
        assert batch["path"] == path
        loss, _ = exact_loss(suite, cfg, theta, batch)
        out[path] = (loss.detach(), torch.autograd.grad(loss, theta)[0])
    assert out["edge"][1].abs().max() > 1e-3  # a gradient that can differ
    assert abs(float(out["edge"][0] - out["leaf"][0])) <= 1e-12
    assert (out["edge"][1] - out["leaf"][1]).abs().max() <= 1e-12


SEQ_CASES = {
    "gspo": ("gspo", {}),
    "gspo_wide": ("gspo", {"eps_low": 0.2, "eps_high": 0.2}),  # clip binding for some groups, not all
    "gspo_token": ("gspo_token", {}),
    "gmpo": ("gmpo", {}),
    "simko": ("simko", {"simko_alpha": 0.3, "simko_lambda": 2.0}),
    "simko_kl": ("simko", {"kl_coef": 0.2}),  # a term not proportional to A, on every token
}


@pytest.mark.parametrize("name", sorted(SEQ_CASES))
def test_leaf_path_equals_brute_force_expectation_for_sequence_coupled_losses(name):
    """Sequence-coupled losses (GSPO's sequence ratio, SimKO's per-sequence entropy quantile): the
    leaf-path expected loss and its gradient equal the expectation over every ordered group of G
    leaves (probability under pi_old, group_advantages, the sampled loss), at theta != theta_old."""
    base, kw = SEQ_CASES[name]
    m = get_method(base, **kw)
    cfg = m.loss_config()
    assert cfg.sequence_coupled
    suite = tiny_suite(seed=6, b=2, depth=3)  # 8 leaves, G = 3: 512 groups
    g = torch.Generator().manual_seed(3)
    z_old = suite.ref_logits + 0.5 * torch.randn(suite.ref_logits.shape, generator=g)
    theta = (z_old + 0.6 * torch.randn(z_old.shape, generator=g)).requires_grad_(True)
    want, _ = enumerated_expectation(suite, cfg, theta, z_old, 3, m.adv)
    (g_want,) = torch.autograd.grad(want, theta)
    batch = exact_batch(suite, cfg, z_old, 3, m.adv)
    assert batch["path"] == "leaf"
    got, met = exact_loss(suite, cfg, theta, batch)
    (g_got,) = torch.autograd.grad(got, theta)
    assert g_want.abs().max() > 1e-4
    if base == "simko":  # the per-sequence selection acts on some tokens, not all
        assert 0 < met["simko/selected_frac"] < 1
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10, abs=1e-12)
    assert torch.allclose(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_leaf_path_is_not_the_edge_path_for_sequence_coupled_losses():
    """The edge path refuses a sequence-coupled loss by name; a batch-coupled one is refused on both."""
    suite = tiny_suite(b=3, depth=3)
    with pytest.raises(ValueError, match=r"sequence_coupled.*path='leaf'"):
        exact_batch(suite, METHODS["gspo"].loss_config(), suite.ref_logits, 4, {"estimator": "grpo"}, path="edge")
    for path in ("auto", "leaf"):
        with pytest.raises(ValueError, match=r"batch_coupled.*mode='sampled'"):
            exact_batch(suite, METHODS["clip_cov"].loss_config(), suite.ref_logits, 4, {"estimator": "grpo"},
                        path=path)
    with pytest.raises(ValueError, match=r"path: 'tree'"):
        exact_batch(suite, METHODS["grpo"].loss_config(), suite.ref_logits, 4, {"estimator": "grpo"}, path="tree")


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "gmpo", "simko"])
def test_sequence_coupled_losses_run_in_both_modes(name):
    """Exact mode (leaf path) and sampled mode both train a sequence-coupled loss."""
    suite = tiny_suite(b=3, depth=3)
    cfg = METHODS[name].loss_config()
    for mode in ("exact", "sampled"):
        logits = suite.ref_logits.clone().requires_grad_()
        opt = torch.optim.SGD([logits], lr=1.0)
        if mode == "exact":
            m = exact_update(suite, cfg, logits, opt, 4, {"estimator": "grpo"}, epochs=2)
        else:
            m = sampled_update(suite, cfg, logits, opt, 4, {"estimator": "grpo"},
                               generator=torch.Generator().manual_seed(0))
        assert math.isfinite(m["loss"])
        assert not torch.equal(logits.detach(), suite.ref_logits)
