"""paper_figures.llm_miniature: the --quick sweep end to end, its numbers against (n, c), resumption.

One quick sweep (quick tiny model, 3 arms x 1 seed, 2 steps, 4 held-out problems x 32 samples) is
run once for the module (~1 min on 2 cores); the tests recompute what it reports from the
per-problem (n, c) records with math.comb, then cut the sweep and check that a rerun redoes
exactly the missing part.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paper_figures import llm_miniature as lm


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
        assert lm.main(["--quick", "--out", str(out)]) == 0
        yield out
    finally:
        mp.undo()


@pytest.mark.parametrize("split", lm.SPLITS)
def test_every_arm_and_seed_has_per_problem_counts(sweep, split):
    sz = lm.QUICK
    recs = _records(sweep, split)
    assert {r["problem_id"].rsplit("-", 1)[0] for r in recs} == {f"synthetic-{split}"}
    labels = {r["model"] for r in recs}
    want = {"base"} | {f"{a}-s{s}" for a in sz.arms for s in range(sz.seeds)}
    assert want <= labels
    assert any(lab.startswith(f"{lm.NULL_ARM}-s0@") for lab in labels), "GRPO's checkpoint trajectory is missing"
    for lab in labels:
        mine = [r for r in recs if r["model"] == lab]
        assert len({r["problem_id"] for r in mine}) == sz.problems, lab
        assert all(r["n"] == sz.n and 0 <= r["c"] <= r["n"] for r in mine), lab
    for a in sz.arms:
        assert (sweep / "runs" / f"{a}-s0" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("split", lm.SPLITS)
def test_reported_numbers_match_the_counts(sweep, split):
    res = json.loads((sweep / f"results{lm.SUFFIX[split]}.json").read_text())
    assert res["split"] == split
    recs = _records(sweep, split)
    n = lm.QUICK.n
    assert res["ks"] == list(range(1, n + 1))
    labels = {r["model"] for r in recs}
    nc = {lab: {r["problem_id"]: (r["n"], r["c"]) for r in recs if r["model"] == lab} for lab in labels}

    def curve(lab):
        return np.array([np.mean([_passk_comb(a, b, k) for a, b in nc[lab].values()]) for k in range(1, n + 1)])

    base = curve("base")
    np.testing.assert_allclose(res["base"]["pass@k"], base, atol=1e-12)
    for arm, a in res["arms"].items():
        cur = curve(f"{arm}-s0")
        np.testing.assert_allclose(a["mean"], cur, atol=1e-12)
        below = [k for k in range(1, n + 1) if cur[k - 1] < base[k - 1] - 1e-9]
        assert a["k_star"] == (below[0] if below else None)
        d = [nc[f"{arm}-s0"][p][1] - nc["base"][p][1] for p in nc["base"]]  # same n: compare c
        assert a["share_p_fell"] == pytest.approx(np.mean([x < 0 for x in d]))
        assert a["share_p_rose"] == pytest.approx(np.mean([x > 0 for x in d]))
        for k in (1, n // 4, n):  # paired gap to base over problems, from the counts with math.comb
            g = [_passk_comb(*nc[f"{arm}-s0"][p], k) - _passk_comb(*nc["base"][p], k) for p in nc["base"]]
            mean, se = a["gap"][str(k)]
            assert mean == pytest.approx(np.mean(g), abs=1e-12)
            assert se == pytest.approx(np.std(g, ddof=1) / math.sqrt(len(g)), abs=1e-12)
    assert "apo/neg_clipped_frac" in res["arms"]["apo_ref"]["diagnostics"]
    assert "apo/neg_clipped_frac" not in res["arms"]["grpo"]["diagnostics"]
    for name in (f"llm_miniature{lm.SUFFIX[split]}_passk", f"llm_miniature{lm.SUFFIX[split]}_frontier"):
        png = sweep / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, name


def test_interrupted_sweep_redoes_only_what_is_missing(sweep):
    # in place: a run directory resumes only where it was made (the trainer compares logging.output_dir)
    out = sweep
    recs = _records(out)
    # cut: apo_ref lost its final adapter (its checkpoint is intact) and its evaluation lines
    shutil.rmtree(out / "runs" / "apo_ref-s0" / "adapter")
    kept = [r for r in recs if r["model"] != "apo_ref-s0"]
    (out / "eval" / "per_problem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert lm.main(["--quick", "--out", str(out)]) == 0
    again = _records(out)
    assert again[:len(kept)] == kept, "records of finished models were rewritten"
    assert sorted(r["model"] for r in again[len(kept):]) == ["apo_ref-s0"] * lm.QUICK.problems
    assert (out / "runs" / "apo_ref-s0" / "adapter" / "adapter_config.json").is_file()
    # a finished sweep: a rerun samples nothing
    assert lm.main(["--quick", "--out", str(out)]) == 0
    assert len(_records(out)) == len(again)


def test_a_failing_arm_is_recorded_and_counted(sweep, tmp_path, monkeypatch):
    out = tmp_path / "fail"
    shutil.copytree(sweep, out)
    shutil.rmtree(out / "runs" / "apo_ref-s0")
    kept = [r for r in _records(out) if r["model"] != "apo_ref-s0"]
    (out / "eval" / "per_problem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def boom(cfg):
        raise RuntimeError("apo_anchor_norm needs anchor_old_logp")

    monkeypatch.setattr("apo_llm.train.train", boom)
    assert lm.main(["--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "apo_anchor_norm needs anchor_old_logp" in res["failed"]["apo_ref-s0"]
    assert "FAILED" in (out / "results.md").read_text()
    assert "apo_ref" not in res["arms"], "a failed arm must not be reported with numbers"
    # a recorded failure is not retried silently; --retry-failed does retry it
    monkeypatch.undo()
    assert lm.main(["--quick", "--out", str(out)]) == 0
    assert "apo_ref-s0" in json.loads((out / "results.json").read_text())["failed"]
    assert lm.main(["--quick", "--out", str(out), "--retry-failed"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["failed"] == {} and "apo_ref" in res["arms"]


def test_other_settings_in_the_same_directory_are_refused(sweep, tmp_path, capsys):
    out = tmp_path / "mixed"
    shutil.copytree(sweep, out)
    assert lm.main(["--quick", "--out", str(out), "--n", "16"]) == 2
    err = capsys.readouterr().err
    assert "use another --out" in err and f"out: {out} holds" in err


def test_two_processes_over_disjoint_arms_equal_one(sweep, tmp_path, tiny_model_dir):
    """The README's way to use both cores: two sweeps into one directory, then one to summarise."""
    out = tmp_path / "shared"
    env = {**os.environ, "APO_CACHE_DIR": str(Path(tiny_model_dir).parent), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "paper_figures.llm_miniature", "--quick", "--out", str(out), "--arms"]
    procs = [subprocess.Popen(cmd + arms, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for arms in (["grpo"], ["apo_ref", "grpo_kl_0.1"])]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    assert lm.main(["--quick", "--out", str(out)]) == 0
    for split in lm.SPLITS:
        name = f"results{lm.SUFFIX[split]}.json"
        one, two = (json.loads((d / name).read_text()) for d in (sweep, out))
        assert two["base"] == one["base"] and two["failed"] == {}
        for arm in lm.QUICK.arms:  # same seeds, same problems: the same counts, hence the same numbers
            assert two["arms"][arm]["pass@k"] == one["arms"][arm]["pass@k"], (split, arm)


def test_bad_arguments_name_the_field(tmp_path, capsys):
    assert lm.main(["--quick", "--out", str(tmp_path), "--arms", "gpro"]) == 2
    assert "arms" in capsys.readouterr().err
    assert lm.main(["--quick", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "seeds" in capsys.readouterr().err


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
        assert numbers[split]["grpo"]["pass@1"] == res["arms"]["grpo"]["mean"][0]
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
    recs = _records(out)
    ck = next(r["model"] for r in recs if r["model"].startswith(f"{lm.NULL_ARM}-s0@"))
    full = lm.summarize(out, lm.QUICK)
    assert full["trajectory"]["grpo-s0"]
    # the last problem of the checkpoint and of the apo arm are not evaluated yet
    drop = {(ck, [r for r in recs if r["model"] == ck][-1]["problem_id"]),
            ("apo_ref-s0", [r for r in recs if r["model"] == "apo_ref-s0"][-1]["problem_id"])}
    kept = [r for r in recs if (r["model"], r["problem_id"]) not in drop]
    (out / "eval" / "per_problem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    res = lm.summarize(out, lm.QUICK)
    assert "grpo-s0" not in res["trajectory"] and "apo_ref" not in res["arms"] and "grpo" in res["arms"]
