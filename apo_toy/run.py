"""CLI: run a named experiment and write metrics.jsonl, summary.json and PNG figures.

    python -m apo_toy.run --preset rsc --out runs/rsc [--mode exact|sampled] [--methods a,b]
                          [--seeds N] [--steps N] [--optimizer sgd|adam] [--lr X] [--spec FIELD=VALUE ...]

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
import os
import sys
from pathlib import Path

import numpy as np

from .measures import PASS_KS
from .presets import PRESETS, SUMMARY_KEYS, Table, get_preset, run_preset

PLOT_KEYS = ("pass@1", "pass@256", "coverage", "distinct@256", "manifold_mass", "entropy")


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
    """Curves of the main measures over steps (mean over seeds) and final pass@k vs k."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = Table(r for r in table.rows if r["method"] != "base")
    base = table.where(method="base")
    methods = runs.unique("method")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, key in zip(axes.flat, PLOT_KEYS):
        for m in methods:
            sub = runs.where(method=m)
            steps = sorted(set(sub.column("step").astype(int).tolist()))
            mean = [np.nanmean(sub.where(step=s).column(key)) for s in steps]
            ax.plot(steps, mean, label=m)
        if len(base):
            ax.axhline(np.nanmean(base.column(key)), color="k", ls="--", lw=1, label="base")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"apo_toy preset {preset!r} (mean over seeds)")
    fig.tight_layout()
    paths = [out / "curves.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    ks = list(PASS_KS)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    fin = runs.final()
    for m in methods:
        ax.plot(ks, [np.nanmean(fin.where(method=m).column(f"pass@{k}")) for k in ks], marker="o", label=m)
    if len(base):
        ax.plot(ks, [np.nanmean(base.column(f"pass@{k}")) for k in ks], "k--", marker="s", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (exact)")
    ax.set_title(f"{preset}: final pass@k")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "pass_at_k.png")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


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
    ap.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--mode", choices=("exact", "sampled"), default=None, help="default: the preset's")
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (each seed = a different suite)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per method")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="default: the preset's")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    ap.add_argument("--spec", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override fields of the preset's suite spec, e.g. kappa=1.0 peaked_frac=0")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for these small tensors on a shared machine)")
    args = ap.parse_args(argv)
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
    print(f"wrote {args.out}/metrics.jsonl, summary.json, table.md, curves.png, pass_at_k.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
