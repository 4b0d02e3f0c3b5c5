"""passes.reference_pass, the one reference pass of both engines: every row slice's stats land in
their rows and first t columns, with the adapter switched off, and only what the loss needs exists."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch

import apo_llm.passes as passes
from apo_llm.objectives import LossConfig


def fake_stats(widths: dict, K: int, V: int = 11, seed: int = 0):
    """stats_of(rows, topk) with known numbers per slice; records whether the adapter was off."""
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def stats_of(rows, topk):
        b, t = rows.stop - rows.start, widths[rows.start]
        st = SimpleNamespace(logp=-torch.rand(b, t, generator=gen, dtype=torch.float64),
                             topk_ids=torch.randint(0, V, (b, t, topk), generator=gen) if topk else None,
                             topk_logp=-torch.rand(b, t, topk, generator=gen) if topk else None)
        calls.append((rows, topk, adapter_off["on"], st))
        return st, t

    return stats_of, calls


adapter_off = {"on": False}


@contextlib.contextmanager
def switch_off(_policy):
    adapter_off["on"] = True
    yield
    adapter_off["on"] = False


def run(monkeypatch, cfg, N=5, T=6, widths=None):
    monkeypatch.setattr(passes, "reference_context", switch_off)
    widths = widths or {0: 4, 2: 6, 4: 2}
    slices = [slice(0, 2), slice(2, 4), slice(4, 5)]
    comp_ids = torch.randint(0, 11, (N, T), generator=torch.Generator().manual_seed(1))
    stats_of, calls = fake_stats(widths, cfg.apo_k if cfg.needs_anchors else 0)
    out = passes.reference_pass(cfg, object(), stats_of, comp_ids, slices, torch.device("cpu"))
    return out, calls, comp_ids


def test_rows_and_columns_land_where_they_belong(monkeypatch):
    cfg = LossConfig(name="apo", apo_k=3)
    out, calls, comp_ids = run(monkeypatch, cfg)
    assert set(out) == {"ref_logp", "anchor_ids", "anchor_ref_logp", "anchor_is_sampled"}
    assert all(off for _, _, off, _ in calls) and not adapter_off["on"]  # inside, and only inside, the context
    for rows, topk, _, st in calls:
        t = st.logp.shape[1]
        assert topk == 3
        torch.testing.assert_close(out["ref_logp"][rows, :t], st.logp.float(), rtol=0, atol=0)
        assert (out["ref_logp"][rows, t:] == 0).all()
        assert torch.equal(out["anchor_ids"][rows, :t], st.topk_ids)
        assert torch.isinf(out["anchor_ref_logp"][rows, t:]).all()  # no anchors past a completion's end
    # y_t in M_t, against an explicit loop
    for i in range(comp_ids.shape[0]):
        for j in range(comp_ids.shape[1]):
            for k in range(3):
                assert bool(out["anchor_is_sampled"][i, j, k]) == (int(out["anchor_ids"][i, j, k]) == int(comp_ids[i, j]))


def test_a_loss_without_anchors_gets_only_ref_logp(monkeypatch):
    out, calls, _ = run(monkeypatch, LossConfig(name="grpo_kl", kl_coef=0.1))
    assert set(out) == {"ref_logp"} and all(topk == 0 for _, topk, _, _ in calls)
    assert not math.isnan(float(out["ref_logp"].sum()))
