"""Named experiments: a suite, the methods (arms) and the run settings of each, and their resolution.

`resolve_preset` turns a preset name and command-line overrides into what the runner takes (suite
spec, `Method` objects looked up here, a `SimConfig`, seeds): `python -m apo_toy.run` calls it
before `apo_toy.training.run_methods`, so no registry lookup sits on the path to the loss.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .coupled import CoupledSpec
from .methods import Method, get_method, report_label
from .table import Table
from .training import SimConfig, run_methods
from .tree import SuiteSpec


@dataclass
class Preset:
    """A named experiment: suite, methods and run settings."""

    name: str
    description: str
    spec: Union[SuiteSpec, CoupledSpec]
    methods: tuple
    cfg: SimConfig
    seeds: int = 1
    curve_arms: tuple = ()  # the arms curves.png / pass_at_k.png draw (empty: every arm)
    frontier: bool = False  # also measure iso-pass@1 gains against GRPO's trajectory (frontier.md/.png)


def tradeoff_methods() -> tuple:
    """The `tradeoff` sweep: grpo, k3 and full-KL coefficients, APO beta (both clip placements)."""
    ms = [get_method("grpo")]
    for c in (0.01, 0.05, 0.2, 0.5):
        ms.append(get_method("grpo_kl", name=f"grpo_kl@{c}", kl_coef=c))
        ms.append(get_method("grpo_kl_full", name=f"grpo_kl_full@{c}", kl_coef=c))
    for beta in (0.05, 0.1, 0.3, 1.0):
        with warnings.catch_warnings():  # beta > 0.25 is positive-only learning: said in the arm's name instead
            warnings.simplefilter("ignore")
            m = get_method("apo", name=f"apo@beta={beta}", apo_beta=beta)
            ms.append(m.variant(name=report_label(m)))
    for beta in (0.1, 0.3, 1.0):  # the pull without the rectified clip (docs/method.md section 3, clip placement)
        ms.append(get_method("apo_push_only", name=f"apo_push_only@beta={beta}", apo_beta=beta))
    return tuple(ms)


KL_COEF_LLM = 0.001  # a KL coefficient in the range LLM RLVR runs use (verl's default kl_loss_coef)
# The coupled model's parameters are shared by thousands of edges with very different gradient
# scales (alpha multiplies z_ref, u sums over every edge of a token), so it is trained with Adam.
RSC_RUN = SimConfig(steps=150, optimizer="adam", lr=0.05)


APO_READINGS = ("apo", "apo_old_mass", "apo_old_token")  # r_anchor by Z_ref (A) / M_S(theta_old) (C) / per token (H)


def rsc_methods() -> tuple:
    """The coupled `rsc` preset's arms: GRPO, k3 KL at two strengths, exact reverse KL, KL-on-wrong, and APO
    under each reading of r_anchor (docs/method.md section 3)."""
    return ("grpo", "grpo_kl", get_method("grpo_kl", name=f"grpo_kl@{KL_COEF_LLM}", kl_coef=KL_COEF_LLM),
            "grpo_kl_full", "kl_on_wrong") + APO_READINGS


def frontier_methods() -> tuple:
    """The `frontier` sweep: each method at a few strengths; GRPO (the null trajectory) first.

    Rectified APO betas stay below lambda - (1 - eps_low) = 0.25: beyond it the arm is
    positive-only learning (LossConfig.is_positive_only), not APO.
    """
    ms = [get_method("grpo")]
    ms += [get_method("grpo_low_lr", name=f"grpo@lr_x{s}", lr_scale=s) for s in (0.5, 0.25)]
    ms += [get_method("grpo_kl", name=f"grpo_kl@{c}", kl_coef=c) for c in (0.01, 0.05, 0.2)]
    ms += [get_method("topk_kl_on_wrong", name=f"topk_kl_on_wrong@{c}", topk_kl_coef=c) for c in (0.02, 0.1, 0.5)]
    ms += [get_method("entropy", name=f"entropy@{c}", ent_coef=c) for c in (0.003, 0.01, 0.03)]
    for reading in APO_READINGS:
        ms += [get_method(reading, name=f"{reading}@beta={b}", apo_beta=b) for b in (0.05, 0.1, 0.2)]
    ms += [get_method("apo_push_only", name=f"apo_push_only@beta={b}", apo_beta=b) for b in (0.1, 0.3)]
    ms += [get_method(m) for m in ("psr", "nsr", "w_reinforce", "passk")]
    return tuple(ms)


# the frontier's curves show GRPO and each family's middle strength (27 arms would be unreadable)
FRONTIER_CURVE_ARMS = ("grpo", "grpo@lr_x0.5", "grpo_kl@0.05", "topk_kl_on_wrong@0.1", "entropy@0.01",
                       "apo@beta=0.1", "apo_old_mass@beta=0.1", "apo_old_token@beta=0.1", "apo_push_only@beta=0.1",
                       "psr", "nsr", "w_reinforce", "passk")


def recovery_methods() -> tuple:
    """The `recovery` arms: GRPO, KL, and APO under each reading of r_anchor (and push_only)."""
    return ("grpo", "grpo_kl", "grpo_kl_full", *APO_READINGS, "apo_push_only", "topk_kl_on_wrong", "npg")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("squeeze", "one decision node, b=16: negative squeezing / positive sharpening (docs/theory.md sections 2-3)",
               SuiteSpec(n_prompts=16, branching=16, depth=1, n_extra_correct=0),
               ("grpo", "w_reinforce", "apo", "npg"), SimConfig(steps=150)),
        Preset("rsc", "coupled model (shared parameters; 32 training, 64 held-out prompts; b=10, D=3, K=8; peaked "
               "reference): GRPO vs KL variants vs APO, measured on held-out prompts (the Pass@K crossover)",
               CoupledSpec(), rsc_methods(), RSC_RUN),
        Preset("rsc_tabular", "tabular model, 32 prompts (b=10, D=3, K=8): GRPO vs KL variants vs APO, "
               "recursive space contraction without shared parameters",
               SuiteSpec(), ("grpo", "dr_grpo", "grpo_kl", "grpo_kl_full", "kl_on_wrong", "entropy", "apo",
                             "apo_push_only", "npg"), SimConfig(steps=200)),
        Preset("tradeoff", "Pass@1 vs Pass@256 / coverage frontier: kl_coef sweep of k3 / full KL, beta sweep of APO (both clip placements)",
               SuiteSpec(), tradeoff_methods(), SimConfig(steps=200)),
        Preset("recovery", "start from a GRPO-collapsed policy (100 steps), then GRPO vs KL vs APO under each "
               "reading of r_anchor (ref / old_mass / old_token) vs Top-K KL on wrong",
               SuiteSpec(), recovery_methods(), SimConfig(steps=200, init_steps=100)),
        Preset("frontier", "coupled rsc suite (peaked reference), 5 seeds: each method's strength sweep, held-out "
               "pass@1 vs pass@256 / coverage against GRPO's own trajectory (iso-pass@1 gain; apo_toy/frontier.py)",
               CoupledSpec(), frontier_methods(), dataclasses.replace(RSC_RUN, eval_every=5), seeds=5,
               curve_arms=FRONTIER_CURVE_ARMS, frontier=True),
        Preset("ablation", "APO clip placement, exclusive vs inclusive anchoring, K; 4 PPO epochs per step",
               SuiteSpec(), (get_method("grpo"), get_method("apo"), get_method("apo_push_only"),
                             get_method("apo_inclusive"), get_method("apo", name="apo@K=2", apo_k=2),
                             get_method("apo", name="apo@K=4", apo_k=4)),
               SimConfig(steps=200, epochs=4)),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass
class Resolved:
    """A preset with its overrides applied: what `run_methods` takes."""

    name: str
    spec: Union[SuiteSpec, CoupledSpec]
    methods: list  # Method objects
    cfg: SimConfig
    seeds: int


def resolve_preset(name: str, mode: Optional[str] = None, methods: Optional[Sequence[str]] = None,
                   seeds: Optional[int] = None, steps: Optional[int] = None,
                   spec_overrides: Optional[dict] = None, **cfg_overrides) -> Resolved:
    """A named preset with optional overrides: `spec_overrides` are fields of its SuiteSpec /
    CoupledSpec, `cfg_overrides` SimConfig fields (None: the preset's). A method name is the
    preset's own arm of that name if it has one, else a method of `METHODS`."""
    p = get_preset(name)
    spec = p.spec
    if spec_overrides:
        known = {f.name for f in dataclasses.fields(spec)}
        bad = sorted(set(spec_overrides) - known)
        if bad:
            raise ValueError(f"spec: unknown field(s) {bad} of {type(spec).__name__}; choose from {sorted(known)}")
        spec = dataclasses.replace(spec, **spec_overrides)
        spec.validate()
    over = {k: v for k, v in (("mode", mode), ("steps", steps)) if v is not None}
    cfg = dataclasses.replace(p.cfg, **over, **{k: v for k, v in cfg_overrides.items() if v is not None})
    own = {(m.name if isinstance(m, Method) else m): m for m in p.methods}
    meths = [get_method(m) for m in (p.methods if not methods else [own.get(n, n) for n in methods])]
    return Resolved(name, spec, meths, cfg, seeds or p.seeds)


def run_preset(name: str, progress: bool = False, **overrides) -> Table:
    """Run a named preset (`resolve_preset`'s overrides) with `run_methods`."""
    r = resolve_preset(name, **overrides)
    return run_methods(r.spec, r.methods, r.cfg, seeds=r.seeds, preset=name, progress=progress)
