"""CLI: regenerate every figure. `python -m paper_figures --help`."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from apo_llm.options import option, parse_command

from . import ALL_FIGURES, SIM_FIGURES

DEFAULT_OUT = Path(__file__).parent / "figures"
ONLY_CHOICES = ALL_FIGURES + ("llm_miniature",)


@dataclass
class FigureOptions:
    """The flags of `python -m paper_figures` (apo_llm.options: `--field VALUE`, lists as `--only a b`)."""

    out: str = option(str(DEFAULT_OUT), f"output folder for the PNG and PDF files (default {DEFAULT_OUT}: "
                      "OVERWRITES the committed figures and numbers.json; pass --out /tmp/figs to look first)")
    quick: bool = option(False, "reduced sizes (seconds, for CI); figures are not for reading")
    only: Optional[list[str]] = option(None, f"make only these figures, of {' | '.join(ONLY_CHOICES)}",
                                       choices=ONLY_CHOICES)
    train_runs: list[str] = option([], "apo_llm.train output dirs")
    eval_dirs: list[str] = option([], "apo_llm.evaluate output dirs")
    topk: Optional[str] = option(None, "apo_llm.topk_coverage output dir (default: compute on the tiny model)")
    miniature: Optional[str] = option(None, "a `python -m apo_llm.miniature` sweep dir: draw its llm_miniature_* "
                                            "figures")
    no_topk: bool = option(False, "skip the Top-K coverage figure")
    frontier: Optional[str] = option(None, "a `python -m apo_toy.run --preset frontier` output dir "
                                           "(default: run the preset here)")
    threads: int = option(1, "torch CPU threads (the simulator is small)")


def parse_args(argv: Optional[Sequence[str]]) -> FigureOptions:
    return parse_command(FigureOptions, argv, prog="python -m paper_figures", description=__doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:  # apo_llm.options.UserError: one line naming the flag
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    want = set(args.only) if args.only else set(SIM_FIGURES) | {"topk_coverage"}
    if args.train_runs:
        want.add("training_curves")
    if args.eval_dirs:
        want.add("eval_passk")
    if args.no_topk:
        want.discard("topk_coverage")
    if args.miniature is not None:
        want.add("llm_miniature")
    for flag, name, given in (("--train_runs", "training_curves", args.train_runs),
                              ("--eval_dirs", "eval_passk", args.eval_dirs),
                              ("--miniature", "llm_miniature", args.miniature)):
        if name in want and not given:
            print(f"error: figure {name} needs {flag}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from . import llm, sim, style

    torch.set_num_threads(max(args.threads, 1))
    import matplotlib

    matplotlib.use("Agg")  # this entry point writes files only
    style.setup()
    sz = sim.QUICK if args.quick else sim.FULL
    out = Path(args.out)
    written, numbers = [], {}

    def make(name: str, fn) -> None:
        if name not in want:
            return
        t0 = time.perf_counter()
        try:
            paths, info = fn()
        except ValueError as err:  # bad input paths / files: a clear message, not a traceback
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        written.extend(paths)
        numbers[name] = info
        print(f"[paper_figures] {name}: {time.perf_counter() - t0:.1f} s -> {paths[0]}", flush=True)

    make("squeezing", lambda: sim.fig_squeezing(out, sz))
    if "rsc_trajectories" in want:
        t0 = time.perf_counter()
        table = sim.run_main(sz)
        print(f"[paper_figures] main simulator runs (tabular): {time.perf_counter() - t0:.1f} s", flush=True)
        make("rsc_trajectories", lambda: sim.fig_rsc(out, sz, table))
    if "passk_curves" in want:
        t0 = time.perf_counter()
        coupled = sim.run_coupled(sz)
        print(f"[paper_figures] coupled-model runs: {time.perf_counter() - t0:.1f} s", flush=True)
        make("passk_curves", lambda: sim.fig_passk(out, sz, coupled))
    make("frontier", lambda: sim.fig_frontier(
        out, sz, sim.read_frontier(args.frontier) if args.frontier else sim.run_sweep(sz, quick=args.quick)))
    make("elastic_recovery", lambda: sim.fig_recovery(out, sz))
    make("ablation_clip_anchoring", lambda: sim.fig_ablation(out, sz))

    def topk():
        if args.topk is not None:
            path = Path(args.topk) / "topk_coverage.json"
            if not path.is_file():
                raise SystemExit(f"error: --topk {args.topk} has no topk_coverage.json")
            report, source = json.loads(path.read_text()), Path(str(json.loads(path.read_text()).get("model", "model"))).name
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # the coverage tool's own files are not figures
                report = llm.compute_topk_report(Path(tmp), quick=args.quick)
            source = "tiny Llama (quick build)" if args.quick else "tiny Llama"
        return llm.fig_topk(out, report, source)

    make("topk_coverage", topk)
    make("training_curves", lambda: llm.fig_training(out, [Path(p) for p in args.train_runs]))
    make("eval_passk", lambda: llm.fig_eval(out, [Path(p) for p in args.eval_dirs]))
    if args.miniature is not None:
        from . import miniature

        make("llm_miniature", lambda: miniature.figures_from(Path(args.miniature), out))
    num_file = out / "numbers.json"
    if args.only and num_file.is_file():  # a partial rerun keeps the other figures' numbers
        numbers = {**json.loads(num_file.read_text()), **numbers}
    num_file.write_text(json.dumps(numbers, indent=1, default=float) + "\n")
    print(f"[paper_figures] wrote {len(written)} files into {out}; plotted numbers in {out / 'numbers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
