"""apo_toy trees, suites, measures and input validation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_toy import BRANCH_NAMES, Suite, SuiteSpec, base_measures, build_suite, get_method, measure
from apo_toy.tree import num_internal, path_to_leaf, reach_and_leaf_logp, success_q

torch_default_dtype = torch.float64  # every test here runs in float64 (tests/conftest.py)


def test_suite_is_seeded_and_reproducible():
    a, b = build_suite(SuiteSpec(seed=5)), build_suite(SuiteSpec(seed=5))
    c = build_suite(SuiteSpec(seed=6))
    assert torch.equal(a.ref_logits, b.ref_logits) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.ref_logits, c.ref_logits)


def test_suite_shapes_and_named_branches():
    spec = SuiteSpec(n_prompts=8, branching=12, depth=3, top_k=8, seed=1)
    s = build_suite(spec)
    N = num_internal(12, 3)
    assert s.ref_logits.shape == (8, N, 12) and s.rewards.shape == (8, 12**3) and s.ref_topk.shape == (8, N, 8)
    assert set(s.named) == set(BRANCH_NAMES)
    P = torch.arange(8)
    for name in BRANCH_NAMES:
        leaf = s.named[name]
        assert (leaf >= 0).all()
        assert torch.all(s.rewards[P, leaf] == 1)  # named branches are correct leaves
    # rare_in stays inside the safe manifold at every level, rare_out leaves it somewhere
    for name, inside in (("rare_in", True), ("rare_out", False)):
        nodes, actions = path_to_leaf(s.named[name], 12, 3)  # [P, D]
        in_topk = s.in_topk[P[:, None], nodes, actions]
        assert torch.all(in_topk.all(-1)) if inside else torch.all(~in_topk.all(-1))


def test_base_pass1_spans_hard_to_easy_and_branches_differ():
    s = build_suite(SuiteSpec(n_prompts=32, seed=0))
    from apo_toy.measures import per_prompt_success

    p = per_prompt_success(s, s.ref_logits)
    assert p.min() < 0.03 and p.max() > 0.3
    m = base_measures(s)
    assert m["branch_dominant"] > 2 * m["branch_secondary"] > 0
    assert m["branch_secondary"] > 3 * m["branch_rare_in"] > 0
    assert m["coverage"] == 1.0 and m["rsc_lost"] == 0.0  # the reference keeps all its valid leaves
    assert 0.9 < m["manifold_mass"] < 1.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(2, 5), depth=st.integers(1, 4))
def test_leaf_probabilities_and_q_against_per_leaf_products(seed, b, depth):
    g = torch.Generator().manual_seed(seed)
    N = num_internal(b, depth)
    logpi = torch.log_softmax(torch.randn(2, N, b, generator=g), -1)
    rewards = (torch.rand(2, b**depth, generator=g) < 0.3).double()
    log_reach, leaf_logp = reach_and_leaf_logp(logpi, depth)
    leaves = torch.arange(b**depth)
    nodes, actions = path_to_leaf(leaves, b, depth)  # [L, D]
    for p in range(2):
        want = logpi[p][nodes, actions].sum(-1)  # explicit product along each path
        assert torch.allclose(leaf_logp[p], want, atol=1e-12)
    assert torch.allclose(leaf_logp.exp().sum(-1), torch.ones(2), atol=1e-12)
    q, v = success_q(logpi.exp(), rewards, depth)
    # V(root) = sum_leaf P(leaf) r(leaf); Q(root, a) = success probability given the first token a
    assert torch.allclose(v[:, 0], (leaf_logp.exp() * rewards).sum(-1), atol=1e-12)
    first = leaves // b ** (depth - 1)
    for a in range(b):
        sel = first == a
        cond = (leaf_logp.exp()[:, sel] * rewards[:, sel]).sum(-1) / leaf_logp.exp()[:, sel].sum(-1)
        assert torch.allclose(q[:, 0, a], cond, atol=1e-10)
    # reach of the level-1 nodes = pi(a | root)
    if depth > 1:
        assert torch.allclose(log_reach[:, 1:1 + b], logpi[:, 0], atol=1e-12)


def test_measures_by_enumeration():
    """pass@k, distinct@k, coverage on a hand-built one-node tree."""
    z = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    s = Suite(z.clone(), torch.tensor([[1.0, 0.0, 1.0, 1.0]]), top_k=2)
    pi = torch.tensor([0.7, 0.2, 0.099, 0.001])
    m = measure(s, pi.log().reshape(1, 1, 4), budget=100)
    p = 0.7 + 0.099 + 0.001
    for k in (1, 4, 16, 64, 256):
        assert m[f"pass@{k}"] == pytest.approx(1 - (1 - p) ** k, rel=1e-12)
    assert m["distinct@256"] == pytest.approx(sum(1 - (1 - x) ** 256 for x in (0.7, 0.099, 0.001)), rel=1e-12)
    # base-valid (ref >= 1/100): leaves 0, 2, 3; policy keeps 0 and 2 above 1/100 -> 2/3, one lost
    assert m["coverage"] == pytest.approx(2 / 3) and m["rsc_lost"] == 1.0
    assert m["manifold_mass"] == pytest.approx(0.9)  # Top-2 of the reference = children 0, 1
    assert m["entropy"] == pytest.approx(float(-(pi * pi.log()).sum()))


@pytest.mark.parametrize("field,kw", [
    ("branching", {"branching": 1}),
    ("top_k", {"branching": 4, "top_k": 5}),
    ("depth", {"depth": 0}),
    ("n_prompts", {"n_prompts": 0}),
    ("depth", {"branching": 32, "depth": 8}),
])
def test_invalid_specs_name_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        build_suite(SuiteSpec(**kw))


def test_invalid_suites_and_methods_name_the_problem():
    z = torch.zeros(2, 1, 3)
    with pytest.raises(ValueError, match="no valid"):
        Suite(z, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        Suite(z, torch.ones(2, 3), top_k=4)
    with pytest.raises(ValueError, match="rewards"):
        Suite(z, torch.ones(2, 4), top_k=2)
    with pytest.raises(ValueError, match="method"):
        get_method("ppo_magic")
    with pytest.raises(ValueError, match="kl_coef"):
        get_method("grpo_kl", kl_coef=-1.0)
    with pytest.raises(ValueError, match="apo_k"):
        build_suite(SuiteSpec(n_prompts=1, branching=4, depth=1, top_k=2)).topk(8)


def test_import_does_not_pull_llm_stack():
    code = ("import sys, apo_toy, apo_toy.run; bad = [m for m in ('transformers', 'peft', 'datasets') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
