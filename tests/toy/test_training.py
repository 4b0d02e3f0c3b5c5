"""apo_toy/training.py: the loop, the one-step update, SimConfig and the runner over methods x seeds."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import apo_toy.training as training
from apo_toy import SimConfig, SuiteSpec, build_suite, get_method
from apo_toy.training import make_policy, run_methods, train_method, update

TINY = SuiteSpec(n_prompts=3, branching=3, depth=2, top_k=2, seed=4)


@pytest.mark.parametrize("mode,epochs,minibatches", [("exact", 2, 1), ("sampled", 2, 2)])
def test_the_loop_is_the_one_step_update_repeated(mode, epochs, minibatches):
    """train_method's inline loop and `update` (what tests, lessons and benchmarks call) take the
    same steps: same generator seed, same optimizer, same final logits to the last bit."""
    suite = build_suite(TINY)
    m = get_method("apo", apo_k=2)
    cfg = SimConfig(mode=mode, steps=3, lr=2.0, epochs=epochs, minibatches=minibatches, eval_every=3)
    _, final = train_method(suite, m, cfg, seed=7)
    policy = make_policy(suite)
    opt = torch.optim.SGD(policy.params, lr=2.0)
    gen = torch.Generator().manual_seed(10_000 + 7)  # train_method's sampler seed
    for _ in range(3):
        update(suite, m.loss_config(), policy.logits, opt, mode, cfg.group_size, m.adv, gen, epochs, minibatches)
    assert torch.equal(final, policy.theta.detach())
    assert not torch.equal(final, suite.ref_logits)  # it trained


def test_the_loop_calls_policy_loss_itself_once_per_pass(monkeypatch):
    """The 4-call path: train_method -> policy_loss, epochs x minibatches calls per RL step."""
    calls = []
    real = training.policy_loss

    def spy(cfg, **kw):
        calls.append(cfg.name)
        return real(cfg, **kw)

    monkeypatch.setattr(training, "policy_loss", spy)
    cfg = SimConfig(mode="sampled", steps=2, epochs=3, minibatches=2, lr=1.0)
    train_method(build_suite(TINY), get_method("grpo_kl"), cfg)
    assert calls == ["grpo_kl"] * (2 * 3 * 2)


def test_sampled_step_metrics_are_the_rollouts_reward_and_zero_variance_share():
    suite = build_suite(TINY)
    rows, _ = train_method(suite, get_method("grpo"), SimConfig(mode="sampled", steps=1, lr=1.0))
    r = rows[-1]
    assert 0.0 <= r["reward"] <= 1.0 and 0.0 <= r["zero_var_frac"] <= 1.0
    assert r["reward"] * TINY.n_prompts * 8 == pytest.approx(round(r["reward"] * TINY.n_prompts * 8))  # k of P*G


@pytest.mark.parametrize("field,value", [("steps", -1), ("group_size", 1), ("mode", "expected"), ("lr", 0.0),
                                         ("optimizer", "rmsprop"), ("epochs", True)])
def test_simconfig_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"SimConfig\.{field}="):
        SimConfig(**{field: value}).validate()


def test_run_methods_reseeds_a_spec_but_reuses_a_suite():
    cfg = SimConfig(steps=1)
    by_spec = run_methods(TINY, ["grpo"], cfg, seeds=2).where(method="base")
    assert by_spec.rows[0]["pass@1"] != by_spec.rows[1]["pass@1"]  # two different suites
    suite = build_suite(TINY)
    by_suite = run_methods(suite, ["grpo"], cfg, seeds=2).where(method="base")
    assert by_suite.rows[0]["pass@1"] == by_suite.rows[1]["pass@1"]
    with pytest.raises(ValueError, match="seeds"):
        run_methods(TINY, ["grpo"], cfg, seeds=0)
    with pytest.raises(ValueError, match="methods"):
        run_methods(TINY, [], cfg)


def test_run_methods_is_not_shadowed_by_the_cli_module():
    """`from apo_toy import run_methods` is the function even after `python -m apo_toy.run`'s module loads."""
    code = "import apo_toy.run; from apo_toy import run_methods; print(callable(run_methods), type(run_methods).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "function"]


def _calls_in(path, func: str) -> set:
    """Names called (f(...) or mod.f(...)) in the body of top-level function `func` of `path`."""
    import ast

    fn = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == func)
    return {(c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", ""))
            for c in ast.walk(fn) if isinstance(c, ast.Call)}


def test_the_cli_reaches_the_loss_in_four_calls():
    """main -> run_methods -> train_method -> policy_loss (-> the registered term), the preset resolved before."""
    from pathlib import Path

    pkg = Path(training.__file__).parent
    main_calls = _calls_in(pkg / "run.py", "main")
    assert {"_resolve", "run_methods"} <= main_calls
    assert "train_method" in _calls_in(pkg / "training.py", "run_methods")
    assert "policy_loss" in _calls_in(pkg / "training.py", "train_method")
