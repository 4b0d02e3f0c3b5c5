"""The claims study end to end (apo_toy/claims.py): selection isolation and the quick CLI run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from apo_toy import claims
from apo_toy.claims import RULES, Setting, quick_plan


def _tiny_plan():
    p, s = quick_plan(), Setting(32, 2, 1, 0.0, "sgd")  # the cheapest setting; every arm of the plan
    return dataclasses.replace(p, settings=(s,), tune={"sgd": s}, run=dataclasses.replace(p.run, steps=2, eval_every=1))


def test_selection_never_sees_test_metrics_and_every_arm_uses_it(monkeypatch):
    """The spy replaces `select`: it must get validation rows only, before any test measure of the
    setting exists, once per (arm, optimizer) in tuning and per (setting, arm, rule) after; the
    null (GRPO) and every other arm go through it."""
    plan = _tiny_plan()
    calls, tested = [], []
    real_test = claims.test_measures

    def counting_test(plan_, setting, seed, params):
        tested.append(setting.name)
        return real_test(plan_, setting, seed, params)

    def spy(val_rows, rule):
        keys = {k for r in val_rows for k in r}
        assert keys and all(k in ("arm", "hparams", "seed", "step") or k.startswith("val/") for k in keys), keys
        arms = {r["arm"] for r in val_rows}
        assert len(arms) == 1
        calls.append((arms.pop(), rule, len(tested)))
        return claims.select(val_rows, rule)

    monkeypatch.setattr(claims, "test_measures", counting_test)
    out = claims.run_claims(plan, workers=1, select_fn=spy)
    names = [a.name for a in plan.arms]
    n_tune = len(plan.tune) * len(names)
    assert [c[0] for c in calls[:n_tune]] == names * len(plan.tune)  # tuning: every arm, null first
    after = calls[n_tune:]
    assert {(a, r) for a, r, _ in after} == {(a, r) for a in names for r in RULES}
    assert all(n == 0 for _, _, n in calls)  # no test measure existed when any selection was made
    assert len(tested) > 0 and {v["arm"] for v in out["verdicts"]} == set(names)


def test_quick_claims_cli_writes_verdicts(tmp_path):
    out = tmp_path / "claims"
    res = subprocess.run([sys.executable, "-m", "apo_toy.run", "--preset", "claims", "--quick", "--workers", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "claims.json").read_text())
    settings = set(data["plan"]["settings"])
    assert any("adam" in s for s in settings) and any("sgd" in s for s in settings)
    assert any(s.startswith("b32") and "ep4" in s for s in settings)
    v = data["verdicts"]
    assert {r["claim"] for r in v} == {1, 2, 3}
    for arm in ("apo (A, ref)", "apo (C, old_mass)", "apo (H, old_token)", "silence only (A)", "anti-sharpening"):
        got = {(r["setting"], r["rule"]) for r in v if r["arm"] == arm and r["claim"] == 3}
        assert got == {(s, rule) for s in settings for rule in RULES}, arm
    assert all(r["verdict"] in ("holds", "fails", "inconclusive") for r in v)
    md = (out / "claims.md").read_text()
    assert "holds in" in md and "Tuning grid" in md


def test_claims_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    res = subprocess.run([sys.executable, "-m", "apo_toy.run", "--preset", "claims", "--out", str(f)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--out" in res.stderr
    assert f.read_text() == "keep me"


def test_per_run_cache_makes_a_second_run_compute_nothing_and_an_added_arm_only_itself(tmp_path):
    """Every run's result is kept under cache_dir keyed by its content: a rerun trains nothing and
    gives identical numbers; a plan with one more arm trains only that arm's runs."""
    plan = _tiny_plan()
    names = [a.name for a in plan.arms]
    fewer = dataclasses.replace(plan, arms=tuple(a for a in plan.arms if a.name != "cispo"))
    cache = tmp_path / "runs"
    first = claims.run_claims(fewer, workers=1, cache_dir=cache)
    assert first["computed"] > 0
    full = claims.run_claims(plan, workers=1, cache_dir=cache)
    n_cispo = sum(len(plan.grid(a, o)) * plan.tune_seeds for a in plan.arms if a.name == "cispo" for o in plan.tune)
    assert full["computed"] == n_cispo + len(plan.settings) * plan.seeds  # cispo's tuning and reporting runs only
    again = claims.run_claims(plan, workers=1, cache_dir=cache)
    assert again["computed"] == 0
    for key in ("tuning", "tuned", "results", "verdicts", "summary", "diagnostics"):
        assert json.dumps(again[key], default=str) == json.dumps(full[key], default=str), key
    fresh = claims.run_claims(plan, workers=1)  # no cache: the same numbers
    assert json.dumps(fresh["verdicts"], default=str) == json.dumps(full["verdicts"], default=str)
    assert {v["arm"] for v in full["verdicts"]} == set(names)


def test_every_arm_has_the_same_grid_size_and_the_peers_are_arms():
    plan = claims.full_plan()
    by = {a.name: a for a in plan.arms}
    assert {"cispo", "gspo", "simko"} <= set(by)
    sizes = {a.name: len(plan.grid(a, "adam")) for a in plan.arms if a.role != "null"}
    assert len(set(sizes.values())) == 1, sizes
    gspo = plan.grid(by["gspo"], "sgd")
    assert {"lr", "eps_low", "eps_high"} == set(gspo[0]) and {(g["eps_low"], g["eps_high"]) for g in gspo} >= {(3e-4, 4e-4)}
    for a in plan.arms:  # every grid point is a valid method
        for hp in plan.grid(a, "adam"):
            claims._method(plan, claims.Job(plan.settings[0], a.name, tuple(sorted(hp.items())), 0)).loss_config()
