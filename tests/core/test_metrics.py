"""Unbiased pass@k (docs/theory.md section 9) against the combinatorial definition.

    pass@k = 1 - C(n-c, k) / C(n, k)     (= 1 when n - c < k; defined for 1 <= k <= n)

computed here exactly with math.comb and fractions.Fraction; and its unbiasedness: averaging the
estimator over c ~ Binomial(n, p) gives the exact pass@k = 1 - (1 - p)^k.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm.metrics import pass_at_k, pass_at_k_exact

QUICK = settings(max_examples=60, deadline=None)


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@st.composite
def nck(draw, max_n=300):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@QUICK
@given(nck())
def test_pass_at_k_matches_combinatorial_definition(args):
    n, c, k = args
    got = pass_at_k(n, c, k)
    assert isinstance(got, float)
    assert got == pytest.approx(exact_pass_at_k(n, c, k), rel=1e-12, abs=1e-13)
    if n - c < k:
        assert got == 1.0  # every k-subset holds a correct sample
    if c == 0:
        assert got == 0.0


def test_pass_at_k_known_values():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1, abs=1e-15)
    assert pass_at_k(4, 1, 4) == 1.0  # verl's best@N would say 0.684 here
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10, abs=1e-15)
    assert pass_at_k(1000, 3, 100) == pytest.approx(exact_pass_at_k(1000, 3, 100), rel=1e-12)


@QUICK
@given(st.lists(nck(max_n=50), min_size=1, max_size=6), st.integers(1, 5))
def test_pass_at_k_arrays(rows, k):
    """Arrays of (n, c), one per problem, elementwise; k must not exceed any n."""
    n = np.array([r[0] for r in rows])
    c = np.array([r[1] for r in rows])
    if k > n.min():
        with pytest.raises(ValueError, match="k"):
            pass_at_k(n, c, k)
        return
    got = pass_at_k(n, c, k)
    assert isinstance(got, np.ndarray) and got.shape == n.shape
    np.testing.assert_allclose(got, [exact_pass_at_k(a, b, k) for a, b in zip(n, c)], rtol=1e-12, atol=1e-13)
    # broadcasting one n against several c
    got = pass_at_k(int(n.max()), np.minimum(c, n.max()), k)
    assert got.shape == c.shape
    assert pass_at_k(n.tolist(), c.tolist(), k).tolist() == pytest.approx(pass_at_k(n, c, k).tolist())


@QUICK
@given(p=st.floats(0.0, 1.0), n=st.integers(1, 40), data=st.data())
def test_pass_at_k_is_unbiased(p, n, data):
    """E_{c ~ Bin(n, p)}[pass@k(n, c)] = 1 - (1 - p)^k = pass_at_k_exact(p, k)."""
    k = data.draw(st.integers(1, n))
    mean = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
    assert mean == pytest.approx(pass_at_k_exact(p, k), abs=1e-12)
    assert pass_at_k_exact(p, k) == pytest.approx(1 - (1 - p) ** k, abs=1e-15)


def test_pass_at_k_exact_arrays():
    p = np.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(pass_at_k_exact(p, 3), [0.0, 1 - 0.75**3, 1.0], rtol=0, atol=1e-15)
    assert isinstance(pass_at_k_exact(0.5, 2), float)


@pytest.mark.parametrize(
    "args, field",
    [
        ((3, 1, 4), "k"),  # k > n
        ((3, 1, 0), "k"),
        ((3, 1, -1), "k"),
        ((3, 1, 1.5), "k"),
        ((3, 1, True), "k"),
        ((3, 4, 1), "c"),  # c > n
        ((3, -1, 1), "c"),
        ((-3, 0, 1), "n"),
        ((3.5, 1, 1), "n"),
        ((np.array([5, 2]), np.array([1, 1]), 3), "k"),  # k > one of the n
    ],
)
def test_pass_at_k_bad_input(args, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        pass_at_k(*args)


@pytest.mark.parametrize("p, k, field", [(1.5, 2, "p"), (-0.1, 2, "p"), (float("nan"), 2, "p"),
                                         (np.array([0.2, 2.0]), 1, "p"), (0.5, 0, "k"), (0.5, -1, "k"),
                                         (0.5, 1.5, "k")])
def test_pass_at_k_exact_bad_input(p, k, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        pass_at_k_exact(p, k)
