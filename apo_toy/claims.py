"""The claims study: the paper's claims 1-3 judged per reading of r_anchor and per simulator setting.

    python -m apo_toy.run --preset claims --out DIR [--quick] [--workers 2]

Protocol (docs/simulator.md, "The claims study"; docs/method.md section 4):

- Splits. Every coupled suite has training prompts (the only ones the loss sees) and held-out
  prompts split into disjoint validation and test sets (`CoupledSpec.n_val`).
- Selection reads validation only, structurally: training records validation measures and a
  snapshot of theta at each measured step; `select` gets a table of validation rows (`ValRows`,
  which refuses any other key) and returns the hyper-parameters and, per seed, the step. Test
  measures are computed afterwards, from the snapshots of the selected steps only.
- One rule for every arm, GRPO (the null) included: hyper-parameters maximise the seed-mean of
  validation pass@1 at each run's best-validation step; each arm is then reported at (a) its final
  step and (b) its best-validation-pass@1 step.
- Equal budget: each arm gets the same declared grid (learning rate x optimizer x its own strength,
  `ClaimsPlan.arms`, `ClaimsPlan.lrs`), tuned on the tuning setting with `tune_seeds` suites that
  are never reported; every setting of the grid then runs the tuned values on `seeds` other suites.
- Verdicts (`verdicts`, apo_toy/claims_verdicts.py with the selection rule and claims.md): one-sided paired t-tests over seeds, Holm-corrected over the arms a claim
  compares; holds / fails / inconclusive as defined in docs/simulator.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .coupled import CoupledPolicy, CoupledSpec, build_coupled_suite
from .measures import measure
from .methods import get_method, report_label
from .claims_verdicts import RULES, ValRows, claims_markdown, select, summarise, verdicts
from .training import SimConfig, train_method

VAL_KEYS = ("pass@1", "pass@256", "coverage")  # what selection may read, prefixed "val/"
TEST_KEYS = ("pass@1", "pass@256", "coverage", "manifold_mass", "entropy")
DIAG_KEYS = ("apo/neg_clipped_frac", "apo/neg_clipped_grad_frac", "clip_frac/neg")


@dataclass(frozen=True)
class Arm:
    """One arm: a method, the field its strength sets, the strength grid and its role in the claims."""

    name: str
    method: str
    strength: Optional[str] = None  # None: no strength (GRPO); "a+b": one grid value is a tuple (a, b)
    grid: tuple = ()
    role: str = "other"  # null | kl | apo | control | other


@dataclass(frozen=True)
class Setting:
    """One simulator setting of the grid."""

    branching: int
    depth: int
    epochs: int
    peaked_frac: float
    optimizer: str

    @property
    def name(self) -> str:
        return f"b{self.branching}D{self.depth}·ep{self.epochs}·pk{self.peaked_frac:g}·{self.optimizer}"


BETAS = (0.01, 0.03, 0.1, 0.3)
COEFS = (1e-3, 1e-2, 0.1, 0.5)
# the peers' own strengths, each a log grid (factor 2 or ~3) around its published default
CISPO_EPS_MAX = (1.25, 2.5, 5.0, 10.0)  # cap of the detached weight; default 5
GSPO_CLIPS = ((1.5e-4, 2e-4), (3e-4, 4e-4), (6e-4, 8e-4), (1.2e-3, 1.6e-3))  # (eps_low, eps_high); paper 3e-4/4e-4
SIMKO_ALPHAS = (0.003, 0.01, 0.03, 0.1)  # share of the correct-token gradient spread on the Top-K; default 0.01


def default_arms() -> tuple:
    """The arms, data-driven: add an Arm to compare another method (same grid size, same rule)."""
    return (
        Arm("grpo", "grpo", role="null"),
        Arm("grpo_kl", "grpo_kl", "kl_coef", COEFS, role="kl"),
        Arm("topk_kl_on_wrong", "topk_kl_on_wrong", "topk_kl_coef", COEFS),
        Arm("entropy", "entropy", "ent_coef", (1e-3, 3e-3, 1e-2, 3e-2)),
        Arm("apo (A, ref)", "apo", "apo_beta", BETAS, role="apo"),
        Arm("apo (C, old_mass)", "apo_old_mass", "apo_beta", BETAS, role="apo"),
        Arm("apo (H, old_token)", "apo_old_token", "apo_beta", BETAS, role="apo"),
        Arm("silence only (A)", "apo_silence", "apo_beta", BETAS, role="control"),
        Arm("anti-sharpening", "apo_antisharp", "apo_beta", BETAS, role="control"),
        Arm("cispo", "cispo", "cispo_eps_max", CISPO_EPS_MAX),
        Arm("gspo", "gspo", "eps_low+eps_high", GSPO_CLIPS),
        Arm("simko", "simko", "simko_alpha", SIMKO_ALPHAS),
    )


@dataclass
class ClaimsPlan:
    """The whole study: arms and grid, settings, seeds, suite and run settings."""

    arms: tuple = field(default_factory=default_arms)
    lrs: dict = field(default_factory=lambda: {"adam": (0.02, 0.05, 0.1), "sgd": (3.0, 10.0, 30.0)})
    settings: tuple = ()
    tune: dict = field(default_factory=dict)  # optimizer -> the Setting hyper-parameters are tuned on
    tune_seeds: int = 2
    seeds: int = 5
    spec: CoupledSpec = field(default_factory=lambda: CoupledSpec(n_train=8, n_heldout=144, n_val=48))
    run: SimConfig = field(default_factory=lambda: SimConfig(steps=60, eval_every=4, optimizer="adam", lr=0.05))
    n_correct_per_leaves: float = 0.05  # m = this share of b^D leaves (50 of 1000 at b=10, D=3)
    tol: float = 0.01  # non-inferiority margin of claim 3
    alpha: float = 0.05

    def grid(self, arm: Arm, optimizer: str) -> list[dict]:
        if arm.strength is None:
            strengths = [{}]
        elif "+" in arm.strength:  # several fields set together, one tuple per grid value
            strengths = [dict(zip(arm.strength.split("+"), s)) for s in arm.grid]
        else:
            strengths = [{arm.strength: s} for s in arm.grid]
        return [{"lr": lr, **s} for lr in self.lrs[optimizer] for s in strengths]

    def suite_spec(self, s: Setting, seed: int) -> CoupledSpec:
        m = max(1, round(self.n_correct_per_leaves * s.branching ** s.depth))
        return dataclasses.replace(self.spec, branching=s.branching, depth=s.depth, peaked_frac=s.peaked_frac,
                                   n_correct=m, seed=self.spec.seed + seed)


def half_fraction(levels: dict) -> tuple:
    """The 2^(4-1) fractional factorial of four two-level factors: the 8 of 16 combinations with an
    even number of factors at their second level (defining relation I = ABCD). Every level of every
    factor appears in 4 settings and every pair of levels of two factors in 2 (main effects are not
    aliased with each other or with two-factor interactions); the all-first-levels default is in it."""
    names = list(levels)
    out = []
    for combo in itertools.product((0, 1), repeat=len(names)):
        if sum(combo) % 2 == 0:
            out.append({n: levels[n][c] for n, c in zip(names, combo)})
    return tuple(out)


def full_plan() -> ClaimsPlan:
    levels = {"size": ((10, 3), (32, 2)), "epochs": (1, 4), "peaked_frac": (0.75, 0.0), "optimizer": ("adam", "sgd")}
    settings = tuple(Setting(*c["size"], c["epochs"], c["peaked_frac"], c["optimizer"]) for c in half_fraction(levels))
    tune = {opt: Setting(10, 3, 1, 0.75, opt) for opt in ("adam", "sgd")}
    return ClaimsPlan(settings=settings, tune=tune)


def quick_plan() -> ClaimsPlan:
    """CI smoke: every arm and both optimizers, b = 32 and 4 epochs, on tiny suites (not a result)."""
    full = full_plan()
    arms = tuple(dataclasses.replace(a, grid=a.grid[2:3]) for a in full.arms)
    settings = (Setting(10, 3, 1, 0.75, "adam"), Setting(32, 2, 4, 0.0, "sgd"))
    return dataclasses.replace(full, arms=arms, lrs={"adam": (0.05,), "sgd": (10.0,)}, settings=settings,
                               tune_seeds=1, seeds=2, spec=CoupledSpec(n_train=4, n_heldout=16, n_val=8),
                               run=dataclasses.replace(full.run, steps=12, eval_every=4))


# --------------------------------------------------------------------------------------------
# Training jobs (validation only) and test measurement (selected snapshots only)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    setting: Setting
    arm: str
    hparams: tuple  # sorted (key, value) pairs
    seed: int


_SUITES: dict = {}


def _suite(plan: ClaimsPlan, s: Setting, seed: int):
    spec = plan.suite_spec(s, seed)
    key = dataclasses.astuple(spec)
    if key not in _SUITES:
        if len(_SUITES) > 64:  # a worker sees few suites; bound the memory anyway
            _SUITES.clear()
        _SUITES[key] = build_coupled_suite(spec)
    return _SUITES[key]


def _method(plan: ClaimsPlan, job: Job):
    arm = {a.name: a for a in plan.arms}[job.arm]
    hp = dict(job.hparams)
    over = {k: v for k, v in hp.items() if k != "lr"}
    m = get_method(arm.method, name=job.arm, lr=hp["lr"], optimizer=job.setting.optimizer, **over)
    return m


def train_job(plan: ClaimsPlan, job: Job) -> dict:
    """Train one (setting, arm, hyper-parameters, seed): validation rows, theta snapshots, diagnostics."""
    suite = _suite(plan, job.setting, job.seed)
    cfg = dataclasses.replace(plan.run, epochs=job.setting.epochs, optimizer=job.setting.optimizer)
    snaps = {}

    def val_measures(policy) -> dict:
        m = measure(suite.part("val"), policy.logits("val"), cfg.budget)
        snaps[len(snaps)] = [p.detach().clone() for p in policy.params]
        return {f"val/{k}": m[k] for k in VAL_KEYS}

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # positive-only corners of the grid warn; report_label says so
        method = _method(plan, job)
        rows, _ = train_method(suite, method, cfg, job.seed, measure_fn=val_measures)
    diag = {k: float(np.mean([r[k] for r in rows if k in r])) for k in DIAG_KEYS if any(k in r for r in rows)}
    val = [{"step": r["step"], **{k: r[k] for k in r if k.startswith("val/")}} for r in rows]
    snaps = {r["step"]: [t.numpy() for t in snaps[i]] for i, r in enumerate(rows)}  # numpy: no shared-memory fds
    return {"job": job, "val": val, "snaps": snaps, "diag": diag, "label": report_label(method)}


def test_measures(plan: ClaimsPlan, setting: Setting, seed: int, params: list) -> dict:
    """Test-split measures of the coupled policy with the given theta snapshot."""
    suite = _suite(plan, setting, seed)
    policy = CoupledPolicy(suite)
    with torch.no_grad():
        for p, v in zip(policy.params, params):
            p.copy_(torch.as_tensor(v))
    m = measure(suite.part("test"), policy.logits("test"), plan.run.budget)
    return {k: m[k] for k in TEST_KEYS}


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def _one_thread() -> None:
    torch.set_num_threads(1)


def job_key(plan: ClaimsPlan, job: Job) -> tuple[str, dict]:
    """The content key of one run: everything its result depends on, hashed (the per-run cache's name).

    The resolved LossConfig, advantage and optimizer settings, the suite spec and the run config:
    adding an arm or seeds changes no other run's key. The simulator's code is not in the key: a
    cache directory belongs to one version of the code."""
    import hashlib
    import json
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # positive-only corners warn; train_job and report_label say so
        m = _method(plan, job)
    cfg = dataclasses.replace(plan.run, epochs=job.setting.epochs, optimizer=job.setting.optimizer)
    key = {"arm": job.arm, "loss": dataclasses.asdict(m.loss_config()), "adv": m.adv, "lr": m.lr,
           "lr_scale": m.lr_scale, "optimizer": m.optimizer, "hparams": list(job.hparams),
           "suite": dataclasses.asdict(plan.suite_spec(job.setting, job.seed)), "run": dataclasses.asdict(cfg),
           "seed": job.seed}
    text = json.dumps(key, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:20], key


def _cache_load(cache_dir, plan: ClaimsPlan, job: Job) -> Optional[dict]:
    import json

    h, _ = job_key(plan, job)
    meta, arrays = cache_dir / f"{h}.json", cache_dir / f"{h}.npz"
    if not (meta.exists() and arrays.exists()):
        return None
    d = json.loads(meta.read_text())
    with np.load(arrays) as z:
        snaps = {int(step): [z[f"{step}_{i}"] for i in range(n)] for step, n in d["snap_sizes"].items()}
    return {"job": job, "val": d["val"], "snaps": snaps, "diag": d["diag"], "label": d["label"]}


def _cache_save(cache_dir, plan: ClaimsPlan, res: dict) -> None:
    """npz (theta snapshots, exact float bits) then json (written last, renamed: its presence = complete)."""
    import json
    import os

    h, key = job_key(plan, res["job"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"{step}_{i}": a for step, snap in res["snaps"].items() for i, a in enumerate(snap)}
    tmp = cache_dir / f"{h}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cache_dir / f"{h}.npz")
    meta = {"key": key, "val": res["val"], "diag": res["diag"], "label": res["label"],
            "snap_sizes": {str(s): len(v) for s, v in res["snaps"].items()}}
    tmp = cache_dir / f"{h}.json.tmp"
    tmp.write_text(json.dumps(meta, default=repr))
    os.replace(tmp, cache_dir / f"{h}.json")


def run_jobs(plan: ClaimsPlan, jobs: list, workers: int, label: str, cache_dir=None) -> list:
    """train_job over jobs, in `workers` spawned processes (1: in this process); costliest first.

    `cache_dir`: each run's result is kept there (`job_key`) and a run already there is read, not
    recomputed, so a study is resumable and adding an arm trains only that arm. Returns the results
    in `jobs` order; `run_jobs.computed` counts the runs trained by the last call."""
    import functools

    cached = {}
    if cache_dir is not None:
        for j in jobs:
            r = _cache_load(cache_dir, plan, j)
            if r is not None:
                cached[j] = r
    todo = [j for j in dict.fromkeys(jobs) if j not in cached]
    order = sorted(todo, key=lambda j: -(j.setting.epochs * j.setting.branching ** j.setting.depth))
    fn = functools.partial(train_job, plan)
    t0, done = time.perf_counter(), dict(cached)
    if cached:
        print(f"claims {label}: {len(cached)} of {len(jobs)} runs read from {cache_dir}", file=sys.stderr)
    if workers <= 1:
        it = map(fn, order)
        pool = None
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)
        it = pool.map(fn, order, chunksize=1)
    try:
        for i, res in enumerate(it, 1):
            done[res["job"]] = res
            if cache_dir is not None:
                _cache_save(cache_dir, plan, res)
            if i % max(1, len(order) // 10) == 0 or i == len(order):
                print(f"claims {label}: {i}/{len(order)} runs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        if pool is not None:
            pool.shutdown()
    run_jobs.computed = len(order)
    return [done[j] for j in jobs]


run_jobs.computed = 0


def _val_rows(results: list, setting: Setting, arm: str) -> ValRows:
    return ValRows({"arm": arm, "hparams": r["job"].hparams, "seed": r["job"].seed, **v}
                   for r in results if r["job"].setting == setting and r["job"].arm == arm for v in r["val"])


def tune(plan: ClaimsPlan, workers: int, select_fn: Callable, cache_dir=None) -> tuple[dict, list]:
    """Stage 1: every arm's grid on the tuning setting of each optimizer, `tune_seeds` unreported suites."""
    jobs = [Job(plan.tune[opt], a.name, tuple(sorted(hp.items())), 1000 + i)
            for opt in plan.tune for a in plan.arms for hp in plan.grid(a, opt) for i in range(plan.tune_seeds)]
    res = run_jobs(plan, jobs, workers, "tuning", cache_dir)
    tuned, table = {}, []
    for opt, s in plan.tune.items():
        for a in plan.arms:
            vr = _val_rows(res, s, a.name)
            hp, _ = select_fn(vr, "best")
            tuned[(a.name, opt)] = hp
            for cand in dict.fromkeys(r["hparams"] for r in vr):
                best = [max(r["val/pass@1"] for r in vr if r["hparams"] == cand and r["seed"] == sd)
                        for sd in dict.fromkeys(r["seed"] for r in vr)]
                table.append({"optimizer": opt, "arm": a.name, "hparams": dict(cand), "val_pass@1": float(np.mean(best)),
                              "selected": cand == hp})
    return tuned, table


def evaluate(plan: ClaimsPlan, tuned: dict, workers: int, select_fn: Callable,
             cache_dir=None) -> tuple[dict, dict, dict]:
    """Stage 2: each setting at the tuned values, `seeds` suites; steps selected on validation, then test."""
    jobs = [Job(s, a.name, tuned[(a.name, s.optimizer)], seed)
            for s in plan.settings for a in plan.arms for seed in range(plan.seeds)]
    res = run_jobs(plan, jobs, workers, "settings", cache_dir)
    by = {(r["job"].setting, r["job"].arm, r["job"].seed): r for r in res}
    picks = {}
    for s in plan.settings:
        for a in plan.arms:
            vr = _val_rows(res, s, a.name)
            for rule in RULES:
                _, steps = select_fn(vr, rule)
                picks[(s, a.name, rule)] = steps
    # test measures, only now and only at the selected snapshots
    results, diag, labels = {}, {}, {}
    null = next(a.name for a in plan.arms if a.role == "null")
    for s in plan.settings:
        base = [test_measures(plan, s, sd, by[(s, null, sd)]["snaps"][0]) for sd in range(plan.seeds)]
        for rule in RULES:
            res_sr = {"base": {k: [b[k] for b in base] for k in TEST_KEYS}}
            for a in plan.arms:
                ms = [test_measures(plan, s, sd, by[(s, a.name, sd)]["snaps"][picks[(s, a.name, rule)][sd]])
                      for sd in range(plan.seeds)]
                res_sr[a.name] = {k: [m[k] for m in ms] for k in TEST_KEYS}
                res_sr[a.name]["step"] = [picks[(s, a.name, rule)][sd] for sd in range(plan.seeds)]
            results[(s.name, rule)] = res_sr
        for a in plan.arms:
            runs = [by[(s, a.name, sd)] for sd in range(plan.seeds)]
            diag[(s.name, a.name)] = {k: float(np.mean([r["diag"][k] for r in runs if k in r["diag"]]))
                                      for k in DIAG_KEYS if any(k in r["diag"] for r in runs)}
            labels[a.name] = runs[0]["label"]
    return results, diag, labels


def run_claims(plan: ClaimsPlan, workers: int = 2, select_fn: Callable = select, cache_dir=None) -> dict:
    """Both stages and the verdicts, as one JSON-able dict (what claims.json holds).

    `cache_dir` (a Path): per-run results kept and reused there (`run_jobs`); "computed" counts
    the runs trained by this call."""
    t0 = time.perf_counter()
    tuned, tuning = tune(plan, workers, select_fn, cache_dir)
    computed = run_jobs.computed
    results, diag, labels = evaluate(plan, tuned, workers, select_fn, cache_dir)
    computed += run_jobs.computed
    rows = verdicts(plan, results)
    return {
        "plan": plan_dict(plan), "tuning": tuning,
        "tuned": [{"arm": a, "optimizer": o, "hparams": dict(hp)} for (a, o), hp in tuned.items()],
        "results": [{"setting": s, "rule": r, "arm": a, **m} for (s, r), res in results.items() for a, m in res.items()],
        "diagnostics": [{"setting": s, "arm": a, **d} for (s, a), d in diag.items()],
        "labels": labels, "verdicts": rows, "summary": summarise(rows), "wall_s": time.perf_counter() - t0,
        "computed": computed,
    }


def plan_dict(plan: ClaimsPlan) -> dict:
    return {"arms": [dataclasses.asdict(a) for a in plan.arms], "lrs": plan.lrs,
            "settings": [s.name for s in plan.settings], "tune": {o: s.name for o, s in plan.tune.items()},
            "tune_seeds": plan.tune_seeds, "seeds": plan.seeds, "spec": dataclasses.asdict(plan.spec),
            "run": dataclasses.asdict(plan.run), "tol": plan.tol, "alpha": plan.alpha,
            "n_correct_per_leaves": plan.n_correct_per_leaves}


def main_study(out_dir, quick: bool = False, workers: int = 2, command: str = "") -> int:
    """What `python -m apo_toy.run --preset claims --out DIR [--quick]` runs: claims.json and claims.md."""
    import datetime
    import json
    import subprocess
    from pathlib import Path

    out_dir = Path(out_dir)
    plan = quick_plan() if quick else full_plan()
    try:  # the commit the code ran at: read before the (long) run
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    res = run_claims(plan, workers, cache_dir=out_dir / "runs")
    res["provenance"] = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": commit, "workers": workers, "quick": quick}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "claims.json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    head = (f"# Claims study{' (quick smoke run, not a result)' if quick else ''}\n\n`{command}`, "
            f"{res['provenance']['date']}, commit {commit}, wall time {res['wall_s']:.0f} s with {workers} "
            "worker process(es). Protocol: docs/simulator.md, \"The claims study\".\n")
    (out_dir / "claims.md").write_text(claims_markdown(res, head))
    print((out_dir / "claims.md").read_text().split("## Tuning")[0])
    print(f"wrote {out_dir}/claims.json, claims.md ({res['wall_s']:.0f} s)")
    return 0
