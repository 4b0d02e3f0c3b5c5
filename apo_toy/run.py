"""CLI: run a named experiment and write metrics.jsonl, summary.json and PNG figures.

    python -m apo_toy.run --preset rsc --out runs/rsc [--mode exact|sampled] [--methods a,b]
                          [--seeds N] [--steps N] [--optimizer sgd|adam] [--lr X] [--spec FIELD=VALUE ...]
                          [--quick]
    python -m apo_toy.run --replot runs/rsc      # tables and figures again from metrics.jsonl
    python -m apo_toy.run --preset claims --out runs/claims [--quick] [--workers 2]   # apo_toy/claims.py

--quick: 2 seeds, 20 steps, 8 training / 8 held-out prompts on coupled presets (a smoke run, not a result).
The `frontier` preset also writes frontier.md, frontier.json and frontier.png (apo_toy/frontier.py).

metrics.jsonl: one row per step, method and seed (the base policy is method "base", step 0). On a
coupled preset (`rsc`) the plain keys (pass@1 ... pass@1024, crossover_k, frac_prompts_below_base,
coverage, ...) are measured on the held-out prompts and `train/...` on the training prompts.
summary.json: the resolved settings, the base measures per seed, and per method the final mean /
std over seeds of every measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .coupled import CoupledSpec
from .methods import METHODS
from .presets import PRESETS, SUMMARY_KEYS, Table, get_preset, run_preset


def _claims_study(*args, **kw) -> int:
    from .claims import main_study

    return main_study(*args, **kw)


# studies with their own protocol and outputs (not a Preset's methods x seeds table)
STUDIES = {"claims": _claims_study}


def write_outputs(table: Table, out: Path, preset: str, settings: dict) -> None:
    """metrics.jsonl, summary.json and figures into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        for row in table.rows:
            f.write(json.dumps(row) + "\n")
    runs = Table(r for r in table.rows if r["method"] != "base")
    base = table.where(method="base")
    summary = {
        "preset": preset,
        "settings": settings,
        "base": base.summary(by="method")[0] if len(base) else {},
        "methods": runs.summary(SUMMARY_KEYS),
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    (out / "table.md").write_text(markdown_table(summary))
    plot(table, out, preset)
    if preset in PRESETS and PRESETS[preset].frontier:
        if "grpo" in table.unique("method"):
            write_frontier(table, out, settings)
        else:  # the gains are measured against GRPO's trajectory
            print("note: frontier.md / frontier.png need the 'grpo' arm (the null trajectory); not written",
                  file=sys.stderr)


TABLE_KEYS = ("pass@1", "pass@256", "pass@1024", "crossover_k", "frac_prompts_below_base", "coverage", "distinct@256")


def markdown_table(summary: dict, keys: tuple = TABLE_KEYS) -> str:
    """Final mean +- std over seeds per method, with the base policy first (README format)."""
    head = "| method | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    rows = []
    for r in [dict(summary["base"], method="base (reference)")] + summary["methods"]:
        cells = [_cell(r, k) for k in keys]
        rows.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _cell(r: dict, k: str) -> str:
    """mean ± std; the crossover k* as its median over the seeds that have one, and how many do."""
    if k == "crossover_k":
        med = r.get("crossover_k_median")
        return "none" if med is None else f"{med:g} ({r['crossover_seeds']}/{r['n_seeds']} seeds)"
    return f"{r[k]:.3f} ± {r.get(k + '_std', 0.0):.3f}" if k in r else "n/a"


def plot(table: Table, out: Path, preset: str) -> list[Path]:
    """curves.png and pass_at_k.png (apo_toy/plots.py); a preset's curve_arms, when it names some, only."""
    from .plots import plot_curves, plot_pass_at_k

    curve = PRESETS[preset].curve_arms if preset in PRESETS else ()
    methods = [m for m in table.unique("method") if m in curve] if curve else None
    return [plot_curves(table, out, preset, methods), plot_pass_at_k(table, out, preset, methods)]


def write_frontier(table: Table, out: Path, settings: dict) -> list[dict]:
    """frontier.md / frontier.json / frontier.png: iso-pass@1 gains over GRPO's trajectory (apo_toy/frontier.py)."""
    from .frontier import frontier_markdown, frontier_rows
    from .methods import METHODS, get_method, report_label
    from .plots import plot_frontier

    known = {m.name: m for m in map(get_method, (*get_preset("frontier").methods, *METHODS))}
    labels = {m: report_label(known[m]) for m in table.unique("method") if m in known}
    rows = frontier_rows(table, labels=labels)
    wall = sum(r.get("wall_s", 0.0) for r in table.rows)
    cost = f"compute: {wall:.0f} s of training + measuring, summed over arms and seeds (1 thread)."
    (out / "frontier.md").write_text(frontier_markdown(rows, cost))
    with open(out / "frontier.json", "w") as f:
        json.dump({"settings": settings, "arms": rows, "wall_s": wall}, f, indent=1)
    plot_frontier(table, rows, out)
    return rows


def parse_spec(spec, items: list) -> dict:
    """["kappa=1.0", "n_train=8"] -> {"kappa": 1.0, "n_train": 8}, typed like the spec's current values."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(spec, name):
            raise ValueError(f"--spec {item!r}: expected FIELD=VALUE with FIELD a field of {type(spec).__name__}")
        kind = type(getattr(spec, name))
        try:
            out[name] = kind(value)
        except ValueError:
            raise ValueError(f"--spec {item!r}: {name} must be {kind.__name__}") from None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apo_toy.run", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, metavar="PRESET",
                    help="; ".join([f"{n}: {p.seeds} seed{'s' * (p.seeds > 1)}, {p.cfg.steps} steps, {p.cfg.mode}"
                                    for n, p in sorted(PRESETS.items())]
                                   + [f"{n}: a study (docs/simulator.md)" for n in sorted(STUDIES)]))
    ap.add_argument("--out", default=None, help="output directory (its metrics.jsonl, summary.json, table.md and "
                    "figures are overwritten)")
    ap.add_argument("--replot", default=None, metavar="DIR",
                    help="rewrite tables and figures of DIR from its metrics.jsonl and summary.json (no training)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 20 steps, small coupled suites")
    ap.add_argument("--mode", choices=("exact", "sampled"), default=None, help="default: the preset's")
    ap.add_argument("--methods", default=None, help="comma-separated method names, variants as name@field=value "
                    f"(default: the preset's); one of {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds, each a different suite (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per method (default: the preset's)")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="default: the preset's")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    ap.add_argument("--spec", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override fields of the preset's suite spec, e.g. kappa=1.0 peaked_frac=0")
    ap.add_argument("--workers", type=int, default=2,
                    help="claims study: worker processes (one torch thread each)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for these small tensors on a shared machine)")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # recorded in the study's output
    if args.replot:
        return replot(Path(args.replot))
    if not args.preset or not args.out:
        ap.error("--preset and --out are required (or --replot DIR)")
    for name in ("seeds", "steps"):  # 0 would silently mean "the preset's"
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name}: must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found out before training, not after
        print(f"error: --out: {args.out!r} is an existing file, not a directory", file=sys.stderr)
        return 2
    from apo_llm.cli import UserError  # both standard library only
    from apo_llm.runlock import RunLock

    try:
        with RunLock(Path(args.out), "--out: the output directory", "--out"):
            return _run(args)
    except UserError as e:  # RunLockedError, or a lock file that cannot be created
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.preset in STUDIES:
        return STUDIES[args.preset](args.out, quick=args.quick, workers=args.workers,
                                    command="python -m apo_toy.run " + " ".join(args.argv))
    if args.quick:
        args.seeds, args.steps = args.seeds or 2, args.steps or 20
        if args.preset in PRESETS and isinstance(get_preset(args.preset).spec, CoupledSpec):
            args.spec = ["n_train=8", "n_heldout=8"] + list(args.spec)
    import torch

    torch.set_num_threads(max(args.threads, 1))
    try:
        p = get_preset(args.preset)
        methods = [m for m in args.methods.split(",") if m] if args.methods else None
        spec_over = parse_spec(p.spec, args.spec)
        table = run_preset(args.preset, mode=args.mode, methods=methods, seeds=args.seeds, steps=args.steps,
                           progress=True, spec_overrides=spec_over, optimizer=args.optimizer, lr=args.lr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    over = (("mode", args.mode), ("steps", args.steps), ("optimizer", args.optimizer), ("lr", args.lr))
    cfg = dataclasses.replace(p.cfg, **{k: v for k, v in over if v is not None})
    spec = dataclasses.replace(p.spec, **spec_over)
    settings = {"spec": dataclasses.asdict(spec), "run": dataclasses.asdict(cfg), "seeds": args.seeds or p.seeds,
                "methods": table.unique("method")[1:], "description": p.description}
    write_outputs(table, Path(args.out), args.preset, settings)
    print((Path(args.out) / "table.md").read_text())
    extra = ", frontier.md, frontier.json, frontier.png" if p.frontier else ""
    print(f"wrote {args.out}/metrics.jsonl, summary.json, table.md, curves.png, pass_at_k.png{extra}")
    return 0


def replot(out: Path) -> int:
    """Tables and figures of a finished run again, from metrics.jsonl and summary.json."""
    try:
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        summary = json.load(open(out / "summary.json"))
    except (OSError, ValueError) as e:
        print(f"error: --replot {out}: {e}", file=sys.stderr)
        return 2
    write_outputs(Table(rows), out, summary["preset"], summary["settings"])
    print(f"rewrote tables and figures of {out}")
    return 0


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does
    sys.exit(main())
