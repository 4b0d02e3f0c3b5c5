"""The trainer's closing summary (apo_llm.evaluate.training_report): every held-out number with its
standard error over problems, the paired change to the first evaluation with its s.e., and a plain
word; checked against direct numpy computations on hand-made evaluation records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apo_llm.evaluate import held_out_change, training_report, verdict
from apo_llm.metrics import pass_at_k


def _eval(step: int, correct: list[int], n: int) -> dict:
    c = np.asarray(correct)
    return {"step": step, "correct": correct, **{f"eval/pass@{k}": float(np.mean(pass_at_k(n, c, k))) for k in (1, 4)},
            "eval/mean_reward": float(c.mean() / n)}


def test_held_out_change_is_the_paired_per_problem_difference():
    rng = np.random.default_rng(0)
    n, P = 8, 40
    c0 = rng.integers(0, n + 1, P)
    c1 = np.clip(c0 + rng.integers(-1, 3, P), 0, n)
    out = held_out_change(_eval(0, c0.tolist(), n), _eval(30, c1.tolist(), n), n, [1, 4])
    for k in (1, 4):
        d = pass_at_k(n, c1, k) - pass_at_k(n, c0, k)
        assert out[k]["change"]["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert out[k]["change"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(P), abs=1e-12)
        a = pass_at_k(n, c0, k)
        assert out[k]["first"]["se"] == pytest.approx(a.std(ddof=1) / math.sqrt(P), abs=1e-12)
    # the paired s.e. is smaller than either evaluation's own s.e. when the problems are correlated
    assert out[1]["change"]["se"] < out[1]["first"]["se"]


@pytest.mark.parametrize("mean,se,word", [(0.01, 0.01, "within noise"), (0.03, 0.01, "up"), (-0.05, 0.02, "down"),
                                          (0.0, None, "no s.e.")])
def test_verdict_uses_two_standard_errors(mean, se, word):
    assert verdict({"mean": mean, "se": se}) == word


def test_report_says_within_noise_and_points_to_the_miniature():
    n = 8
    c0 = [2, 3, 0, 8, 5, 1, 4, 6] * 4
    c1 = [3, 3, 0, 8, 4, 1, 4, 6] * 4  # one problem up, one down: no change
    steps = [{"step": i + 1, "reward": r} for i, r in enumerate([0.2, 0.3, 0.25, 0.22, 0.28] + [0.3] * 20 +
                                                                  [0.6, 0.62, 0.58, 0.61, 0.59])]
    text = training_report(steps, [_eval(0, c0, n), _eval(10, c0, n), _eval(30, c1, n)], n)
    assert "32 problems x 8 samples" in text and "step 0 -> 30" in text
    assert text.count("within noise") >= 2 and "apo_llm.miniature" in text
    assert "training reward" in text and ": up" in text  # 0.25 -> 0.60, s.e. ~0.02


def test_report_without_the_pointer_when_held_out_moves():
    n = 8
    c0 = [1, 2, 0, 3, 1, 2, 0, 1] * 5
    c1 = [c + 3 for c in c0]
    text = training_report([], [_eval(0, c0, n), _eval(30, c1, n)], n)
    assert "pass@1:" in text and ": up" in text and "llm_miniature" not in text
    assert "training reward" not in text  # fewer than 2 x 5 steps: no reward line
