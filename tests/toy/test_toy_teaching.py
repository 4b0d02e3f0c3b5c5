"""apo_toy.teaching: the functions behind the course's figures return what the lessons say (fast ones).

The simulator-heavy functions (contraction, crossover, tradeoff, study) are checked on their default
data in tests/teaching/test_lessons.py (slow lane)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apo_toy import teaching as T


def test_squeeze_profile_first_order_and_threshold():
    errs = []
    for eta in (1e-2, 1e-3):
        d = T.squeeze_profile(eta)
        errs.append(np.abs(d["measured"] - d["first_order"]).max())
    assert 80 < errs[0] / errs[1] < 120  # absolute error O(eta^2)
    d = T.squeeze_profile(1e-3)
    others = [k for k in range(10) if k != d["ybar"]]
    assert all((d["measured"][k] > 0) == (d["pi"][k] > d["threshold"]) for k in others)
    with pytest.raises(ValueError, match="ybar"):
        T.squeeze_profile(0.1, ybar=10)


def test_repeated_push_starves_the_rare_token():
    traj = T.repeated_push(0.3, 3, 30)
    assert traj.shape == (31, 10) and np.allclose(traj.sum(1), 1)
    assert traj[-1, 5] < traj[0, 5] and traj[-1, 0] > traj[0, 0] and traj[-1, 3] < 1e-3


def test_reach_scaling_is_exact_and_has_no_round_off_points():
    rs = T.reach_scaling()
    assert np.allclose(rs["ratio"], rs["c"][rs["prompt"]] * rs["reach"], rtol=1e-8)
    assert rs["masked"] > 0  # exact zeros exist and are left out ...
    assert np.abs(rs["ratio"]).min() > 1e-9  # ... so no plotted point is round-off (those sit at 1e-19 and below)
    assert np.log10(rs["reach"].max() / rs["reach"].min()) > 3  # the x-axis spans decades


def test_kl_identities_and_the_sharpening_conflict():
    kl = T.kl_identities()
    for est in ("k1", "k2", "k3"):
        assert np.allclose(*kl[est], atol=1e-12), est
    sc = T.sharpening_conflict()
    assert (np.sign(np.log(sc["ratio"]) - sc["kl"]) == -np.sign(sc["kl_descent"])).all()
    assert sc["kl_descent"].max() > 0 > sc["kl_descent"].min() and sc["reward"].min() > 0


def test_elastic_pull_matches_the_closed_form():
    ep = T.elastic_pull()
    assert np.allclose(ep["measured"], ep["predicted"], atol=1e-12)
    assert np.all(np.diff(ep["manifold_mass"]) < 0) and np.all(np.diff(ep["measured"]) > 0)


def test_silenced_share_threshold_and_visible_range():
    s = T.silenced_share()
    star = 1.05 - 1 + 0.2
    c = s["apo_old_mass"]
    assert (c[s["beta"] < star - 1e-9] == 0).all() and (c[s["beta"] > star + 1e-9] == 1).all()
    assert (s["apo_push_only"] == 0).all()
    assert s["apo"][0] == 0 and np.ptp(s["apo"]) > 0.9
    s0 = T.silenced_share(drift=0.0)
    assert np.allclose(s0["r_anchor"], 1) and np.allclose(s0["apo"], s0["apo_old_mass"])


def test_anchor_stats_by_k_against_enumeration():
    g = torch.Generator().manual_seed(0)
    B, L, V, kmax = 2, 5, 12, 6
    ref = torch.log_softmax(torch.randn(B, L, V, generator=g, dtype=torch.float64), -1)
    pol = torch.log_softmax(ref + 0.5 * torch.randn(B, L, V, generator=g, dtype=torch.float64), -1)
    ref_top, ids = ref.topk(kmax, -1)  # sorted by reference probability
    targets = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -1] = False
    a = T.anchor_stats_by_k(ref_top, pol.gather(-1, ids), ids, targets, mask, ks=(1, 3, 6))
    for i, k in enumerate((1, 3, 6)):
        inside = (ids[..., :k] == targets[..., None]).any(-1)
        assert a["inside"][i] == pytest.approx(float(inside[mask].float().mean()))
        assert a["manifold_mass"][i] == pytest.approx(float(pol.gather(-1, ids[..., :k]).exp().sum(-1)[mask].mean()))
    assert (np.diff(a["inside"]) >= 0).all()
    with pytest.raises(ValueError, match="ks"):
        T.anchor_stats_by_k(ref_top, pol.gather(-1, ids), ids, targets, mask, ks=(8,))


def _fake_runs(val_shift: float, test_shift: float, seeds: int = 3) -> dict:
    """{setting: [checkpoints per seed]} with known per-prompt success paths."""
    steps = np.arange(0, 50, 10)
    out = {}
    for j, st in enumerate((1.0, 0.5)):
        seq = []
        for s in range(seeds):
            base = np.linspace(0.2, 0.6, len(steps))[:, None] + 0.01 * s + 0.05 * j
            seq.append({"step": steps, "val_p": np.clip(base + val_shift, 0, 1) * np.ones((1, 4)),
                        "test_p": np.clip(base + test_shift, 0, 1) * np.ones((1, 4))})
        out[st] = seq
    return out


def test_select_reads_validation_only_and_last_takes_the_last_checkpoint():
    runs = _fake_runs(0.0, 0.1)
    a = T.select(runs, "validation", 8, 0.1)
    scrambled = {st: [dict(c, test_p=np.random.default_rng(1).random(c["test_p"].shape)) for c in v]
                 for st, v in runs.items()}
    b = T.select(scrambled, "validation", 8, 0.1)
    assert (a["step"] == b["step"]).all() and (a["setting"] == b["setting"]).all()
    assert (a["step"] > 0).all()  # the base (step 0) never meets "base + min_gain"
    last = T.select(runs, "last")
    assert (last["step"] == 40).all() and (last["setting"] == 1.0).all()
    with pytest.raises(ValueError, match="rule"):
        T.select(runs, "test")


def test_verdict_words():
    null, better, worse = _fake_runs(0, 0), _fake_runs(0, 0.2), _fake_runs(0, -0.15)
    v = T.verdict({"apo_old_token": better, "grpo": null}, "last", 1)
    assert v["word"] == "better" and v["mean"] > 2 * v["se"] >= 0
    assert T.verdict({"apo_old_token": worse, "grpo": null}, "last", 1)["word"] == "worse"
    same = T.verdict({"apo_old_token": null, "grpo": null}, "last", 1)
    assert same["word"] == "within noise" and same["mean"] == 0


def test_pass_at_is_one_minus_the_miss_probability():
    p = np.array([[0.0, 0.5, 1.0]])
    assert np.allclose(T.pass_at(p, 2), [(0 + 0.75 + 1) / 3])
