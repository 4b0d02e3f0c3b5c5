"""apo_toy speed: time per exact and per sampled step against the number of leaves per prompt.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_toy.py [--steps 20] [--full] [--loop_leaves 256]

For each tree size (one prompt, branching 16, K = 8, float64) it prints
  exact_ms    one exact APO step (exact_batch + exact_loss through policy_loss + backward + SGD)
  sampled_ms  one sampled APO step (G = 8 rollouts, 1 epoch)
  loop_ms     the same exact APO loss computed by a straightforward per-leaf Python loop (one
              policy_loss call per leaf, kept here only as the yardstick); timed on the first
              `--loop_leaves` leaves and scaled linearly to all leaves
  speedup     loop_ms / exact_ms
and the projected (or, with --full, measured) time of 1,000 exact APO steps on the 65,536-leaf
prompt (target: < 20 s on 2 CPU cores), then the cost of one exact step on the coupled model
(apo_toy/coupled.py) for the default `rsc` suite and for one 65,536-leaf prompt. Timings are
wall-clock and noisy on a shared machine.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from apo_llm.cli import fail
from apo_llm.objectives import policy_loss
from apo_llm.options import UserError, option, parse_command
from apo_toy import SuiteSpec, build_suite, get_method
from apo_toy.dynamics import exact_batch
from apo_toy.training import exact_update, sampled_update
from apo_toy.tree import path_to_leaf, reach_and_leaf_logp

SIZES = [(16, 1), (16, 2), (16, 3), (8, 5), (16, 4)]  # (branching, depth): 16 .. 65,536 leaves


def time_it(fn, n: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def per_leaf_loop_loss(suite, cfg, logits, G, adv, max_leaves):
    """YARDSTICK ONLY: the exact APO loss as a Python loop over leaves, one policy_loss call each."""
    from apo_llm.objectives import expected_group_advantage

    logpi_old = torch.log_softmax(logits.detach(), -1)[0]
    _, leaf_logp = reach_and_leaf_logp(logpi_old[None], suite.depth)
    p = (leaf_logp.exp() * suite.rewards).sum(-1).clamp(0, 1)
    c0, c1 = expected_group_advantage(p, G, **adv)
    logpi = torch.log_softmax(logits, -1)[0]
    ref = suite.ref_logpi[0]
    topk = suite.topk(cfg.apo_k)[0]
    total = 0.0
    for leaf in range(min(max_leaves, suite.n_leaves)):
        nodes, acts = path_to_leaf(torch.tensor([leaf]), suite.branching, suite.depth)  # [1, D]
        r = suite.rewards[0, leaf]
        a = (c1 if r > 0 else c0).reshape(1)
        tk = topk[nodes]  # [1, D, K]
        loss, _ = policy_loss(
            cfg, logpi[nodes, acts], logpi_old[nodes, acts], a, torch.ones(1, suite.depth, dtype=torch.bool),
            anchor_logp=logpi[nodes[..., None], tk], anchor_ref_logp=ref[nodes[..., None], tk],
            anchor_is_sampled=tk == acts[..., None], weights=leaf_logp[0, leaf].exp().reshape(1),
            global_tokens=float(suite.depth),
        )
        total = total + loss
    total.backward()
    return total


def bench_coupled(steps: int) -> None:
    """Exact APO step on the coupled model: the default `rsc` suite and one 65,536-leaf training prompt.

    The step is the tabular exact step plus the map theta -> edge logits and its backward; the
    measures (held-out and training prompts) are timed separately, as the runner evaluates them.
    """
    from apo_toy import CoupledPolicy, CoupledSpec, build_coupled_suite, get_preset
    from apo_toy.training import measure_policy

    m = get_method("apo")
    cfg = m.loss_config()
    print("coupled model (exact APO step, Adam; theta = alpha, u, W):")
    print(f"{'suite':>34} {'train_edges':>11} {'exact_ms':>9} {'measure_ms':>10}")
    for label, spec in (("rsc default (32 train, 64 held-out)", get_preset("rsc").spec),
                        ("1 prompt, b=16, D=4 (65,536 leaves)",
                         CoupledSpec(n_train=1, n_heldout=1, branching=16, depth=4, vocab=64))):
        suite = build_coupled_suite(spec)
        pol = CoupledPolicy(suite)
        opt = torch.optim.Adam(pol.params, lr=1e-4)
        fn = lambda: pol.logits("train")  # noqa: E731
        te = time_it(lambda: exact_update(suite.train, cfg, fn, opt, 8, m.adv), steps)
        tm = time_it(lambda: measure_policy(suite, pol), max(steps // 4, 1))
        print(f"{label:>34} {suite.train.ref_logits.numel():>11} {te*1e3:>9.2f} {tm*1e3:>10.2f}")


@dataclass
class BenchOptions:
    """The flags of benchmarks/bench_toy.py."""

    steps: int = option(20, "timed steps per size")
    loop_leaves: int = option(256, "leaves timed in the per-leaf loop")
    full: bool = option(False, "really run 1,000 exact APO steps on 65,536 leaves")
    threads: int = option(0, "torch threads (0: torch default)")


def main() -> None:
    try:
        args = parse_command(BenchOptions, prog="python benchmarks/bench_toy.py", description=__doc__.split("\n")[0])
    except UserError as e:
        fail(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    m = get_method("apo")
    cfg = m.loss_config()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64, one prompt, K=8, G=8")
    print(f"{'leaves':>8} {'b':>3} {'D':>2} {'edges':>8} {'exact_ms':>9} {'sampled_ms':>10} {'loop_ms':>10} {'speedup':>8}")
    exact_ms = {}
    for b, depth in SIZES:
        suite = build_suite(SuiteSpec(n_prompts=1, branching=b, depth=depth, top_k=8, seed=0))
        z = suite.ref_logits.clone().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=1e-3)  # tiny lr: the state stays comparable across steps
        gen = torch.Generator().manual_seed(0)
        te = time_it(lambda: exact_update(suite, cfg, z, opt, 8, m.adv), args.steps)
        ts = time_it(lambda: sampled_update(suite, cfg, z, opt, 8, m.adv, gen), args.steps)
        n_loop = min(args.loop_leaves, suite.n_leaves)
        zl = suite.ref_logits.clone().requires_grad_(True)
        t0 = time.perf_counter()
        per_leaf_loop_loss(suite, cfg, zl, 8, m.adv, n_loop)
        tl = (time.perf_counter() - t0) * suite.n_leaves / n_loop
        exact_ms[suite.n_leaves] = te * 1e3
        edges = suite.n_nodes * b
        print(f"{suite.n_leaves:>8} {b:>3} {depth:>2} {edges:>8} {te*1e3:>9.2f} {ts*1e3:>10.2f} {tl*1e3:>10.0f} {tl/te:>8.0f}")
    print(f"projected 1,000 exact APO steps on 65,536 leaves, diagnostics on: {exact_ms[65536]:.1f} s "
          "(the target, < 20 s, is for the simulator's path: diagnostics off on unmeasured steps; --full measures both)")
    bench_coupled(args.steps)
    suite = build_suite(SuiteSpec(n_prompts=1, branching=16, depth=4, top_k=8, seed=0))
    z = suite.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=1e-3)
    on = time_it(lambda: exact_update(suite, cfg, z, opt, 8, m.adv, diagnostics=True), args.steps)
    off = time_it(lambda: exact_update(suite, cfg, z, opt, 8, m.adv, diagnostics=False), args.steps)
    print(f"65,536 leaves, one exact APO step: diagnostics on {on*1e3:.1f} ms, off {off*1e3:.1f} ms "
          f"(ratio {on/off:.2f}; the simulator turns them off on unmeasured steps)")
    if args.full:
        for diag in (True, False):
            suite = build_suite(SuiteSpec(n_prompts=1, branching=16, depth=4, top_k=8, seed=0))
            z = suite.ref_logits.clone().requires_grad_(True)
            opt = torch.optim.SGD([z], lr=1.0)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(1000):
                exact_update(suite, cfg, z, opt, 8, m.adv, diagnostics=diag)
            print(f"measured 1,000 exact APO steps on 65,536 leaves, diagnostics {'on' if diag else 'off'}: "
                  f"{time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU "
                  "(wall > CPU / threads means the machine was shared)")
    # sanity: the loop and the vectorised exact loss agree (on a small tree, all leaves)
    suite = build_suite(SuiteSpec(n_prompts=1, branching=16, depth=2, top_k=8, seed=0))
    z1 = suite.ref_logits.clone().requires_grad_(True)
    loop = per_leaf_loop_loss(suite, cfg, z1, 8, m.adv, suite.n_leaves)
    from apo_toy.dynamics import exact_loss

    z2 = suite.ref_logits.clone().requires_grad_(True)
    vec, _ = exact_loss(suite, cfg, z2, exact_batch(suite, cfg, suite.ref_logits, 8, m.adv))
    vec.backward()
    print(f"check (256 leaves): loop loss {float(loop.detach()):.12f} vs exact {float(vec.detach()):.12f}, "
          f"max grad diff {float((z1.grad - z2.grad).abs().max()):.2e}")


if __name__ == "__main__":
    main()
