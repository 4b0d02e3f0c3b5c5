"""The README's miniature table is the generated one: docs/results/miniature/ holds the summary
that `python -m apo_llm.miniature` wrote (results.json, results.md, curves.json), the README quotes
results.md row for row, and the summary has the design issue 18 asks for (the beta grid per
reading, the silence-only control, 5 seeds for GRPO and for each group's validation pick, 3 for the
rest, stopping steps that are the validation argmax of each run)."""

import json
from pathlib import Path

import pytest

from apo_llm.miniature.design import A_ARMS, BETAS, CH_ARMS, KL_ARMS, NULL_ARM, SILENCE_LOSS, Sizes, eval_steps
from apo_llm.miniature.report import markdown

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "docs" / "results" / "miniature"


@pytest.fixture(scope="module")
def summary():
    res = json.loads((DIR / "results.json").read_text())
    return res, Sizes(**res["sizes"])


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_results_md_is_the_markdown_of_results_json(summary):
    res, sz = summary
    assert markdown(res, sz).strip() == (DIR / "results.md").read_text().strip()


def test_readme_quotes_every_row_of_the_generated_table():
    rows = _rows((DIR / "results.md").read_text())
    assert len(rows) > 10  # header, rule, base and one row per arm
    readme = (ROOT / "README.md").read_text().splitlines()
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README.md lacks rows of docs/results/miniature/results.md (re-copy):\n{missing[:3]}"


def test_the_table_has_the_beta_grid_the_silence_control_and_the_seed_counts(summary):
    res, sz = summary
    arms = res["arms"]
    for prefix in ("apo_ref", "apo_old_mass", "apo_old_token"):
        assert {f"{prefix}_b{b:g}" for b in BETAS} <= set(arms), prefix
    assert SILENCE_LOSS in arms and NULL_ARM in arms and set(KL_ARMS) <= set(arms)
    assert not res["failed"]
    picks = {tuple(g["group"]): g["picked"] for g in res["seed_groups"]}
    assert set(picks) == {(NULL_ARM,), A_ARMS, KL_ARMS, CH_ARMS}
    assert sz.seeds == 3 and sz.more_seeds == 5
    for arm, a in arms.items():
        want = sz.more_seeds if arm in picks.values() else sz.seeds
        assert a["seeds"] == list(range(want)), arm


def test_stopping_steps_and_picks_are_the_validation_argmax(summary):
    """Recomputed here from the validation pass@1 table alone (ties to the earlier step / the arm
    listed first), independently of apo_llm.miniature.selection."""
    res, sz = summary
    val = {run: {int(s): p for s, p in steps.items()} for run, steps in res["validation"].items()}
    for run, stop in res["stop_steps"].items():
        steps = eval_steps(sz)
        assert sorted(val[run]) == steps
        best = max(steps, key=lambda s: (val[run][s], -s))
        assert stop == best, run
    for group in res["seed_groups"]:
        if len(group["group"]) == 1:
            continue
        score = {arm: sum(val[f"{arm}-s{s}"][res["stop_steps"][f"{arm}-s{s}"]] for s in range(sz.seeds)) / sz.seeds
                 for arm in group["group"]}
        order = group["group"]
        assert group["picked"] == max(order, key=lambda a: (score[a], -order.index(a))), group
