"""apo_toy/presets.py: every preset resolves to Method objects, overrides apply, mistakes name the field."""

from __future__ import annotations

import warnings

import pytest

from apo_toy.methods import Method, report_label
from apo_toy.presets import PRESETS, get_preset, resolve_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_to_methods_and_a_valid_config(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tradeoff sweep's positive-only corners warn (and say so in their names)
        r = resolve_preset(name)
    assert r.methods and all(isinstance(m, Method) for m in r.methods)
    assert len({m.name for m in r.methods}) == len(r.methods)  # arm names identify the rows
    r.cfg.validate()
    assert r.seeds == PRESETS[name].seeds and r.spec == PRESETS[name].spec


def test_overrides_apply_and_none_keeps_the_presets_value():
    p = get_preset("rsc")
    r = resolve_preset("rsc", mode="sampled", steps=7, lr=None, optimizer="sgd", seeds=3)
    assert (r.cfg.mode, r.cfg.steps, r.cfg.lr, r.cfg.optimizer, r.seeds) == ("sampled", 7, p.cfg.lr, "sgd", 3)
    r = resolve_preset("rsc", spec_overrides={"n_train": 3})
    assert r.spec.n_train == 3 and r.spec.n_heldout == p.spec.n_heldout


def test_a_method_name_is_the_presets_own_arm_first():
    r = resolve_preset("frontier", methods=["apo@beta=0.1", "grpo"])
    assert [m.name for m in r.methods] == ["apo@beta=0.1", "grpo"]
    assert r.methods[0].loss["apo_beta"] == 0.1


def test_mistakes_name_what_is_wrong():
    with pytest.raises(ValueError, match="preset: unknown 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="bogus"):
        resolve_preset("rsc", methods=["bogus"])
    with pytest.raises(ValueError, match=r"spec: unknown field\(s\) \[.colour.\]"):
        resolve_preset("rsc", spec_overrides={"colour": 1})


def test_frontier_apo_arms_are_apo_not_positive_only():
    """The frontier sweep keeps rectified betas below lambda - (1 - eps_low): none is reported as positive-only."""
    labels = [report_label(m) for m in resolve_preset("frontier").methods]
    assert not [x for x in labels if "positive-only" in x]
