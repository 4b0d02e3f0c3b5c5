"""`python -m paper_figures --quick` writes every figure as a valid, non-trivial PNG (and a PDF).

The command runs as a subprocess (what a user types), on reduced simulator sizes, with the Top-K
coverage computed on the session's quick tiny model (APO_CACHE_DIR points at the fixture's build).
Trainer / evaluator inputs are small files in the documented formats (metrics.jsonl,
summary.json), so the figures that read them are exercised too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_train_run(path: Path, loss: str) -> Path:
    """A trainer output dir: config.yaml (loss name) + metrics.jsonl (step and eval records)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"loss:\n  name: {loss}\n")
    lines = []
    for step in range(1, 4):
        rec = {"step": step, "reward": 0.2 * step, "entropy": 1.0 / step}
        if loss == "apo":
            rec["apo/manifold_mass"] = 0.9 + 0.01 * step
        lines.append(rec)
    lines += [{"step": s, "eval/pass@1": 0.2 + 0.05 * s, "eval/pass@4": 0.5 + 0.02 * s} for s in (0, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _fake_eval_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    ks = [1, 2, 4]
    models = {lab: {"problems": 4, "n": 4, "pass@k": {str(k): {"mean": m * k / 4, "se": 0.05} for k in ks}}
              for lab, m in (("base", 0.6), ("apo", 0.8))}
    (path / "summary.json").write_text(json.dumps({"ks": ks, "models": models}))
    return path


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name}: not a PNG"
    assert len(data) > 15_000, f"{path.name}: suspiciously small ({len(data)} bytes)"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 500, f"{path.name}: shape {img.shape}"
    assert float(np.std(img[..., :3])) > 0.02, f"{path.name}: (nearly) blank image"


def test_quick_run_writes_every_figure(tmp_path, tiny_model_dir):
    from paper_figures import ALL_FIGURES

    out = tmp_path / "figs"
    runs = [_fake_train_run(tmp_path / "runs" / n, loss) for n, loss in (("apo-tiny", "apo"), ("grpo-tiny", "grpo"))]
    ev = _fake_eval_dir(tmp_path / "eval")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", APO_CACHE_DIR=str(Path(tiny_model_dir).parent))
    cmd = [sys.executable, "-m", "paper_figures", "--quick", "--out", str(out),
           "--train_runs", *map(str, runs), "--eval_dirs", str(ev)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ALL_FIGURES:
        _check_png(out / f"{name}.png")
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    numbers = json.loads((out / "numbers.json").read_text())
    assert set(numbers) == set(ALL_FIGURES)
    assert 0.0 < numbers["topk_coverage"]["coverage@1"] <= numbers["topk_coverage"]["coverage@16"] <= 1.0


def test_missing_inputs_are_clear_errors(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "paper_figures", "--quick", "--out", str(tmp_path), "--only",
                           "training_curves"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--train_runs" in proc.stderr


def test_command_line_is_the_options_parser(capsys):
    """Flags are the FigureOptions fields; the old dash spellings still parse (with a deprecation
    line); a wrong figure name or flag is one line naming it, exit code 2, before any work."""
    from paper_figures.__main__ import FigureOptions, main, parse_args

    opts = parse_args(["--train-runs", "a", "b", "--no-topk", "--only", "training_curves,eval_passk"])
    assert isinstance(opts, FigureOptions)
    assert (opts.train_runs, opts.no_topk, opts.only) == (["a", "b"], True, ["training_curves", "eval_passk"])
    assert capsys.readouterr().err.count("deprecated") == 2
    for argv, field in ((["--only", "squeezin"], "only"), (["--threads", "two"], "threads"), (["--outt", "x"], "outt")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {field}"), err


def test_style_one_colour_per_method():
    from paper_figures import style

    assert style.color("apo@0.3") == style.color("apo") != style.color("grpo")
    assert style.color("grpo_kl@0.05") == style.color("grpo_kl") != style.color("grpo")
    assert style.color("grpo_kl_full@0.5") == style.color("grpo_kl_full")
    main = ["base", "grpo", "grpo_kl", "grpo_kl_full", "kl_on_wrong", "apo", "apo_push_only"]
    assert len({style.color(m) for m in main}) == len(main)  # the compared methods are distinguishable
    assert all(style.color(m) in style.OKABE_ITO.values() for m in main if m != "grpo_kl_full")  # Okabe-Ito first
