"""The input checks' one-sum fast path (apo_llm/objectives.py `_clean`) never changes a verdict.

A finite sum proves the tensor clean; a sum that overflows (finite entries) or meets
+inf + -inf (allowed entries) must fall back to the elementwise check, which then accepts the
input, and a NaN or forbidden inf on a response position is still reported by name."""

from __future__ import annotations

import math

import pytest
import torch

from apo_llm.objectives import LossConfig, policy_loss

F64 = torch.float64


def _apo_inputs(B: int = 4, T: int = 3, K: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, dtype=F64, generator=g)
    return dict(logp=logp, old_logp=logp - 0.01, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=F64),
                mask=torch.ones(B, T, dtype=torch.bool),
                anchor_logp=-torch.rand(B, T, K, dtype=F64, generator=g) - 0.5,
                anchor_ref_logp=-torch.rand(B, T, K, dtype=F64, generator=g) - 0.5,
                anchor_is_sampled=torch.zeros(B, T, K, dtype=torch.bool))


def _loss(cfg: LossConfig, kw: dict) -> float:
    return float(policy_loss(cfg, **kw, diagnostics=False)[0])


def test_inf_minus_inf_sum_falls_back_and_accepts():
    """anchor_ref_logp may hold -inf (allowed); a +inf elsewhere makes the sum NaN without a NaN entry."""
    cfg = LossConfig(name="apo")
    kw = _apo_inputs()
    kw["anchor_ref_logp"][0, 0, 0] = -math.inf  # pi_ref = 0 there
    kw2 = dict(kw, anchor_ref_logp=kw["anchor_ref_logp"].clone())
    kw2["anchor_ref_logp"][0, 0, 1] = math.inf  # sum(-inf, +inf) = NaN: the fast path must not decide
    assert math.isnan(float(kw2["anchor_ref_logp"].sum()))
    # accepted (inf is allowed for anchors): Z_ref = inf there, so r_anchor = M_S / inf = 0, a finite loss
    assert math.isfinite(_loss(cfg, kw2))


def test_overflowing_sum_of_finite_advantages_is_accepted():
    """Finite advantages whose sum overflows to inf are clean: the elementwise check must say so."""
    cfg = LossConfig(name="grpo")
    kw = _apo_inputs()
    for k in ("anchor_logp", "anchor_ref_logp", "anchor_is_sampled"):
        kw.pop(k)
    kw["advantages"] = torch.full((4,), 1e308, dtype=F64)
    assert math.isinf(float(kw["advantages"].sum()))
    loss = _loss(cfg, kw)  # accepted: the elementwise check finds every entry finite
    assert loss < 0 and math.isinf(loss)  # A > 0, w ~ 1: -A w summed overflows to -inf, as it must


@pytest.mark.parametrize("field,value", [("logp", math.nan), ("old_logp", math.inf), ("advantages", -math.inf),
                                         ("anchor_logp", math.nan), ("anchor_ref_logp", math.nan)])
def test_bad_value_on_response_position_still_reported(field, value):
    cfg = LossConfig(name="apo")
    kw = _apo_inputs()
    x = kw[field].clone()
    x.view(-1)[1] = value
    kw[field] = x
    with pytest.raises(ValueError, match=rf"^{field}: [1-9][0-9]* response position"):
        _loss(cfg, kw)


def test_bad_value_on_pad_position_changes_nothing():
    cfg = LossConfig(name="apo")
    kw = _apo_inputs()
    kw["mask"][2, 2] = False
    base = _loss(cfg, kw)
    for field in ("logp", "old_logp", "anchor_logp", "anchor_ref_logp"):
        x = kw[field].clone()
        x[2, 2] = math.nan
        assert _loss(cfg, dict(kw, **{field: x})) == base
