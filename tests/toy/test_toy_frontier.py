"""The frontier study (apo_toy/frontier.py), the baseline methods and the CLI outputs of the frontier preset."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from apo_toy import METHODS, CoupledSpec, SimConfig, SuiteSpec, build_suite, get_method
from apo_toy.training import run_methods
from apo_toy.dynamics import exact_batch, optional_inputs
from apo_toy.frontier import frontier_rows, grpo_record, iso_gain
from apo_toy.methods import report_label
from apo_toy.presets import PRESETS
from apo_toy.table import Table


def _rows(method, seed, points):
    return [{"method": method, "seed": seed, "step": s, "pass@1": x, "pass@256": y, "coverage": y / 2}
            for s, (x, y) in enumerate(points)]


def test_iso_gain_interpolates_grpo_record_points_by_hand():
    """GRPO: (0.2, 0.9) -> (0.4, 0.7) -> (0.3, 0.5: not a record) -> (0.6, 0.5). An arm ending at
    (0.5, 0.8) lies above the segment (0.4, 0.7)-(0.6, 0.5), whose value at 0.5 is 0.6: gain +0.2."""
    t = Table(_rows("grpo", 0, [(0.2, 0.9), (0.4, 0.7), (0.3, 0.5), (0.6, 0.5)]) + _rows("arm", 0, [(0.2, 0.9), (0.5, 0.8)]))
    xs, ys = grpo_record(t, 0)
    assert xs.tolist() == [0.2, 0.4, 0.6] and ys.tolist() == [0.9, 0.7, 0.5]
    assert iso_gain(0.5, 0.8, xs, ys) == (pytest.approx(0.2), "in")
    assert iso_gain(0.1, 0.95, xs, ys) == (pytest.approx(0.05), "below")  # against the base end
    assert iso_gain(0.7, 0.45, xs, ys) == (pytest.approx(-0.05), "above")  # against GRPO's best pass@1
    rows = {r["method"]: r for r in frontier_rows(t)}
    assert rows["arm"]["gain_pass@256"] == pytest.approx(0.2)
    assert rows["arm"]["gain_coverage"] == pytest.approx(0.4 - 0.3)
    assert rows["grpo"]["gain_pass@256"] == pytest.approx(0.0)  # its final point is a record point


def test_gain_is_per_seed_against_that_seeds_trajectory():
    """Seed 1's GRPO is shifted; each arm is compared with its own seed's null curve."""
    t = Table(_rows("grpo", 0, [(0.2, 0.9), (0.6, 0.5)]) + _rows("grpo", 1, [(0.2, 0.7), (0.6, 0.3)])
              + _rows("arm", 0, [(0.2, 0.9), (0.4, 0.8)]) + _rows("arm", 1, [(0.2, 0.7), (0.4, 0.6)]))
    arm = {r["method"]: r for r in frontier_rows(t)}["arm"]
    assert arm["n_seeds"] == 2 and arm["gain_pass@256"] == pytest.approx(0.1) and arm["gain_pass@256_std"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="null"):
        frontier_rows(Table(_rows("arm", 0, [(0.2, 0.9)])))


def test_frontier_preset_shape():
    p = PRESETS["frontier"]
    names = [getattr(m, "name", m) for m in p.methods]
    assert names[0] == "grpo" and p.seeds >= 5 and isinstance(p.spec, CoupledSpec) and p.spec.peaked_frac > 0
    for reading in ("apo", "apo_old_mass", "apo_old_token"):
        assert sum(n.startswith(reading + "@") for n in names) >= 3
    for m in p.methods:  # no positive-only rectified arm is in the sweep as APO
        assert not get_method(m).loss_config().is_positive_only


@pytest.mark.filterwarnings("ignore:LossConfig.*positive-only:UserWarning")  # a positive-only arm on purpose
def test_positive_only_arm_is_labelled():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_method("apo", apo_beta=0.3)
    assert "positive-only" in report_label(m) and report_label(get_method("apo")) == "apo"


def test_lower_lr_arm_equals_grpo_at_scaled_lr():
    from apo_toy import train_method

    suite = build_suite(SuiteSpec(n_prompts=2, branching=3, depth=2, top_k=2, n_extra_correct=1))
    _, low = train_method(suite, get_method("grpo_low_lr", lr_scale=0.25), SimConfig(steps=3, lr=10.0))
    _, same = train_method(suite, get_method("grpo"), SimConfig(steps=3, lr=2.5))
    _, full = train_method(suite, get_method("grpo"), SimConfig(steps=3, lr=10.0))
    assert torch.allclose(low, same, rtol=1e-12, atol=1e-12) and not torch.allclose(low, full, atol=1e-6)


def test_exact_mode_refuses_batch_coupled_losses_and_sampled_runs_them():
    suite = build_suite(SuiteSpec(n_prompts=2, branching=3, depth=2, top_k=2))
    for name in ("clip_cov", "kl_cov"):
        with pytest.raises(ValueError, match="sampled"):
            exact_batch(suite, METHODS[name].loss_config(), suite.ref_logits, 4, {"estimator": "grpo"})
    t = run_methods(SuiteSpec(n_prompts=2, branching=3, depth=2, top_k=2), ["clip_cov", "kl_cov"],
            SimConfig(mode="sampled", steps=2, lr=5.0))
    assert len(t.where(step=2)) == 2


def test_optional_inputs_builds_exactly_the_required_ones():
    cfg = get_method("apo_old_token").loss_config()
    made = []
    builders = {n: (lambda n=n: made.append(n) or torch.zeros(1)) for n in
                ("ref_logp", "kl_full", "entropy", "anchor_logp", "anchor_ref_logp", "anchor_is_sampled", "anchor_old_logp")}
    out = optional_inputs(cfg, builders)
    assert set(out) == set(made) == {"anchor_logp", "anchor_ref_logp", "anchor_is_sampled", "anchor_old_logp"}
    del builders["anchor_old_logp"]
    with pytest.raises(ValueError, match="anchor_old_logp"):
        optional_inputs(cfg, builders)


def test_cli_frontier_quick_writes_table_and_figure(tmp_path):
    """The CI path: --quick (2 seeds, 20 steps, 8 + 8 prompts) on a subset of the sweep; < 60 s."""
    from apo_toy.run import main
    os.environ["MPLBACKEND"] = "Agg"
    out = tmp_path / "frontier"
    arms = "grpo,grpo@lr_x0.5,apo@beta=0.1,apo_old_mass@beta=0.1,apo_old_token@beta=0.1,topk_kl_on_wrong@0.1,nsr"
    assert main(["--preset", "frontier", "--out", str(out), "--quick", "--methods", arms]) == 0
    data = json.load(open(out / "frontier.json"))
    assert [r["method"] for r in data["arms"]] == arms.split(",")
    for r in data["arms"]:
        assert r["n_seeds"] == 2 and set(r["range"].split(",")) <= {"in", "below", "above"}
    md = (out / "frontier.md").read_text()
    assert "iso-pass@1 gain" in md and "apo_old_token@beta=0.1" in md
    for f in ("frontier.png", "curves.png", "pass_at_k.png"):
        assert (out / f).stat().st_size > 10_000
    assert main(["--replot", str(out)]) == 0 and (out / "frontier.md").read_text() == md


def test_cli_frontier_without_grpo_writes_no_gain_table(tmp_path, capsys):
    from apo_toy.run import main

    out = tmp_path / "f"
    assert main(["--preset", "frontier", "--out", str(out), "--quick", "--steps", "2", "--methods", "apo@beta=0.1"]) == 0
    assert not (out / "frontier.md").exists() and (out / "table.md").exists()
    assert "grpo" in capsys.readouterr().err
