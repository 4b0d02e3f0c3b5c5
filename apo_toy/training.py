"""The simulator's training loop: one method trained on one suite (`train_method`), and the runner
over methods x seeds (`run_methods`) that turns them into a tidy `Table`.

The path from the command line to the loss formula, four calls a reader follows without a registry
lookup in between (the presets and methods are resolved before, in apo_toy/run.py's `main`):

    apo_toy.run.main -> run_methods -> train_method -> apo_llm.objectives.policy_loss -> the loss's term

`train_method`'s loop is the algorithm: fix theta_old (`step_batch`: the expected surrogate's
weights in exact mode, rollouts and group advantages in sampled mode), then for each optimizer pass
(`passes`) build the loss inputs (apo_toy/dynamics.py) and call `policy_loss`, backward, step.

Seeds: seed i builds the suite with `SuiteSpec.seed = spec.seed + i` (a different random suite
per seed) and, in sampled mode, also seeds the rollout sampler with i. Exact runs are otherwise
deterministic, so their spread over seeds is the spread over suites.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from apo_llm.objectives import LossConfig, group_advantages, policy_loss

from .coupled import CoupledPolicy, CoupledSpec, CoupledSuite, TabularPolicy, build_coupled_suite
from .dynamics import as_logits_fn, exact_batch, exact_inputs, npg_update, sample_rollouts, sampled_inputs
from .measures import DEFAULT_BUDGET, measure
from .methods import OPTIMIZERS, Method, get_method
from .table import Table
from .tree import Suite, SuiteSpec, build_suite

MODES = ("exact", "sampled")


@dataclass
class SimConfig:
    """Training settings of a simulator run, shared by all its methods (a method may override lr / optimizer).

    Distinct from apo_llm.config.RunConfig (the LLM trainer's settings)."""

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
            raise ValueError(f"SimConfig.{name}={getattr(self, name)!r}: {why}")

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


# --------------------------------------------------------------------------------------------
# One RL step, in pieces: what theta_old fixes, the optimizer passes, the loss inputs, the metrics.
# train_method's loop calls policy_loss itself on these; `update` is the same step as one call.
# --------------------------------------------------------------------------------------------



def step_batch(suite: Suite, cfg: LossConfig, z_old: Tensor, mode: str, group_size: int, adv_kwargs: dict,
               generator: Optional[torch.Generator] = None) -> dict:
    """Everything of one RL step that theta_old fixes: the expected surrogate's weights (`exact_batch`)
    or G rollouts per prompt with their advantages and old log-probs (`sample_rollouts`)."""
    if mode == "exact":
        batch = exact_batch(suite, cfg, z_old, group_size, adv_kwargs)
        batch["mode"] = "exact"
        return batch
    roll = sample_rollouts(suite, z_old, group_size, generator)
    adv = group_advantages(roll["reward"], group_size, **adv_kwargs)  # [B]
    P, N, b = z_old.shape
    with torch.no_grad():
        old = torch.log_softmax(z_old, -1).reshape(P * N, b)
        old_logp = old[roll["prompt"][:, None] * N + roll["nodes"], roll["actions"]]  # [B, D]
    return {"mode": "sampled", "roll": roll, "adv": adv, "old_logp": old_logp, "old_logpi": old,
            "group_size": group_size}


def passes(batch: dict, epochs: int, minibatches: int, generator: Optional[torch.Generator] = None):
    """The optimizer steps of one RL step: exact, `epochs` full-batch passes (None: every row);
    sampled, `epochs` shuffles of the rollouts cut into `minibatches` index sets (as PPO does)."""
    for _ in range(epochs):
        if batch["mode"] == "exact":
            yield None
            continue
        perm = torch.randperm(batch["adv"].numel(), generator=generator)
        yield from perm.chunk(minibatches)


def loss_inputs(suite: Suite, cfg: LossConfig, logits: Tensor, batch: dict, idx: Optional[Tensor],
                generator: Optional[torch.Generator] = None) -> dict:
    """policy_loss's keyword arguments at `logits` for one optimizer pass (`passes`) of `batch`."""
    if batch["mode"] == "exact":
        return exact_inputs(suite, cfg, logits, batch)
    return sampled_inputs(suite, cfg, logits, batch["roll"], batch["old_logp"], batch["adv"], idx,
                          old_logpi=batch["old_logpi"], generator=generator)


def step_metrics(batch: dict, metrics: list[dict]) -> dict:
    """The logged metrics of one RL step: exact, the last pass's diagnostics; sampled, the mean over
    passes plus the batch's reward and share of zero-variance groups."""
    if batch["mode"] == "exact":
        return metrics[-1] if metrics else {}
    keys = dict.fromkeys(k for m in metrics for k in m)
    out = {k: sum(m.get(k, 0.0) for m in metrics) / len(metrics) for k in keys}
    r = batch["roll"]["reward"].view(-1, batch["group_size"])  # [P, G]
    out["zero_var_frac"] = float((r.std(-1) == 0).double().mean())
    out["reward"] = float(r.mean())
    return out


def update(suite: Suite, cfg: LossConfig, logits: Union[Tensor, Callable[[], Tensor]], opt: torch.optim.Optimizer,
           mode: str, group_size: int, adv_kwargs: dict, generator: Optional[torch.Generator] = None,
           epochs: int = 1, minibatches: int = 1, diagnostics: bool = True) -> dict:
    """One RL step as one call (the step of `train_method`'s loop, for tests, lessons and benchmarks).

    `logits`: the [P, N, b] tensor the optimizer updates, or a callable returning the edge logits
    from the optimizer's parameters (`as_logits_fn`). `diagnostics=False`: same update, no diagnostics.
    """
    fn = as_logits_fn(logits)
    with torch.no_grad():
        batch = step_batch(suite, cfg, fn().detach(), mode, group_size, adv_kwargs, generator)
    metrics = []
    for idx in passes(batch, epochs, minibatches, generator):
        opt.zero_grad(set_to_none=True)
        loss, m = policy_loss(cfg, **loss_inputs(suite, cfg, fn(), batch, idx, generator), diagnostics=diagnostics)
        loss.backward()
        opt.step()
        metrics.append(m)
    return step_metrics(batch, metrics)


def exact_update(suite: Suite, cfg: LossConfig, logits, opt: torch.optim.Optimizer, group_size: int,
                 adv_kwargs: dict, epochs: int = 1, diagnostics: bool = True) -> dict:
    """One RL step in exact mode: `epochs` full-batch steps on the expected surrogate (`update`)."""
    return update(suite, cfg, logits, opt, "exact", group_size, adv_kwargs, None, epochs, 1, diagnostics)


def sampled_update(suite: Suite, cfg: LossConfig, logits, opt: torch.optim.Optimizer, group_size: int,
                   adv_kwargs: dict, generator: torch.Generator, epochs: int = 1, minibatches: int = 1,
                   diagnostics: bool = True) -> dict:
    """One RL step in sampled mode: rollouts, advantages, then PPO epochs x minibatches (`update`)."""
    return update(suite, cfg, logits, opt, "sampled", group_size, adv_kwargs, generator, epochs, minibatches,
                  diagnostics)


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


def train_method(suite: AnySuite, method: Method, cfg: SimConfig, seed: int = 0,
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
        else:
            with torch.no_grad():  # theta_old: the expected surrogate's weights, or rollouts and advantages
                batch = step_batch(train_suite, loss_cfg, logits_fn().detach(), cfg.mode, cfg.group_size,
                                   method.adv, gen)
            metrics = []
            for idx in passes(batch, cfg.epochs, cfg.minibatches, gen):  # PPO epochs x minibatches
                opt.zero_grad(set_to_none=True)
                inputs = loss_inputs(train_suite, loss_cfg, logits_fn(), batch, idx, gen)
                loss, m = policy_loss(loss_cfg, **inputs, diagnostics=measured)
                loss.backward()
                opt.step()
                metrics.append(m)
            train = step_metrics(batch, metrics)
        if measured:
            record(step, train)
    with torch.no_grad():
        final = {part: policy.logits(part).detach() for part in ("train", "heldout")} if coupled else policy.theta.detach()
    return rows, final


def collapse(suite: Suite, cfg: SimConfig, seed: int = 0) -> torch.Tensor:
    """Logits after `cfg.init_steps` GRPO steps from the reference (start of the recovery preset)."""
    c = dataclasses.replace(cfg, steps=cfg.init_steps, eval_every=max(cfg.init_steps, 1),
                            lr=cfg.init_lr or cfg.lr, init_steps=0)
    _, logits = train_method(suite, get_method("grpo"), c, seed)
    return logits


def run_methods(spec: Union[SuiteSpec, Suite, CoupledSpec, CoupledSuite, None] = None,
                methods: Sequence[Union[str, Method]] = ("grpo", "apo"), cfg: Optional[SimConfig] = None,
                seeds: int = 1, preset: str = "custom", progress: bool = False, **cfg_overrides) -> Table:
    """Run methods x seeds; returns a Table with one row per measured step, method and seed.

    The base policy appears as method "base" at step 0 of every seed. A `Suite` / `CoupledSuite` is
    used as is for every seed (only the sampler changes); a `SuiteSpec` / `CoupledSpec` is re-seeded
    per seed. Method names are looked up here (`get_method`), before any training.
    """
    cfg = dataclasses.replace(cfg or SimConfig(), **cfg_overrides)
    cfg.validate()
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: must be an integer >= 1, got {seeds!r}")
    meths = [get_method(m) for m in methods]
    if not meths:
        raise ValueError("methods: need at least one method")
    bar = _progress_bar(seeds * len(meths) * cfg.steps, preset) if progress else None
    rows = []
    for seed in range(seeds):
        suite = _seed_suite(spec, seed)
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


def _seed_suite(spec, seed: int) -> AnySuite:
    """The suite of one seed: a given suite as is, a spec re-seeded (spec.seed + seed)."""
    if isinstance(spec, (Suite, CoupledSuite)):
        return spec
    if isinstance(spec, CoupledSpec):
        return build_coupled_suite(dataclasses.replace(spec, seed=spec.seed + seed))
    base_spec = spec or SuiteSpec()
    return build_suite(dataclasses.replace(base_spec, seed=base_spec.seed + seed))


def _progress_bar(total: int, preset: str):
    if not sys.stderr.isatty():  # a bar only on a terminal: redirected logs stay readable
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"apo_toy {preset}", unit="step")
