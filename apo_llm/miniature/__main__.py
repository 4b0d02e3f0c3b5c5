"""`python -m apo_llm.miniature`: run (or resume) the sweep, write its summaries, draw its figures.

The flags are the fields of `MiniatureOptions` (apo_llm.options: `--field VALUE`, bare `--quick`,
lists as `--arms a b` or `--arms a,b`; the old dash spellings such as `--retry-failed` still work
with a deprecation line). A mistake is one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from apo_llm.options import option, parse_command

from .design import ARMS, FULL, QUICK, SPLITS, SUFFIX, Sizes

PROG = "python -m apo_llm.miniature"
DESCRIPTION = ("The paper's experiment in miniature on a CPU: every arm on the tiny Llama, selected on validation, "
               "pass@k on test (docs/miniature.md).")
SIZE_FIELDS = ("seeds", "more_seeds", "steps", "every", "problems", "n", "val_problems", "val_n")


def _sized(field: str, text: str) -> str:
    return f"{text} (default: {getattr(FULL, field)}, --quick {getattr(QUICK, field)})"


@dataclass
class MiniatureOptions:
    """What one call of the sweep takes; a size left at None is the preset's (FULL, or QUICK with --quick)."""

    quick: bool = option(False, "CI size: quick tiny model, 3 arms, 1-2 seeds, 2 steps, n=32")
    out: Optional[str] = option(None, "sweep directory (reused = resumed); default runs/llm_miniature[_quick]")
    figures: Optional[str] = option(None, "where the PNG/PDF go (default: <out>/figures; "
                                          "paper_figures/figures overwrites the README's)")
    arms: Optional[list[str]] = option(None, "train only these of the preset's arms (several processes may "
                                             f"share --out); of {list(ARMS)}")
    seeds: Optional[int] = option(None, _sized("seeds", "seeds per arm"))
    more_seeds: Optional[int] = option(None, _sized("more_seeds", "seeds of each group's validation-best arm"))
    steps: Optional[int] = option(None, _sized("steps", "RL steps per run"))
    every: Optional[int] = option(None, _sized("every", "checkpoint / validation interval in steps"))
    problems: Optional[int] = option(None, _sized("problems", "problems per reported split"))
    n: Optional[int] = option(None, _sized("n", "samples per reported problem"))
    val_problems: Optional[int] = option(None, _sized("val_problems", "validation problems"))
    val_n: Optional[int] = option(None, _sized("val_n", "samples per validation problem"))
    splits: Optional[list[str]] = option(None, "reported splits to evaluate, of test | test_hard (default: both; "
                                               "test_hard has 4 events per problem)", choices=SPLITS)
    retry_failed: bool = option(False, "train again the (arm, seed) runs recorded in FAILED")
    threads: int = option(1, "torch CPU threads (1 is fastest for the tiny model)")


def sizes_from(opts: MiniatureOptions) -> Sizes:
    """The preset with the sizes given on the command line; ValueError naming the field."""
    sz = QUICK if opts.quick else FULL
    over = {k: getattr(opts, k) for k in SIZE_FIELDS if getattr(opts, k) is not None}
    for k, v in over.items():
        if v < 1:
            raise ValueError(f"{k}: must be >= 1, got {v}")
    if opts.splits is not None:
        over["splits"] = tuple(dict.fromkeys(opts.splits))
    sz = dataclasses.replace(sz, **over)
    if sz.more_seeds < sz.seeds:
        sz = dataclasses.replace(sz, more_seeds=sz.seeds)  # --seeds above the preset's more_seeds: all alike
    if sz.every > sz.steps:
        raise ValueError(f"every: must be <= steps ({sz.steps}), got {sz.every}")
    return sz


def only_arms(opts: MiniatureOptions, sz: Sizes) -> Optional[tuple[str, ...]]:
    if opts.arms is None:
        return None
    bad = [a for a in opts.arms if a not in sz.arms]
    if bad or not opts.arms:
        raise ValueError(f"arms: {bad or 'none given'} not in this preset's arms {list(sz.arms)}")
    return tuple(opts.arms)


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    import logging

    from paper_figures.miniature import draw_sweep

    from .report import markdown
    from .sweep import run_sweep

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_command(MiniatureOptions, argv, prog=prog, description=DESCRIPTION)
        sz = sizes_from(opts)
        only = only_arms(opts, sz)
        out = Path(opts.out) if opts.out else Path("runs") / ("llm_miniature_quick" if opts.quick else "llm_miniature")
        results, cur = run_sweep(out, sz, opts.threads, retry_failed=opts.retry_failed, only=only)
    except ValueError as err:  # apo_llm.options.UserError included: one line, no traceback
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    fig_dir = Path(opts.figures) if opts.figures else out / "figures"
    draw_sweep(fig_dir, results, cur)
    for split, res in results.items():
        print(f"\nreported split {split!r} ({out / f'results{SUFFIX[split]}.json'}):\n" + markdown(res, sz))
    print(f"[llm_miniature] {res['wall_s']:.0f} s; figures in {fig_dir}")
    return 0


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does
    sys.exit(main())
