"""apo_toy runner, tidy table and CLI (tiny settings; the full presets are run by hand, see README)."""

from __future__ import annotations

import json
import os

import pytest

from apo_toy import PRESETS, CoupledSpec, SimConfig, SuiteSpec, Table, run_methods
from apo_toy.run import main

REQUIRED = ("preset", "method", "seed", "step", "pass@1", "pass@4", "pass@16", "pass@64", "pass@256", "pass@1024",
            "crossover_k", "frac_prompts_below_base", "coverage", "distinct@256", "entropy", "manifold_mass")
TRAIN_KEYS = tuple(f"train/pass@{k}" for k in (1, 4, 16, 64, 256, 1024))
TINY = SuiteSpec(n_prompts=3, branching=6, depth=2, top_k=4)


def test_run_returns_tidy_table_with_base_rows():
    t = run_methods(TINY, ["grpo", "npg"], SimConfig(steps=3), seeds=2)
    assert isinstance(t, Table)
    assert set(t.unique("method")) == {"base", "grpo", "npg"}
    assert len(t.where(method="grpo")) == 2 * 4  # steps 0..3 x 2 seeds
    for row in t:
        for k in REQUIRED[1:]:
            assert k in row, k
    # step 0 of a method is the base policy (initialised at the reference)
    for seed in (0, 1):
        b, g0 = t.where(method="base", seed=seed).rows[0], t.where(method="grpo", seed=seed, step=0).rows[0]
        assert g0["pass@1"] == b["pass@1"] and g0["coverage"] == b["coverage"]
    s = {r["method"]: r for r in t.summary()}
    assert s["grpo"]["n_seeds"] == 2 and "pass@256_std" in s["grpo"]
    # seeds vary the suite
    assert t.where(method="base", seed=0).rows[0]["pass@1"] != t.where(method="base", seed=1).rows[0]["pass@1"]


def test_sampled_mode_logs_zero_variance_and_clip_fractions():
    t = run_methods(TINY, [dict_method()], SimConfig(mode="sampled", steps=2, epochs=2, minibatches=2, optimizer="adam",
                                             lr=0.1), seeds=1)
    row = t.where(step=2).rows[0]
    assert "zero_var_frac" in row and "clip_frac/neg" in row and "clip_ratio/high_mean" in row


def dict_method():
    from apo_toy import get_method

    return get_method("apo", apo_k=4)


def test_grpo_exact_raises_pass1_and_shrinks_distinct_correct_leaves():
    """A sanity check of the dynamics (not a tuned claim): GRPO improves Pass@1 on a small suite."""
    t = run_methods(SuiteSpec(n_prompts=8, branching=6, depth=2, top_k=4), ["grpo"], SimConfig(steps=40))
    first, last = t.where(method="grpo", step=0).rows[0], t.where(method="grpo", step=40).rows[0]
    assert last["pass@1"] > first["pass@1"] + 0.1
    assert last["entropy"] < first["entropy"]


@pytest.mark.parametrize("kw,field", [({"mode": "magic"}, "mode"), ({"steps": -1}, "steps"),
                                      ({"optimizer": "lbfgs"}, "optimizer"), ({"group_size": 1}, "group_size")])
def test_invalid_run_config_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        run_methods(TINY, ["grpo"], SimConfig(**kw))


def test_cli_writes_metrics_summary_and_figures(tmp_path, capsys):
    os.environ["MPLBACKEND"] = "Agg"
    out = tmp_path / "rsc"
    rc = main(["--preset", "rsc", "--out", str(out), "--methods", "grpo,apo", "--seeds", "1", "--steps", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {r["method"] for r in rows} == {"base", "grpo", "apo"}
    assert len([r for r in rows if r["method"] == "apo"]) == 3  # one row per step (0, 1, 2)
    for r in rows:
        for k in REQUIRED + TRAIN_KEYS:  # rsc is the coupled model: held-out keys and train/ keys
            assert k in r, k
    base = [r for r in rows if r["method"] == "base"][0]
    assert base["crossover_k"] is None and base["frac_prompts_below_base"] == 0.0
    assert base["pass@1"] != base["train/pass@1"]  # two different prompt sets
    summary = json.load(open(out / "summary.json"))
    assert [m["method"] for m in summary["methods"]] == ["grpo", "apo"] and "pass@256" in summary["base"]
    for m in summary["methods"]:  # k* summarised as a median over the seeds that cross, and their count
        ks = [r["crossover_k"] for r in rows if r["method"] == m["method"] and r["step"] == 2]
        assert m["crossover_seeds"] == sum(k is not None for k in ks)
        assert m["crossover_k_median"] == (None if all(k is None for k in ks) else float(ks[0]))
    assert "crossover_k" in (out / "table.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000 and (out / "pass_at_k.png").stat().st_size > 1000


def test_cli_rejects_unknown_preset_and_method(tmp_path, capsys):
    assert main(["--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["--preset", "rsc", "--out", str(tmp_path), "--methods", "grpo,bogus", "--steps", "1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_every_preset_is_well_formed():
    from apo_toy.methods import get_method

    assert {"squeeze", "rsc", "rsc_tabular", "tradeoff", "recovery", "ablation"} <= set(PRESETS)
    for p in PRESETS.values():
        p.spec.validate()
        p.cfg.validate()
        for m in p.methods:
            get_method(m)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_on_a_small_suite(name):
    """Each preset's methods and settings (mode, epochs, collapse phase) run end to end, shortened."""
    import dataclasses

    p = PRESETS[name]
    cfg = dataclasses.replace(p.cfg, steps=1, init_steps=min(p.cfg.init_steps, 2))
    small = {"n_train": 2, "n_heldout": 2} if isinstance(p.spec, CoupledSpec) else {"n_prompts": 2}
    spec = dataclasses.replace(p.spec, depth=min(p.spec.depth, 2), **small)
    for mode in ("exact", "sampled"):
        t = run_methods(spec, p.methods, dataclasses.replace(cfg, mode=mode), preset=name)
        assert len(t.where(step=1)) == len(p.methods)


def test_cli_spec_overrides(tmp_path, capsys):
    """--spec FIELD=VALUE changes the preset's suite (typed like the field); bad fields are named."""
    out = tmp_path / "k"
    args = ["--preset", "rsc", "--out", str(out), "--methods", "grpo", "--seeds", "1", "--steps", "1",
            "--spec", "n_train=3", "n_heldout=2", "depth=2", "peaked_frac=0"]
    assert main(args) == 0
    spec = json.load(open(out / "summary.json"))["settings"]["spec"]
    assert spec["n_train"] == 3 and spec["peaked_frac"] == 0.0 and spec["depth"] == 2
    assert main(["--preset", "rsc", "--out", str(out), "--spec", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["--preset", "rsc", "--out", str(out), "--spec", "n_train=2.5"]) == 2
    assert "n_train" in capsys.readouterr().err
    assert main(["--preset", "rsc", "--out", str(out), "--spec", "vocab=1"]) == 2
    assert "vocab" in capsys.readouterr().err


def test_hand_named_frontier_arms_are_arms_of_the_sweep():
    # a changed sweep strength must not silently drop an arm from the curves or the quick figure
    from paper_figures.sim import QUICK_FRONTIER_ARMS

    p = PRESETS["frontier"]
    names = {m.name for m in p.methods}
    assert p.frontier and p.curve_arms and set(p.curve_arms) <= names
    assert set(QUICK_FRONTIER_ARMS) <= names
    assert not any(q.frontier or q.curve_arms for q in PRESETS.values() if q.name != "frontier")
