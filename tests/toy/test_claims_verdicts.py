"""The claims study's selection rule and statistics (apo_toy/claims_verdicts.py) and its splits (apo_toy/coupled.py): formulas, no training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apo_toy import CoupledSpec, build_coupled_suite
from apo_toy.claims_verdicts import RULES, ValRows, holm, judge, p_greater, select, t_sf


def _rows(table):
    """{(hparams, seed): [val pass@1 per step 0, 5, 10, ...]} -> ValRows."""
    return ValRows({"arm": "a", "hparams": hp, "seed": s, "step": 5 * i, "val/pass@1": v}
                   for (hp, s), vals in table.items() for i, v in enumerate(vals))


def test_select_picks_best_hparams_and_each_rule_its_step():
    lo, hi = (("lr", 0.1),), (("lr", 0.3),)
    rows = _rows({(lo, 0): [0.1, 0.4, 0.3], (lo, 1): [0.1, 0.2, 0.5],  # best steps 5 / 10, mean 0.45
                  (hi, 0): [0.1, 0.6, 0.2], (hi, 1): [0.1, 0.35, 0.35]})  # mean 0.475; seed 1 tie -> earliest
    hp, steps = select(rows, "best")
    assert hp == hi and steps == {0: 5, 1: 5}
    hp, steps = select(rows, "final")
    assert hp == hi and steps == {0: 10, 1: 10}


def test_select_refuses_anything_but_validation_rows():
    with pytest.raises(ValueError, match="test/pass@1"):
        ValRows([{"arm": "a", "hparams": (), "seed": 0, "step": 0, "val/pass@1": 0.5, "test/pass@1": 0.4}])
    with pytest.raises(TypeError, match="ValRows"):
        select([{"hparams": (), "seed": 0, "step": 0, "val/pass@1": 0.5}], "best")
    with pytest.raises(ValueError, match="rule"):
        select(_rows({((), 0): [0.1]}), "oracle")
    assert RULES == ("final", "best")


@pytest.mark.parametrize("t,df,want", [(2.132, 4, 0.05), (3.747, 4, 0.01), (2.015, 5, 0.05), (6.314, 1, 0.05),
                                       (2.920, 2, 0.05), (1.0, 1, 0.25), (0.0, 7, 0.5), (-2.132, 4, 0.95)])
def test_t_sf_matches_t_tables(t, df, want):
    assert t_sf(t, df) == pytest.approx(want, abs=5e-4)


def test_t_sf_against_numerical_integration():
    for df in (1, 2, 3, 4, 7, 10):
        x = np.linspace(1.3, 60.0, 400_001)
        dens = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x**2 / df) ** (-(df + 1) / 2)
        tail_beyond = t_sf(60.0, df)
        assert t_sf(1.3, df) == pytest.approx(np.trapezoid(dens, x) + tail_beyond, rel=1e-6)


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def test_judge_holds_fails_inconclusive():
    up = np.array([0.05, 0.06, 0.04, 0.05, 0.07])
    noise = np.array([0.05, -0.06, 0.04, -0.05, 0.01])
    fam = [("up", [up, up]), ("down", [up, -up]), ("noise", [up, noise])]
    v = {j["key"]: j["verdict"] for j in judge(fam, 0.05)}
    assert v == {"up": "holds", "down": "fails", "noise": "inconclusive"}
    assert p_greater(np.array([0.1, 0.1])) == 0.0 and p_greater(np.array([0.0, 0.0])) == 1.0


def test_coupled_split_is_disjoint_and_covers_heldout():
    s = build_coupled_suite(CoupledSpec(n_train=2, n_heldout=10, n_val=4, branching=4, depth=2, top_k=2, vocab=8,
                                        n_correct=3))
    val, test, held = s.part("val"), s.part("test"), s.part("heldout")
    assert val.ref_logits.shape[0] == 4 and test.ref_logits.shape[0] == 6
    assert torch.equal(torch.cat([val.ref_logits, test.ref_logits]), held.ref_logits)
    assert torch.equal(torch.cat([s.tokens["val"], s.tokens["test"]]), s.tokens["heldout"])
    for bad in (10, -1):
        with pytest.raises(ValueError, match="n_val"):
            build_coupled_suite(CoupledSpec(n_heldout=10, n_val=bad))
    with pytest.raises(ValueError, match="part"):
        build_coupled_suite(CoupledSpec(n_train=2, n_heldout=4, branching=4, depth=2, top_k=2, vocab=8,
                                        n_correct=3)).part("val")
