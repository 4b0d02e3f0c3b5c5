"""CLI: run a named experiment and write metrics.jsonl, summary.json and PNG figures.

    python -m apo_toy.run --preset rsc --out runs/rsc [--mode exact|sampled] [--methods a,b]
                          [--seeds N] [--steps N] [--optimizer sgd|adam] [--lr X] [--spec FIELD=VALUE ...]
                          [--quick] [--workers N] [--threads N]
    python -m apo_toy.run --replot runs/rsc      # tables and figures again from metrics.jsonl
    python -m apo_toy.run --preset claims --out runs/claims [--quick] [--workers 2]   # apo_toy/claims.py

--quick: 2 seeds, 20 steps, 8 training / 8 held-out prompts on coupled presets (a smoke run, not a result).
The `frontier` preset also writes frontier.md, frontier.json and frontier.png (apo_toy/frontier.py).

metrics.jsonl: one row per step, method and seed (the base policy is method "base", step 0). On a
coupled preset (`rsc`) the plain keys (pass@1 ... pass@1024, crossover_k, frac_prompts_below_base,
coverage, ...) are measured on the held-out prompts and `train/...` on the training prompts.
summary.json: the resolved settings, the base measures per seed, and per method the final mean /
std over seeds of every measure.

The path to the loss: `main` resolves the preset and its methods (`resolve_preset`, the one
registry lookup), then main -> run_methods -> train_method -> policy_loss -> the loss's term
(apo_toy/training.py). The flags are the fields of `ToyOptions` (apo_llm/options.py's parser).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from apo_llm.options import UserError, option, parse_command

from .coupled import CoupledSpec
from .methods import METHODS
from .presets import PRESETS, get_preset, resolve_preset
from .table import SUMMARY_KEYS, Table, summary_markdown
from .training import MODES, run_methods


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
    (out / "table.md").write_text(summary_markdown(summary))
    plot(table, out, preset)
    if preset in PRESETS and PRESETS[preset].frontier:
        if "grpo" in table.unique("method"):
            write_frontier(table, out, settings)
        else:  # the gains are measured against GRPO's trajectory
            print("note: frontier.md / frontier.png need the 'grpo' arm (the null trajectory); not written",
                  file=sys.stderr)


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


PRESET_HELP = "; ".join([f"{n}: {p.seeds} seed{'s' * (p.seeds > 1)}, {p.cfg.steps} steps, {p.cfg.mode}"
                         for n, p in sorted(PRESETS.items())] + [f"{n}: a study (docs/simulator.md)" for n in sorted(STUDIES)])


@dataclass
class ToyOptions:
    """The flags of `python -m apo_toy.run` (None: the preset's own value)."""

    preset: Optional[str] = option(None, PRESET_HELP)
    out: Optional[str] = option(None, "output directory (its metrics.jsonl, summary.json, table.md and figures are "
                                "overwritten)")
    replot: Optional[str] = option(None, "DIR: rewrite tables and figures of DIR from its metrics.jsonl and "
                                   "summary.json (no training)")
    quick: bool = option(False, "smoke run: 2 seeds, 20 steps, small coupled suites")
    mode: Optional[str] = option(None, "exact | sampled (default: the preset's)", choices=MODES)
    methods: Optional[list[str]] = option(None, "method names (a,b or a b), variants as name@field=value "
                                          f"(default: the preset's); one of {', '.join(METHODS)}")
    seeds: Optional[int] = option(None, "seeds, each a different suite (default: the preset's)")
    steps: Optional[int] = option(None, "RL steps per method (default: the preset's)")
    optimizer: Optional[str] = option(None, "sgd | adam (default: the preset's)", choices=("sgd", "adam"))
    lr: Optional[float] = option(None, "learning rate (default: the preset's)")
    spec: list[str] = option([], "FIELD=VALUE ...: override fields of the preset's suite spec, e.g. kappa=1.0 "
                             "peaked_frac=0")
    workers: int = option(2, "claims study: worker processes (one torch thread each)")
    threads: int = option(1, "torch CPU threads (1 is fastest for these small tensors on a shared machine)")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    try:
        args = parse_command(ToyOptions, argv, prog="python -m apo_toy.run", description=__doc__.split("\n")[0])
    except UserError as e:
        return _error(str(e))
    if args.replot:
        return replot(Path(args.replot))
    if not args.preset or not args.out:
        return _error("--preset and --out are required (or --replot DIR)")
    for name in ("seeds", "steps"):  # 0 would silently mean "the preset's"
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return _error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found out before training, not after
        return _error(f"--out: {args.out!r} is an existing file, not a directory")
    from apo_llm.runlock import RunLock  # standard library only

    try:
        with RunLock(Path(args.out), "--out: the output directory", "--out"):
            if args.preset in STUDIES:
                return STUDIES[args.preset](args.out, quick=args.quick, workers=args.workers,
                                            command="python -m apo_toy.run " + " ".join(argv))
            try:
                r = _resolve(args)  # the preset, --quick and the methods: the one registry lookup
                table = run_methods(r.spec, r.methods, r.cfg, seeds=r.seeds, preset=r.name, progress=True)
            except ValueError as e:
                return _error(str(e))
            return _write(table, r, args.out)
    except UserError as e:  # RunLockedError, or a lock file that cannot be created
        return _error(str(e))


def _resolve(args: ToyOptions):
    """The preset with the flags applied (`resolve_preset`); --quick shortens it; sets torch's threads."""
    if args.quick:
        args.seeds, args.steps = args.seeds or 2, args.steps or 20
        if args.preset in PRESETS and isinstance(get_preset(args.preset).spec, CoupledSpec):
            args.spec = ["n_train=8", "n_heldout=8"] + list(args.spec)
    import torch

    torch.set_num_threads(max(args.threads, 1))
    p = get_preset(args.preset)
    return resolve_preset(args.preset, mode=args.mode, methods=[m for m in args.methods or [] if m],
                          seeds=args.seeds, steps=args.steps, spec_overrides=parse_spec(p.spec, args.spec),
                          optimizer=args.optimizer, lr=args.lr)


def _write(table: Table, r, out: str) -> int:
    p = get_preset(r.name)
    settings = {"spec": dataclasses.asdict(r.spec), "run": dataclasses.asdict(r.cfg), "seeds": r.seeds,
                "methods": table.unique("method")[1:], "description": p.description}
    write_outputs(table, Path(out), r.name, settings)
    print((Path(out) / "table.md").read_text())
    extra = ", frontier.md, frontier.json, frontier.png" if p.frontier else ""
    print(f"wrote {out}/metrics.jsonl, summary.json, table.md, curves.png, pass_at_k.png{extra}")
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
