"""The data behind each lesson's key figure, at the lesson's defaults, spans a range a reader can see
(no saturated axis, no curves on top of each other) and says what the figure's title says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apo_toy import palette
from apo_toy import teaching as T


@pytest.fixture(autouse=True)
def _one_thread():
    """The lessons run single-threaded (small tensors; CI has 2 shared cores): so do their data here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lesson2_contraction_is_visible():
    c = T.contraction()
    assert np.ptp(c["pass@1"]) > 0.5 and c["coverage"][-1] < 0.8 < c["coverage"][0] + 1e-9
    assert c["distinct@256"][-1] < c["base"]["distinct@256"]


def test_lesson3_crossover_differences_are_visible_and_cross_zero():
    x = T.crossover()
    g = (x["arms"]["grpo"] - x["base"]).mean(0)  # the plotted curve: pass@k minus base
    assert g[0] > 0 > g[-1] and np.ptp(g) > 0.05
    d = (x["arms"]["apo_old_token"] - x["arms"]["grpo"]).mean(0)
    assert np.ptp(d) > 0.02  # the comparison figure is not a flat line at 0
    assert palette.distinct(T.FIGURE_ARMS["03 crossover"])


def test_lesson4_tradeoff_offsets_are_visible():
    t = T.tradeoff()
    for m in ("grpo_kl", "grpo_kl_full"):
        assert t["pass@1"][m].mean() < -0.02 and t["coverage"][m].mean() > 0
    spread = np.ptp([t["pass@1"][m].mean() for m in t["arms"]])
    assert spread > 0.05  # the arms do not sit on one point
    assert palette.distinct(t["arms"])


def test_lesson7_verdict_data_are_visible():
    runs = T.study(seeds=3)
    for rule in ("last", "validation"):
        v = T.verdict(runs, rule)
        assert len(v["diff"]) == 3 and np.isfinite(v["se"])
        assert np.ptp(v["diff"]) > 0.005 or abs(v["mean"]) > 0.02  # visible on the figure's axis
    last = T.verdict(runs, "last")
    assert (last["grpo"]["step"] == 80).all()
