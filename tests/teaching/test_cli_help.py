"""Every command-line entry point's --help (issue 22): the usage line shows the command as it is typed
(`python -m ...` or `python benchmarks/...`), and the help lists the choices a user must pick from
(methods, presets, splits, losses) and says what a default output path overwrites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (argv after the interpreter, usage prefix, strings the help must contain)
ENTRY_POINTS = [
    (["-m", "apo_llm.train"], "python -m apo_llm.train",
     ["grpo | dapo | grpo_kl | kl_on_wrong | apo", "native", "trl", "(default 'apo')", "old_mass", "overwrite"]),
    (["-m", "apo_llm.evaluate"], "python -m apo_llm.evaluate",
     ["gsm8k | math500 | math | synthetic", "test_hard", "gsm8k_strict", "(default: 16)", "overwritten"]),
    (["-m", "apo_llm.topk_coverage"], "python -m apo_llm.topk_coverage",
     ["gsm8k | math500 | math | synthetic", "auto | on | off", "overwritten"]),
    (["-m", "apo_llm.tiny"], "python -m apo_llm.tiny", ["tiny-llama-v3", "--quick", "replaces the cached build"]),
    (["-m", "apo_toy.run"], "python -m apo_toy.run",
     ["rsc: 1 seed, 150 steps", "frontier: 5 seeds", "apo_old_mass", "kl_on_wrong", "npg", "overwritten"]),
    (["-m", "paper_figures"], "python -m paper_figures",
     ["passk_curves", "llm_miniature", "OVERWRITES the committed figures"]),
    (["-m", "paper_figures.llm_miniature"], "python -m paper_figures.llm_miniature",
     ["test_hard", "apo_old_token", "(default: 120, --quick 2)", "overwrites the README's"]),
    (["benchmarks/bench_toy.py"], "python benchmarks/bench_toy.py", ["(default 20)", "--loop_leaves"]),
    (["benchmarks/bench_train.py"], "python benchmarks/bench_train.py", ["interleaved", "(default:"]),
    (["benchmarks/bench_vs_trl.py"], "python benchmarks/bench_vs_trl.py", ["cpu", "cuda", "(default:"]),
    (["benchmarks/gpu_smoke.py"], "python benchmarks/gpu_smoke.py", ["native", "(default:"]),
]


@pytest.mark.parametrize("argv,prog,wanted", ENTRY_POINTS, ids=[" ".join(e[0]) for e in ENTRY_POINTS])
def test_help_shows_the_command_choices_and_defaults(argv, prog, wanted):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="100")
    r = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: {prog} "), r.stdout[:200]
    flat = " ".join(r.stdout.split())  # argparse wraps lines
    missing = [w for w in wanted if " ".join(w.split()) not in flat]
    assert not missing, f"{prog} --help lacks {missing}"
