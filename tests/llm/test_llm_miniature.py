"""apo_llm.miniature: the --quick sweep end to end, its numbers against (n, c), the
validation-only selection, resumption.

One quick sweep (quick tiny model, 3 arms, 2 steps, GRPO and the validation-best of two arms on a
second seed; 4 validation problems x 16 samples, 4 problems x 32 samples per reported split) is run
once for the module (~1 min of CPU); the tests recompute what it reports from the per-problem (n, c)
records with math.comb, check that selection sees validation only, then cut the sweep and check
that a rerun redoes exactly the missing part.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apo_llm import miniature as lm
from apo_llm.miniature import selection
from apo_llm.miniature.__main__ import main as mini_main


def _passk_comb(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _records(out: Path, split: str = "test") -> list[dict]:
    path = out / f"eval{lm.SUFFIX[split]}" / "per_problem.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("APO_CACHE_DIR", str(Path(tiny_model_dir).parent))  # the session's quick build, not ~/.cache
    out = tmp_path_factory.mktemp("mini") / "sweep"
    try:
        assert mini_main(["--quick", "--out", str(out)]) == 0
        yield out
    finally:
        mp.undo()


ALL_SPLITS = (lm.VALIDATION, *lm.SPLITS)


def _nc(out: Path, split: str) -> dict:
    recs = _records(out, split)
    return {lab: {r["problem_id"]: (r["n"], r["c"]) for r in recs if r["model"] == lab} for lab in {r["model"] for r in recs}}


def _runs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").iterdir() if (p / "adapter" / "adapter_config.json").is_file())


def _val_pass1(nc: dict, lab: str) -> float:
    return float(np.mean([_passk_comb(a, b, 1) for a, b in nc[lab].values()]))


def test_the_presets_declare_the_grid_and_the_seed_rule():
    for prefix in lm.READINGS:
        assert {f"{prefix}_b{b:g}" for b in (0.01, 0.03, 0.1)} <= set(lm.FULL.arms)
    assert {"grpo", "grpo_kl_1e-3", "grpo_kl_0.1", "kl_on_wrong", "psr", "nsr"} <= set(lm.FULL.arms)
    from apo_llm.objectives import POLICY_TERMS

    assert (lm.SILENCE_LOSS in lm.ARMS) == (lm.SILENCE_LOSS in POLICY_TERMS)  # listed once it is registered
    assert lm.FULL.seeds == 3 and lm.FULL.more_seeds == 5
    assert set(lm.FULL.more_seeds_for) == {("grpo",), lm.A_ARMS, lm.KL_ARMS, lm.CH_ARMS}
    for arm in lm.ARMS:  # every arm builds a valid trainer config with its own beta / reading
        cfg = lm.run_config(Path("/tmp/x"), arm, 0, lm.FULL, 1)
        for key, value in lm.ARMS[arm].get("loss", {}).items():
            assert getattr(cfg.loss, key) == value, (arm, key)


@pytest.mark.parametrize("split", ALL_SPLITS)
def test_every_run_has_per_problem_counts(sweep, split):
    sz = lm.QUICK
    recs = _records(sweep, split)
    assert {r["problem_id"].rsplit("-", 1)[0] for r in recs} == {f"synthetic-{split}"}
    labels = {r["model"] for r in recs}
    runs = _runs(sweep)
    # GRPO and the validation-best of the second group have 2 seeds, the other arm 1
    assert len(runs) == 5 and {"grpo-s0", "grpo-s1", "apo_ref_b0.1-s0", "grpo_kl_0.1-s0"} <= set(runs)
    res = json.loads((sweep / "results.json").read_text())
    want = {"base"}
    for run in runs:
        steps = lm.eval_steps(sz) if split == lm.VALIDATION else {res["stop_steps"][run], sz.steps}
        want |= {f"{run}@{t}" for t in steps}
    assert labels == want  # a reported split sees only the selected and the final step
    problems, n = lm.split_size(sz, split)
    for lab in labels:
        mine = [r for r in recs if r["model"] == lab]
        assert len({r["problem_id"] for r in mine}) == problems, lab
        assert all(r["n"] == n and 0 <= r["c"] <= r["n"] for r in mine), lab


@pytest.mark.parametrize("split", lm.SPLITS)
def test_reported_numbers_match_the_counts(sweep, split):
    res = json.loads((sweep / f"results{lm.SUFFIX[split]}.json").read_text())
    assert res["split"] == split
    nc, n = _nc(sweep, split), lm.QUICK.n
    assert res["ks"] == list(range(1, n + 1))

    def curve(lab):
        return np.array([np.mean([_passk_comb(a, b, k) for a, b in nc[lab].values()]) for k in range(1, n + 1)])

    base = curve("base")
    np.testing.assert_allclose(res["base"]["pass@k"], base, atol=1e-12)
    assert set(res["arms"]) == set(lm.QUICK.arms)
    for arm, a in res["arms"].items():
        for point, steps in (("selected", a["stop_step"]), ("final", [lm.QUICK.steps] * len(a["seeds"]))):
            labs = [f"{arm}-s{s}@{t}" for s, t in zip(a["seeds"], steps)]
            cur = np.array([curve(lab) for lab in labs])
            st_ = a[point]
            np.testing.assert_allclose(st_["mean"], cur.mean(0), atol=1e-12)
            below = [k for k in range(1, n + 1) if cur.mean(0)[k - 1] < base[k - 1] - 1e-9]
            assert st_["k_star"] == (below[0] if below else None)
            d = [[nc[lab][p][1] - nc["base"][p][1] for p in nc["base"]] for lab in labs]  # same n: compare c
            assert st_["share_p_fell"] == pytest.approx(np.mean([np.mean([x < 0 for x in r]) for r in d]))
            for k in (1, n // 4, n):  # paired gap to base over problems (seed mean per problem), math.comb
                g = [np.mean([_passk_comb(*nc[lab][p], k) for lab in labs]) - _passk_comb(*nc["base"][p], k)
                     for p in nc["base"]]
                mean, se = st_["gap"][str(k)]
                assert mean == pytest.approx(np.mean(g), abs=1e-12)
                assert se == pytest.approx(np.std(g, ddof=1) / math.sqrt(len(g)), abs=1e-12)
            _check_gain_over_grpo(res, arm, point, curve, n)
    assert "apo/neg_clipped_grad_frac" in res["arms"]["apo_ref_b0.1"]["diagnostics"]
    assert "apo/neg_clipped_frac" not in res["arms"]["grpo"]["diagnostics"]
    names = [f"llm_miniature{lm.SUFFIX[split]}_passk", f"llm_miniature{lm.SUFFIX[split]}_frontier"]
    for name in names + ["llm_miniature_curves"]:
        png = sweep / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, name


def _check_gain_over_grpo(res, arm, point, curve, n):
    """vs_null recomputed from the counts: per-seed pass@k (math.comb), mean difference to GRPO's seeds
    at the same point, Welch s.e. from statistics.variance; NaN when a side has one seed."""
    def per_seed(name):
        a = res["arms"][name]
        steps = a["stop_step"] if point == "selected" else [lm.QUICK.steps] * len(a["seeds"])
        return [curve(f"{name}-s{s}@{t}") for s, t in zip(a["seeds"], steps)]

    if arm == "grpo":
        assert "vs_null" not in res["arms"][arm][point]  # no gain of the null over itself
        return
    mine, null = per_seed(arm), per_seed("grpo")
    for k in (1, n // 4, n):
        x, y = [c[k - 1] for c in mine], [c[k - 1] for c in null]
        gain, se = res["arms"][arm][point]["vs_null"][str(k)]
        assert gain == pytest.approx(statistics.fmean(x) - statistics.fmean(y), abs=1e-12)
        if min(len(x), len(y)) < 2:
            assert math.isnan(se)
        else:
            want = math.sqrt(statistics.variance(x) / len(x) + statistics.variance(y) / len(y))
            assert se == pytest.approx(want, abs=1e-12)


def test_stopping_and_seed_picks_are_the_validation_argmax(sweep):
    """Recomputed from the validation counts alone: each run's stop is its first best step, and the
    extra seed went to the group arm with the best seed-mean validation pass@1 at its stops."""
    val, res = _nc(sweep, lm.VALIDATION), json.loads((sweep / "results.json").read_text())
    steps = lm.eval_steps(lm.QUICK)
    for run in _runs(sweep):
        scores = [_val_pass1(val, f"{run}@{t}") for t in steps]
        assert res["stop_steps"][run] == steps[int(np.argmax(scores))], run
    group = ("apo_ref_b0.1", "grpo_kl_0.1")
    mean = {a: _val_pass1(val, f"{a}-s0@{res['stop_steps'][f'{a}-s0']}") for a in group}
    best = max(group, key=lambda a: (mean[a], -group.index(a)))
    assert {"group": list(group), "picked": best} in res["seed_groups"]
    assert (sweep / "runs" / f"{best}-s1" / "adapter").is_dir()
    other = next(a for a in group if a != best)
    assert not (sweep / "runs" / f"{other}-s1").exists()


def test_selection_never_receives_test_metrics(sweep, tmp_path, monkeypatch):
    """One function selects for every arm and GRPO alike, and it only ever sees validation scores:
    spied on, every call carries ValidationScores of the validation split whose numbers are the
    validation records'; and scrambling the test records changes no selection."""
    calls = []
    real = lm.select_best

    def spy(val):
        calls.append(val)
        return real(val)

    monkeypatch.setattr(selection, "select_best", spy)  # the one rule stop_steps and group_picks call
    res = lm.summarize(sweep, lm.QUICK, "test")
    assert calls and all(isinstance(v, lm.ValidationScores) and v.split == lm.VALIDATION for v in calls)
    val = _nc(sweep, lm.VALIDATION)
    steps = lm.eval_steps(lm.QUICK)
    step_calls = [v for v in calls if list(v.scores) == steps]
    for run in _runs(sweep):  # GRPO's runs go through the same function as every arm's
        want = [_val_pass1(val, f"{run}@{t}") for t in steps]
        assert any(list(v.scores.values()) == pytest.approx(want, abs=1e-15) for v in step_calls), run
    assert any(set(v.scores) == {"apo_ref_b0.1", "grpo_kl_0.1"} for v in calls)  # the seed pick, too
    # the reported splits never reach it: set every test / test_hard count to n (all correct) and
    # the stops and picks stay what validation made them
    out = tmp_path / "scrambled"
    shutil.copytree(sweep, out)
    for split in lm.SPLITS:
        path = out / f"eval{lm.SUFFIX[split]}" / "per_problem.jsonl"
        path.write_text("".join(json.dumps({**r, "c": r["n"] if r["model"] != "base" else 0}) + "\n"
                                for r in _records(out, split)))
    again = lm.summarize(out, lm.QUICK, "test")
    assert again["stop_steps"] == res["stop_steps"] and again["seed_groups"] == res["seed_groups"]
    assert again["arms"]["grpo"]["selected"]["mean"][0] == 1.0  # ... while the reported numbers moved
    monkeypatch.undo()
    with pytest.raises(ValueError, match="validation"):
        lm.select_best(lm.ValidationScores({1: 0.5}, split="test"))
    with pytest.raises(ValueError, match="validation"):
        lm.select_best({1: 0.5})


@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_select_best_is_the_first_maximum(xs):
    got = lm.select_best(lm.ValidationScores(dict(enumerate(xs))))
    assert xs[got] == max(xs) and all(x < max(xs) for x in xs[:got])


def test_curves_are_the_training_logs(sweep):
    cur = json.loads((sweep / "curves.json").read_text())
    assert cur["keys"] == list(lm.CURVE_KEYS)
    for arm in lm.QUICK.arms:
        logs = [[json.loads(x) for x in (sweep / "runs" / run / "metrics.jsonl").read_text().splitlines()]
                for run in _runs(sweep) if run.rsplit("-s", 1)[0] == arm]
        logs = [[r for r in log if "reward" in r] for log in logs]
        entry = cur["arms"][arm]
        for key in lm.CURVE_KEYS:
            if all(key in r for log in logs for r in log):
                assert entry[key]["runs"] == [[r[key] for r in log] for log in logs], (arm, key)
            else:
                assert key not in entry, (arm, key)
        assert len(entry["validation pass@1"]["runs"]) == len(logs)
    # what the trainer logs: entropy and the clipped push share for every arm, KL and the manifold
    # mass only where the loss computes the reference pass
    assert {"entropy", "clip_grad_frac/neg"} <= set(cur["arms"]["grpo"]) and "kl" not in cur["arms"]["grpo"]
    assert {"kl", "apo/manifold_mass"} <= set(cur["arms"]["apo_ref_b0.1"])
    for line in (sweep / "runs" / "apo_ref_b0.1-s0" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)  # the curve's clipped share is APO's own diagnostic for APO
        if "reward" in r:
            assert r["clip_grad_frac/neg"] == pytest.approx(r["apo/neg_clipped_grad_frac"], abs=1e-6)


def test_interrupted_sweep_redoes_only_what_is_missing(sweep):
    # in place: a run directory resumes only where it was made (the trainer compares logging.output_dir)
    out = sweep
    # cut: apo_ref_b0.1-s0 lost its final adapter (its checkpoint is intact) and its evaluation lines
    shutil.rmtree(out / "runs" / "apo_ref_b0.1-s0" / "adapter")
    kept, before = {}, {}
    for split in ALL_SPLITS:
        before[split] = _records(out, split)
        kept[split] = [r for r in before[split] if not r["model"].startswith("apo_ref_b0.1-s0@")]
        path = out / f"eval{lm.SUFFIX[split]}" / "per_problem.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in kept[split]))
    assert mini_main(["--quick", "--out", str(out)]) == 0
    for split in ALL_SPLITS:
        again = _records(out, split)
        assert again[:len(kept[split])] == kept[split], "records of finished models were rewritten"
        new = again[len(kept[split]):]
        assert {r["model"] for r in new} <= {f"apo_ref_b0.1-s0@{t}" for t in lm.eval_steps(lm.QUICK)}
        # the resumed run retrains to the same adapter: the same counts as before the cut
        was = sorted((r["model"], r["problem_id"], r["c"]) for r in before[split] if r["model"].startswith("apo_ref_b0.1-s0@"))
        assert sorted((r["model"], r["problem_id"], r["c"]) for r in new) == was, split
    assert (out / "runs" / "apo_ref_b0.1-s0" / "adapter" / "adapter_config.json").is_file()
    # a finished sweep: a rerun samples nothing
    n = len(_records(out))
    assert mini_main(["--quick", "--out", str(out)]) == 0
    assert len(_records(out)) == n


def test_a_failing_arm_is_recorded_and_counted(sweep, tmp_path, monkeypatch):
    out = tmp_path / "fail"
    shutil.copytree(sweep, out)
    shutil.rmtree(out / "runs" / "apo_ref_b0.1-s0")
    for split in ALL_SPLITS:
        kept = [r for r in _records(out, split) if not r["model"].startswith("apo_ref_b0.1-s0@")]
        (out / f"eval{lm.SUFFIX[split]}" / "per_problem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def boom(cfg):
        if cfg.logging.run_name == "apo_ref_b0.1-s0":
            raise RuntimeError("apo_anchor_norm needs anchor_old_logp")
        return real(cfg)

    from apo_llm import train as train_mod

    real = train_mod.train
    monkeypatch.setattr("apo_llm.train.train", boom)
    assert mini_main(["--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "apo_anchor_norm needs anchor_old_logp" in res["failed"]["apo_ref_b0.1-s0"]
    assert "FAILED" in (out / "results.md").read_text()
    assert "apo_ref_b0.1" not in res["arms"], "a failed arm must not be reported with numbers"
    # the failed arm is no candidate for the extra seed: the group's other arm gets it
    assert {"group": ["apo_ref_b0.1", "grpo_kl_0.1"], "picked": "grpo_kl_0.1"} in res["seed_groups"]
    # a recorded failure is not retried silently; --retry_failed does retry it
    monkeypatch.undo()
    assert mini_main(["--quick", "--out", str(out)]) == 0
    assert "apo_ref_b0.1-s0" in json.loads((out / "results.json").read_text())["failed"]
    assert mini_main(["--quick", "--out", str(out), "--retry_failed"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["failed"] == {} and "apo_ref_b0.1" in res["arms"]


def test_other_settings_in_the_same_directory_are_refused(sweep, tmp_path, capsys):
    out = tmp_path / "mixed"
    shutil.copytree(sweep, out)
    assert mini_main(["--quick", "--out", str(out), "--n", "16"]) == 2
    err = capsys.readouterr().err
    assert "use another --out" in err and f"out: {out} holds" in err


def test_two_processes_over_disjoint_arms_equal_one(sweep, tmp_path, tiny_model_dir):
    """The README's way to use both cores: two sweeps into one directory, then one to summarise."""
    out = tmp_path / "shared"
    env = {**os.environ, "APO_CACHE_DIR": str(Path(tiny_model_dir).parent), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "apo_llm.miniature", "--quick", "--out", str(out), "--arms"]
    procs = [subprocess.Popen(cmd + arms, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for arms in (["grpo"], ["apo_ref_b0.1", "grpo_kl_0.1"])]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read().decode()[-2000:]
    assert mini_main(["--quick", "--out", str(out)]) == 0
    assert _runs(out) == _runs(sweep)
    for split in lm.SPLITS:
        name = f"results{lm.SUFFIX[split]}.json"
        one, two = (json.loads((d / name).read_text()) for d in (sweep, out))
        assert two["base"] == one["base"] and two["failed"] == {}
        assert two["stop_steps"] == one["stop_steps"] and two["seed_groups"] == one["seed_groups"]
        for arm in lm.QUICK.arms:  # same seeds, same problems: the same counts, hence the same numbers
            for point in ("selected", "final"):
                assert two["arms"][arm][point]["pass@k"] == one["arms"][arm][point]["pass@k"], (split, arm)


def test_bad_arguments_name_the_field(tmp_path, capsys):
    assert mini_main(["--quick", "--out", str(tmp_path), "--arms", "gpro"]) == 2
    assert "arms" in capsys.readouterr().err
    assert mini_main(["--quick", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "seeds" in capsys.readouterr().err
    assert mini_main(["--quick", "--out", str(tmp_path), "--every", "5"]) == 2
    assert "every" in capsys.readouterr().err


def test_command_line_spellings_and_one_line_errors(tmp_path, capsys):
    """The options parser: the old dash spelling still works (one deprecation line), --splits takes
    only the reported splits, a typo names the flag; all before anything is trained."""
    from apo_llm.miniature.__main__ import MiniatureOptions, sizes_from
    from apo_llm.options import parse_command

    opts = parse_command(MiniatureOptions, ["--quick", "--more-seeds", "3", "--val-n", "8", "--splits", "test",
                                            "--arms", "grpo,grpo_kl_0.1", "--retry-failed"], prog="x")
    err = capsys.readouterr().err
    assert err.count("deprecated") == 3 and "--more_seeds" in err and "--retry_failed" in err
    sz = sizes_from(opts)
    assert (sz.more_seeds, sz.val_n, sz.splits, opts.arms, opts.retry_failed) == (3, 8, ("test",), ["grpo", "grpo_kl_0.1"], True)
    assert sz.steps == lm.QUICK.steps and sz.train == lm.QUICK.train  # what is not given stays the preset's
    assert sizes_from(parse_command(MiniatureOptions, ["--seeds", "7"], prog="x")).more_seeds == 7  # all alike
    for argv, field in ((["--splits", "validation"], "splits"), (["--stpes", "3"], "stpes"), (["--n", "x"], "n")):
        assert mini_main(["--quick", "--out", str(tmp_path / "never"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {field}"), err
    assert not (tmp_path / "never").exists()


def test_the_old_module_name_is_a_deprecated_shim(tmp_path, capsys):
    from paper_figures import llm_miniature as old

    assert old.ARMS is lm.ARMS and old.run_config is lm.run_config  # old imports keep working
    assert old.main(["--quick", "--out", str(tmp_path), "--arms", "gpro"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "deprecated" in err[0] and "apo_llm.miniature" in err[0] and err[1].startswith("error: arms")


def test_names_and_checkpoint_steps():
    sz = lm.QUICK
    assert lm.label_of(lm.run_name("grpo_kl_0.1", 3), 20) == "grpo_kl_0.1-s3@20"
    assert lm.eval_steps(sz) == [1, 2]
    import dataclasses

    assert lm.eval_steps(dataclasses.replace(sz, steps=50, every=20)) == [20, 40, 50]  # the final step too
    assert lm.split_size(sz, lm.VALIDATION) == (sz.val_problems, sz.val_n) and lm.split_size(sz, "test") == (sz.problems, sz.n)
    assert lm.SUFFIX == {"test": "", "test_hard": "_test_hard", "validation": "_validation"}  # on-disk names


def test_check_settings_keeps_one_directory_to_one_setting(tmp_path):
    from apo_llm.miniature.layout import check_settings, write_atomic

    path = tmp_path / "settings.json"
    check_settings(path, {"n": 32, "seed": 1}, tmp_path)  # first call: written
    assert json.loads(path.read_text()) == {"n": 32, "seed": 1}
    check_settings(path, {"n": 32}, tmp_path)  # the same (or fewer) settings: accepted, file kept
    with pytest.raises(ValueError, match=r"n: 32 vs 16.*use another --out"):
        check_settings(path, {"n": 16}, tmp_path)
    write_atomic(path, "x\n")
    assert path.read_text() == "x\n" and [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # no temp left


@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=2, max_size=8), st.data())
def test_stats_against_math_comb(pairs, data):
    """passk_curve, gap_vs_base and p_shift recomputed with math.comb on random (n, c) counts."""
    from apo_llm.miniature import stats

    base = {f"p{i}": (n, min(c, n)) for i, (n, c) in enumerate(pairs)}
    arm = {p: (n, data.draw(st.integers(0, n))) for p, (n, _) in base.items()}
    k = data.draw(st.integers(1, min(n for n, _ in base.values())))
    got = stats.passk_curve(arm, [k])[0]
    assert got == pytest.approx(np.mean([_passk_comb(n, c, k) for n, c in arm.values()]), abs=1e-12)
    d = [_passk_comb(*arm[p], k) - _passk_comb(*base[p], k) for p in sorted(base)]
    mean, se = stats.gap_vs_base([arm], base, k)
    assert mean == pytest.approx(np.mean(d), abs=1e-12)
    assert se == pytest.approx(np.std(d, ddof=1) / math.sqrt(len(d)), abs=1e-12)
    fell, rose = stats.p_shift(arm, base)
    q = [arm[p][1] / arm[p][0] - base[p][1] / base[p][0] for p in base]
    assert (fell, rose) == (pytest.approx(np.mean([x < 0 for x in q])), pytest.approx(np.mean([x > 0 for x in q])))
    assert stats.gap_ks(256) == [1, 64, 256] and stats.gap_ks(2) == [1, 2]


@given(st.lists(st.floats(0, 1), min_size=1, max_size=8), st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_gain_over_null_is_the_welch_difference(arm, null):
    from apo_llm.miniature import stats

    gain, se = stats.gain_over_null(arm, null)
    assert gain == pytest.approx(statistics.fmean(arm) - statistics.fmean(null), abs=1e-12)
    if min(len(arm), len(null)) < 2:
        assert math.isnan(se)
    else:
        assert se == pytest.approx(math.sqrt(statistics.variance(arm) / len(arm)
                                             + statistics.variance(null) / len(null)), abs=1e-12)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_crossover_is_the_first_k_below_base(a, b):
    m = min(len(a), len(b))
    arm, base = np.array(a[:m]), np.array(b[:m])
    ks = list(range(1, m + 1))
    k = lm.crossover_k(arm, base, ks)
    if k is None:
        assert all(arm >= base - 1e-9)
    else:
        assert arm[k - 1] < base[k - 1] - 1e-9 and all(arm[: k - 1] >= base[: k - 1] - 1e-9)


def test_paper_figures_draws_the_sweep(sweep, tmp_path):
    from paper_figures.__main__ import main as figures_main

    out = tmp_path / "figs"
    assert figures_main(["--only", "llm_miniature", "--miniature", str(sweep), "--out", str(out)]) == 0
    numbers = json.loads((out / "numbers.json").read_text())["llm_miniature"]
    for split in lm.SPLITS:
        for name in (f"llm_miniature{lm.SUFFIX[split]}_passk", f"llm_miniature{lm.SUFFIX[split]}_frontier"):
            assert (out / f"{name}.png").stat().st_size > 20_000 and (out / f"{name}.pdf").is_file()
        res = json.loads((sweep / f"results{lm.SUFFIX[split]}.json").read_text())
        assert numbers[split]["grpo"]["pass@1"] == res["arms"]["grpo"]["selected"]["mean"][0]
    assert (out / "llm_miniature_curves.png").stat().st_size > 20_000
    assert figures_main(["--only", "llm_miniature", "--out", str(out)]) == 2  # names the missing --miniature


# ---- the demo's curves.png (apo_llm.plots) ----


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.integers(1, 10))
def test_smooth_is_the_trailing_mean(ys, window):
    from apo_llm.plots import smooth

    got = smooth(ys, window)
    for i in range(len(ys)):
        seg = ys[max(0, i - window + 1): i + 1]
        assert got[i] == pytest.approx(sum(seg) / len(seg), rel=1e-9, abs=1e-9)


def test_curves_give_each_quantity_its_own_axis(tmp_path):
    from apo_llm.plots import _panels, plot_run, read_metrics

    rng = np.random.default_rng(0)
    lines = [{"step": s, "reward": float(rng.random()), "apo/r_anchor_mean": 1000.0 + s, "apo/pull": 0.1,
              "apo/neg_clipped_frac": 0.5, "grad_norm": 0.2} for s in range(1, 31)]
    lines += [{"step": s, "eval/pass@1": 0.2, "eval/pass@8": 0.7} for s in (0, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    panels = _panels(*read_metrics(tmp_path / "metrics.jsonl"))
    keys = [k for _, ks, _, _ in panels for k in ks]
    assert [ks for _, ks, _, _ in panels if "apo/pull" in ks] == [["apo/pull"]], "pull shares an axis"
    assert "apo/neg_clipped_frac" in keys and {"eval/pass@1", "eval/pass@8"} <= set(keys)
    assert "kl" not in keys  # absent metrics get no empty panel
    (png,) = plot_run(tmp_path)
    assert png.name == "curves.png" and png.stat().st_size > 20_000


def test_partly_evaluated_models_give_no_numbers(sweep, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(sweep, out)
    full = lm.summarize(out, lm.QUICK)
    assert "grpo-s0" in full["stop_steps"] and "apo_ref_b0.1" in full["arms"]
    # a validation checkpoint of grpo-s0 and apo_ref_b0.1-s0's final step on test lack a problem each
    val, test = _records(out, lm.VALIDATION), _records(out)
    drop_v = ("grpo-s0@1", [r for r in val if r["model"] == "grpo-s0@1"][-1]["problem_id"])
    lab = f"apo_ref_b0.1-s0@{lm.QUICK.steps}"
    drop_t = (lab, [r for r in test if r["model"] == lab][-1]["problem_id"])
    (out / "eval_validation" / "per_problem.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in val if (r["model"], r["problem_id"]) != drop_v))
    (out / "eval" / "per_problem.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in test if (r["model"], r["problem_id"]) != drop_t))
    res = lm.summarize(out, lm.QUICK)
    assert "grpo-s0" not in res["stop_steps"]  # no stop without every checkpoint's validation numbers
    assert res["arms"]["grpo"]["seeds"] == [1]
    assert 0 not in res["arms"].get("apo_ref_b0.1", {"seeds": []})["seeds"]
