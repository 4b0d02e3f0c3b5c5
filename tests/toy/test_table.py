"""apo_toy/table.py: the tidy Table (final step, summaries over seeds) and the markdown writer."""

from __future__ import annotations

import math

import pytest

from apo_toy.table import Table, markdown, summary_markdown

ROWS = [
    {"method": "a", "seed": 0, "step": 0, "pass@1": 0.1, "crossover_k": float("nan")},
    {"method": "a", "seed": 0, "step": 5, "pass@1": 0.3, "crossover_k": 4.0},
    {"method": "a", "seed": 1, "step": 5, "pass@1": 0.5, "crossover_k": float("nan")},
    {"method": "b", "seed": 0, "step": 5, "pass@1": 0.9, "crossover_k": 16.0},
]


def test_final_keeps_the_last_step_of_each_method_and_seed():
    fin = Table(ROWS).final()
    assert sorted((r["method"], r["seed"], r["step"]) for r in fin) == [("a", 0, 5), ("a", 1, 5), ("b", 0, 5)]


def test_summary_is_mean_and_std_over_seeds_with_the_crossover_median_of_seeds_that_have_one():
    a, b = Table(ROWS).summary(keys=("pass@1",))
    assert a["method"] == "a" and a["n_seeds"] == 2
    assert a["pass@1"] == pytest.approx(0.4) and a["pass@1_std"] == pytest.approx(0.1)  # population std
    assert a["crossover_k_median"] == 4.0 and a["crossover_seeds"] == 1
    assert b["crossover_k_median"] == 16.0 and b["pass@1_std"] == 0.0


def test_where_column_unique():
    t = Table(ROWS)
    assert len(t.where(method="a", seed=0)) == 2 and t.unique("method") == ["a", "b"]
    col = Table([{"x": 1.0}, {}]).column("x")
    assert col[0] == 1.0 and math.isnan(col[1])


def test_markdown_rows_and_the_summary_table():
    assert markdown(["k", "v"], [["a", 1], ["b", 2]]) == "| k | v |\n|---|---|\n| a | 1 |\n| b | 2 |\n"
    s = {"base": {"pass@1": 0.25, "pass@1_std": 0.0, "crossover_k_median": None, "crossover_seeds": 0, "n_seeds": 2},
         "methods": [{"method": "apo", "pass@1": 0.5, "pass@1_std": 0.125, "crossover_k_median": 8.0,
                      "crossover_seeds": 1, "n_seeds": 2}]}
    md = summary_markdown(s, keys=("pass@1", "crossover_k", "coverage")).splitlines()
    assert md[0] == "| method | pass@1 | crossover_k | coverage |"
    assert md[2] == "| base (reference) | 0.250 ± 0.000 | none | n/a |"
    assert md[3] == "| apo | 0.500 ± 0.125 | 8 (1/2 seeds) | n/a |"
