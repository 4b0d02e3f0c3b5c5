"""apo_toy: a reasoning-tree bandit simulator that reproduces Recursive Space Contraction exactly.

A prompt is a complete b-ary tree of depth D (nodes = token positions, children = tokens, leaves =
responses with a 0/1 reward); a reference policy per node plays the base model. Two policy
models: tabular (a logits tensor initialised at the reference, prompts share nothing) and coupled
(apo_toy/coupled.py: edge logits are one map of shared parameters, with held-out prompts that are
never trained on; see docs/simulator.md). Every method is trained through the project's
one loss, `apo_llm.objectives.policy_loss`, in two modes: `sampled` (rollouts, group advantages,
PPO epochs/minibatches) and `exact` (the expected surrogate, no sampling noise; see
apo_toy/dynamics.py for what exact means).

Python API (what the notebooks use)::

    from apo_toy import build_suite, SuiteSpec, run_methods, SimConfig, METHODS, PRESETS, base_measures, measure

    suite = build_suite(SuiteSpec(n_prompts=32, branching=10, depth=3, top_k=8, seed=0))
    base_measures(suite)                      # dict: pass@1..pass@256, coverage, distinct@256, ...
    table = run_methods(SuiteSpec(), ["grpo", "grpo_kl", "apo"], SimConfig(mode="exact", steps=200), seeds=5)
    table.rows                                # list of dicts, one per (method, seed, step); "base" rows too
    table.where(method="apo").column("pass@1")
    table.summary()                           # final mean / std over seeds per method
    run_preset("rsc", seeds=5)                # a named experiment (PRESETS: squeeze, rsc (coupled),
                                              # rsc_tabular, tradeoff, recovery, ablation, frontier (coupled))
    run_methods(CoupledSpec(), ["grpo", "apo"], SimConfig(optimizer="adam", lr=0.05))   # held-out keys + train/...
    get_method("apo", apo_beta=0.3)           # a variant of a named method (METHODS)

Modules: apo_toy/training.py (`SimConfig`, the loop `train_method(suite, method, cfg)`: one arm,
rows and final logits; `run_methods`; the one-step `update` / `exact_update` / `sampled_update`),
apo_toy/table.py (`Table`, the markdown writer), apo_toy/presets.py (`PRESETS`, `resolve_preset`),
apo_toy/methods.py (`METHODS`), apo_toy/dynamics.py (`exact_loss` / `sampled_loss` and the loss
inputs they build; `npg_update`, the natural-PG yardstick, not a loss). CLI: `python -m apo_toy.run --preset rsc --out runs/rsc`.
The frontier study (iso-pass@1 gain over GRPO's own trajectory): apo_toy/frontier.py, figures:
apo_toy/plots.py. The claims study (validation-selected arms, verdicts per setting):
apo_toy/claims.py, `python -m apo_toy.run --preset claims --out DIR`.

Importing apo_toy never imports transformers, peft or datasets.
"""

from .coupled import CoupledPolicy, CoupledSpec, CoupledSuite, TabularPolicy, build_coupled_suite
from .dynamics import exact_batch, exact_loss, npg_update, sample_rollouts, sampled_loss
from .measures import PASS_KS, base_measures, measure, per_prompt_success
from .methods import METHODS, Method, get_method
from .presets import PRESETS, Preset, get_preset, resolve_preset, run_preset
from .table import Table
from .training import (SimConfig, collapse, exact_update, make_policy, measure_policy, run_methods, sampled_update,
                       train_method, update)
from .tree import BRANCH_NAMES, Suite, SuiteSpec, build_suite

# No function is named `run`: `from apo_toy import run` is the command-line module apo_toy.run.
__all__ = [
    "BRANCH_NAMES", "CoupledPolicy", "CoupledSpec", "CoupledSuite", "METHODS", "PASS_KS", "PRESETS", "Method", "Preset",
    "SimConfig", "Suite", "SuiteSpec", "Table", "base_measures", "build_suite", "collapse", "exact_batch",
    "exact_loss", "exact_update", "get_method", "get_preset", "measure", "npg_update", "per_prompt_success",
    "resolve_preset", "run_methods", "run_preset", "sample_rollouts", "sampled_loss", "sampled_update",
    "TabularPolicy", "train_method", "update",
]
