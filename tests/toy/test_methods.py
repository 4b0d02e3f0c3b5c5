"""apo_toy/methods.py: the arms' registry, variants routed field by field, positive-only arms labelled."""

from __future__ import annotations

import warnings

import pytest

from apo_llm.objectives import LossConfig
from apo_toy.methods import METHODS, get_method, report_label


def test_every_registered_method_builds_its_loss():
    for name, m in METHODS.items():
        assert m.name == name
        if not m.yardstick:
            assert isinstance(m.loss_config(), LossConfig)


def test_a_variant_routes_each_setting_to_its_place():
    m = get_method("grpo_kl", kl_coef=0.2, estimator="dr_grpo", lr=0.5, optimizer="adam")
    assert m.loss["kl_coef"] == 0.2 and m.adv["estimator"] == "dr_grpo" and (m.lr, m.optimizer) == (0.5, "adam")
    assert m.name == "grpo_kl[kl_coef=0.2][estimator=dr_grpo][lr=0.5][optimizer=adam]"
    assert METHODS["grpo_kl"].loss["kl_coef"] != 0.2  # the registry entry is untouched
    assert get_method("apo", name="apo@b", apo_beta=0.1).name == "apo@b"


@pytest.mark.parametrize("kw,match", [({"bogus": 1}, "unknown setting 'bogus'"), ({"lr_scale": 0.0}, "lr_scale"),
                                      ({"optimizer": "rmsprop"}, "optimizer"), ({"kl_coef": -1.0}, "kl_coef")])
def test_bad_variants_name_the_setting(kw, match):
    with pytest.raises(ValueError, match=match):
        get_method("grpo_kl", **kw)


def test_unknown_method_names_it():
    with pytest.raises(ValueError, match="method: unknown 'nope'"):
        get_method("nope")


def test_positive_only_apo_is_labelled_so():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strong = get_method("apo", name="apo@beta=0.3", apo_beta=0.3)  # lambda - beta = 0.75 < 1 - eps_low
    assert report_label(strong) == "apo@beta=0.3 (positive-only, not APO)"
    assert report_label(get_method("apo", apo_beta=0.1)) == "apo[apo_beta=0.1]"
    assert report_label(METHODS["npg"]) == "npg"
