"""Named experiments and the runner that turns (suite, methods, settings) into a tidy table.

Seeds: seed i builds the suite with `SuiteSpec.seed = spec.seed + i` (a different random suite
per seed) and, in sampled mode, also seeds the rollout sampler with i. Exact runs are otherwise
deterministic, so their spread over seeds is the spread over suites.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .coupled import CoupledPolicy, CoupledSpec, CoupledSuite, TabularPolicy, build_coupled_suite
from .dynamics import exact_update, npg_update, sampled_update
from .measures import DEFAULT_BUDGET, measure
from .methods import OPTIMIZERS, Method, get_method, report_label
from .tree import Suite, SuiteSpec, build_suite

MODES = ("exact", "sampled")
SUMMARY_KEYS = ("pass@1", "pass@4", "pass@16", "pass@64", "pass@256", "pass@1024", "crossover_k",
                "frac_prompts_below_base", "coverage", "distinct@256", "rsc_lost", "entropy", "manifold_mass",
                "branch_dominant", "branch_secondary", "branch_rare_in", "branch_rare_out",
                "train/pass@1", "train/pass@256", "train/pass@1024", "train/coverage")


@dataclass
class RunConfig:
    """Training settings shared by all methods of a run (a method may override lr / optimizer)."""

    mode: str = field(default="exact", metadata={"help": "exact (expected update) | sampled (rollouts)"})
    steps: int = field(default=200, metadata={"help": "RL steps (one rollout batch each)"})
    lr: float = field(default=30.0, metadata={"help": "learning rate on the logits"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adam (torch.optim on the logits tensor)"})
    group_size: int = field(default=8, metadata={"help": "G responses per prompt"})
    epochs: int = field(default=1, metadata={"help": "PPO epochs per step (exact: full-batch steps on the expected surrogate)"})
    minibatches: int = field(default=1, metadata={"help": "minibatches per epoch (sampled mode)"})
    npg_lr: float = field(default=0.05, metadata={"help": "step size of the natural-PG yardstick"})
    budget: int = field(default=DEFAULT_BUDGET, metadata={"help": "coverage threshold tau = 1/budget"})
    eval_every: int = field(default=1, metadata={"help": "measure every n steps (and the last)"})
    init_steps: int = field(default=0, metadata={"help": "collapse phase: GRPO steps before the methods start (recovery)"})
    init_lr: float = field(default=0.0, metadata={"help": "lr of the collapse phase (0: the run's lr)"})

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"RunConfig.{name}={getattr(self, name)!r}: {why}")

        if self.mode not in MODES:
            bad("mode", f"choose from {MODES}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"choose from {OPTIMIZERS}")
        for name in ("steps", "group_size", "epochs", "minibatches", "budget", "eval_every", "init_steps"):
            v = getattr(self, name)
            lo = 0 if name in ("steps", "init_steps") else (2 if name == "group_size" else 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"must be an integer >= {lo}")
        if not self.lr > 0:
            bad("lr", "must be > 0")


class Table:
    """A pandas-free tidy table: a list of dict rows with a few helpers."""

    def __init__(self, rows: Iterable[dict]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"Table({len(self.rows)} rows, columns={self.columns()[:8]}...)"

    def columns(self) -> list[str]:
        cols: dict = {}
        for r in self.rows:
            cols.update(dict.fromkeys(r))
        return list(cols)

    def where(self, **eq) -> "Table":
        """Rows whose columns equal the given values."""
        return Table(r for r in self.rows if all(r.get(k) == v for k, v in eq.items()))

    def column(self, key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in self.rows], dtype=float)

    def unique(self, key: str) -> list:
        return list(dict.fromkeys(r[key] for r in self.rows if key in r))

    def final(self) -> "Table":
        """The last step of every (method, seed)."""
        last: dict = {}
        for r in self.rows:
            k = (r.get("method"), r.get("seed"))
            if k not in last or r["step"] >= last[k]["step"]:
                last[k] = r
        return Table(last.values())

    def summary(self, keys: Sequence[str] = SUMMARY_KEYS, by: str = "method") -> list[dict]:
        """Mean and std over seeds of the final values, one dict per `by` value (table order)."""
        fin = self.final()
        out = []
        for value in fin.unique(by):
            sub = fin.where(**{by: value})
            row = {by: value, "n_seeds": len(sub)}
            for k in keys:
                col = sub.column(k)
                if np.isfinite(col).any():
                    row[k] = float(np.nanmean(col))
                    row[k + "_std"] = float(np.nanstd(col))
            kstar = sub.column("crossover_k")  # NaN: no crossover up to k = 1024 on that seed
            row["crossover_k_median"] = float(np.nanmedian(kstar)) if np.isfinite(kstar).any() else None
            row["crossover_seeds"] = int(np.isfinite(kstar).sum())
            out.append(row)
        return out


def _optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.Adam(params, lr=lr)


AnySuite = Union[Suite, CoupledSuite]


def make_policy(suite: AnySuite, init_logits: Optional[torch.Tensor] = None) -> Union[TabularPolicy, CoupledPolicy]:
    """The trainable policy of a suite: tabular logits (from init_logits or the reference) or coupled theta = 0."""
    if isinstance(suite, CoupledSuite):
        if init_logits is not None:
            raise ValueError("init_logits: the coupled model starts at theta = 0 (init_steps / recovery are tabular only)")
        return CoupledPolicy(suite)
    return TabularPolicy(suite.ref_logits if init_logits is None else init_logits)


@torch.no_grad()
def measure_policy(suite: AnySuite, policy, budget: int = DEFAULT_BUDGET) -> dict:
    """Exact measures; on a coupled suite the plain keys are held-out prompts and `train/...` training prompts."""
    if not isinstance(suite, CoupledSuite):
        return measure(suite, policy.logits(), budget)
    out = measure(suite.heldout, policy.logits("heldout"), budget)
    out.update({f"train/{k}": v for k, v in measure(suite.train, policy.logits("train"), budget).items()})
    return out


def train_method(suite: AnySuite, method: Method, cfg: RunConfig, seed: int = 0,
                 init_logits: Optional[torch.Tensor] = None,
                 on_step: Optional[Callable[[dict], None]] = None,
                 measure_fn: Optional[Callable] = None) -> tuple[list[dict], Union[torch.Tensor, dict]]:
    """Train one method on one suite from init_logits (default: the reference). Rows per measured step.

    `measure_fn(policy) -> dict` replaces the default measures (`measure_policy`) of each measured
    step (the claims study measures its validation split only, apo_toy/claims.py).

    Returns the rows and the final logits: a [P, N, b] tensor (tabular) or {"train": ..., "heldout": ...}
    (coupled; only the training prompts are trained on).
    """
    cfg.validate()
    coupled = isinstance(suite, CoupledSuite)
    if method.yardstick and coupled:
        raise ValueError(f"method {method.name!r}: the natural-PG yardstick acts on tabular logits only "
                         "(use a tabular preset such as rsc_tabular)")
    policy = make_policy(suite, init_logits)
    train_suite = suite.train if coupled else suite
    lr = (method.lr if method.lr is not None else cfg.lr) * method.lr_scale
    opt = None if method.yardstick else _optimizer(method.optimizer or cfg.optimizer, policy.params, lr)
    loss_cfg = None if method.yardstick else method.loss_config()
    gen = torch.Generator().manual_seed(10_000 + seed)
    logits_fn = lambda: policy.logits("train")  # noqa: E731  the map theta -> edge logits of the trained prompts
    rows = []

    def record(step: int, train: dict) -> None:
        row = {"method": method.name, "seed": seed, "step": step, "mode": cfg.mode}
        row.update(measure_fn(policy) if measure_fn else measure_policy(suite, policy, cfg.budget))
        row.update({k: v for k, v in train.items()})
        rows.append(row)
        if on_step:
            on_step(row)

    record(0, {})
    for step in range(1, cfg.steps + 1):
        measured = step % cfg.eval_every == 0 or step == cfg.steps  # diagnostics only where they are logged
        if method.yardstick:
            train = npg_update(suite, policy.theta, method.lr if method.lr is not None else cfg.npg_lr)
        elif cfg.mode == "exact":
            train = exact_update(train_suite, loss_cfg, logits_fn, opt, cfg.group_size, method.adv, cfg.epochs,
                                 diagnostics=measured)
        else:
            train = sampled_update(train_suite, loss_cfg, logits_fn, opt, cfg.group_size, method.adv, gen,
                                   cfg.epochs, cfg.minibatches, diagnostics=measured)
        if measured:
            record(step, train)
    with torch.no_grad():
        final = {part: policy.logits(part).detach() for part in ("train", "heldout")} if coupled else policy.theta.detach()
    return rows, final


def collapse(suite: Suite, cfg: RunConfig, seed: int = 0) -> torch.Tensor:
    """Logits after `cfg.init_steps` GRPO steps from the reference (start of the recovery preset)."""
    c = dataclasses.replace(cfg, steps=cfg.init_steps, eval_every=max(cfg.init_steps, 1),
                            lr=cfg.init_lr or cfg.lr, init_steps=0)
    _, logits = train_method(suite, get_method("grpo"), c, seed)
    return logits


def run(spec: Union[SuiteSpec, Suite, CoupledSpec, CoupledSuite, None] = None, methods: Sequence[Union[str, Method]] = ("grpo", "apo"),
        cfg: Optional[RunConfig] = None, seeds: int = 1, preset: str = "custom", progress: bool = False,
        **cfg_overrides) -> Table:
    """Run methods x seeds; returns a Table with one row per measured step, method and seed.

    The base policy appears as method "base" at step 0 of every seed. A `Suite` / `CoupledSuite` is
    used as is for every seed (only the sampler changes); a `SuiteSpec` / `CoupledSpec` is re-seeded
    per seed.
    """
    cfg = dataclasses.replace(cfg or RunConfig(), **cfg_overrides)
    cfg.validate()
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: must be an integer >= 1, got {seeds!r}")
    meths = [get_method(m) for m in methods]
    if not meths:
        raise ValueError("methods: need at least one method")
    bar = None
    if progress and sys.stderr.isatty():  # a bar only on a terminal: redirected logs stay readable
        from tqdm.auto import tqdm

        bar = tqdm(total=seeds * len(meths) * cfg.steps, desc=f"apo_toy {preset}", unit="step")
    rows = []
    for seed in range(seeds):
        if isinstance(spec, (Suite, CoupledSuite)):
            suite = spec
        elif isinstance(spec, CoupledSpec):
            suite = build_coupled_suite(dataclasses.replace(spec, seed=spec.seed + seed))
        else:
            base_spec = spec or SuiteSpec()
            suite = build_suite(dataclasses.replace(base_spec, seed=base_spec.seed + seed))
        base = {"preset": preset, "method": "base", "seed": seed, "step": 0, "mode": cfg.mode}
        base.update(measure_policy(suite, make_policy(suite), cfg.budget))  # theta = 0 is the reference
        rows.append(base)
        init = collapse(suite, cfg, seed) if cfg.init_steps > 0 else None
        for m in meths:
            t0 = time.perf_counter()
            on_step = (lambda row: bar.update(cfg.eval_every if row["step"] % cfg.eval_every == 0 else
                                              cfg.steps % cfg.eval_every) if row["step"] else None) if bar else None
            r, _ = train_method(suite, m, cfg, seed, init, on_step)
            for row in r:
                row["preset"] = preset
            r[-1]["wall_s"] = time.perf_counter() - t0
            rows.extend(r)
    if bar:
        bar.close()
    return Table(rows)


@dataclass
class Preset:
    """A named experiment: suite, methods and run settings."""

    name: str
    description: str
    spec: Union[SuiteSpec, CoupledSpec]
    methods: tuple
    cfg: RunConfig
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
RSC_RUN = RunConfig(steps=150, optimizer="adam", lr=0.05)


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
               ("grpo", "w_reinforce", "apo", "npg"), RunConfig(steps=150)),
        Preset("rsc", "coupled model (shared parameters; 32 training, 64 held-out prompts; b=10, D=3, K=8; peaked "
               "reference): GRPO vs KL variants vs APO, measured on held-out prompts (the Pass@K crossover)",
               CoupledSpec(), rsc_methods(), RSC_RUN),
        Preset("rsc_tabular", "tabular model, 32 prompts (b=10, D=3, K=8): GRPO vs KL variants vs APO, "
               "recursive space contraction without shared parameters",
               SuiteSpec(), ("grpo", "dr_grpo", "grpo_kl", "grpo_kl_full", "kl_on_wrong", "entropy", "apo",
                             "apo_push_only", "npg"), RunConfig(steps=200)),
        Preset("tradeoff", "Pass@1 vs Pass@256 / coverage frontier: kl_coef sweep of k3 / full KL, beta sweep of APO (both clip placements)",
               SuiteSpec(), tradeoff_methods(), RunConfig(steps=200)),
        Preset("recovery", "start from a GRPO-collapsed policy (100 steps), then GRPO vs KL vs APO under each "
               "reading of r_anchor (ref / old_mass / old_token) vs Top-K KL on wrong",
               SuiteSpec(), recovery_methods(), RunConfig(steps=200, init_steps=100)),
        Preset("frontier", "coupled rsc suite (peaked reference), 5 seeds: each method's strength sweep, held-out "
               "pass@1 vs pass@256 / coverage against GRPO's own trajectory (iso-pass@1 gain; apo_toy/frontier.py)",
               CoupledSpec(), frontier_methods(), dataclasses.replace(RSC_RUN, eval_every=5), seeds=5,
               curve_arms=FRONTIER_CURVE_ARMS, frontier=True),
        Preset("ablation", "APO clip placement, exclusive vs inclusive anchoring, K; 4 PPO epochs per step",
               SuiteSpec(), (get_method("grpo"), get_method("apo"), get_method("apo_push_only"),
                             get_method("apo_inclusive"), get_method("apo", name="apo@K=2", apo_k=2),
                             get_method("apo", name="apo@K=4", apo_k=4)),
               RunConfig(steps=200, epochs=4)),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def run_preset(name: str, mode: Optional[str] = None, methods: Optional[Sequence[str]] = None,
               seeds: Optional[int] = None, steps: Optional[int] = None, progress: bool = False,
               spec_overrides: Optional[dict] = None, **cfg_overrides) -> Table:
    """Run a named preset with optional overrides (what the CLI calls).

    `spec_overrides`: fields of the preset's SuiteSpec / CoupledSpec; `cfg_overrides`: RunConfig fields.
    """
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
    meths = p.methods if not methods else [_lookup(p, m) for m in methods]
    return run(spec, meths, cfg, seeds=seeds or p.seeds, preset=name, progress=progress)


def _lookup(p: Preset, name: str) -> Method:
    for m in p.methods:
        if (m.name if isinstance(m, Method) else m) == name:
            return get_method(m)
    return get_method(name)
