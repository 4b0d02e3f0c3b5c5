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
     ["gsm8k | math500 | math | synthetic", "test_hard", "gsm8k_strict", "--n (default 16)", "overwritten"]),
    (["-m", "apo_llm.topk_coverage"], "python -m apo_llm.topk_coverage",
     ["gsm8k | math500 | math | synthetic", "auto | on | off", "overwritten"]),
    (["-m", "apo_llm.tiny"], "python -m apo_llm.tiny", ["tiny-llama-v3", "--quick", "replaces the cached build"]),
    (["-m", "apo_toy.run"], "python -m apo_toy.run",
     ["rsc: 1 seed, 150 steps", "frontier: 5 seeds", "apo_old_mass", "kl_on_wrong", "npg", "overwritten"]),
    (["-m", "paper_figures"], "python -m paper_figures",
     ["passk_curves", "llm_miniature", "OVERWRITES the committed figures"]),
    (["-m", "apo_llm.miniature"], "python -m apo_llm.miniature",
     ["test_hard", "apo_old_token", "(default: 120, --quick 2)", "overwrites the README's"]),
    (["-m", "paper_figures.llm_miniature"], "python -m paper_figures.llm_miniature",
     ["test_hard", "apo_old_token", "(default: 120, --quick 2)", "overwrites the README's"]),
    (["benchmarks/bench_toy.py"], "python benchmarks/bench_toy.py", ["(default 20)", "--loop_leaves"]),
    (["benchmarks/bench_train.py"], "python benchmarks/bench_train.py", ["interleaved", "(default 4)"]),
    (["benchmarks/bench_vs_trl.py"], "python benchmarks/bench_vs_trl.py", ["cpu", "cuda", "(default 'tiny')"]),
    (["benchmarks/gpu_smoke.py"], "python benchmarks/gpu_smoke.py", ["native", "(default 560)"]),
    (["scripts/check_readme_numbers.py"], "python scripts/check_readme_numbers.py", ["demo | sim | tests"]),
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


# Entry points that parse through apo_llm.options: (argv, the file and dataclass of its flags, bad flags,
# the dash spelling that must still work with a deprecation line, the field the one-line error names)
OPTIONS_COMMANDS = [
    (["-m", "apo_llm.evaluate"], "apo_llm/evaluate.py:EvalConfig", ["--max-new-tokens", "many"],
     "max-new-tokens", "max_new_tokens: expected an integer, got 'many'"),
    (["-m", "apo_llm.topk_coverage"], "apo_llm/topk_coverage.py:CoverageConfig", ["--batch-size", "many"],
     "batch-size", "batch_size: expected an integer, got 'many'"),
    (["-m", "apo_llm.tiny"], "apo_llm/tiny.py:TinyCommand", ["--cache-dir", "x", "--quick", "maybe"],
     "cache-dir", "quick: expected a boolean (true/false), got 'maybe'"),
    (["benchmarks/bench_train.py"], "benchmarks/bench_train.py:BenchTrainCommand", ["--mode", "fast"],
     None, "mode: choose from interleaved, loop, got 'fast'"),
    (["benchmarks/bench_vs_trl.py"], "benchmarks/bench_vs_trl.py:BenchVsTrlCommand", ["--lora-r", "big"],
     "lora-r", "lora_r: expected an integer, got 'big'"),
    (["benchmarks/gpu_smoke.py"], "benchmarks/gpu_smoke.py:SmokeCommand", ["--max-new-tokens", "many"],
     "max-new-tokens", "max_new_tokens: expected an integer, got 'many'"),
    (["scripts/check_readme_numbers.py"], "scripts/check_readme_numbers.py:CheckCommand", ["--onlyy", "demo"],
     None, "onlyy: unknown option; choose from ['docs', 'only', 'outputs']"),
]


def _command_fields(spec: str) -> list[str]:
    import dataclasses
    import importlib.util

    path, cls = spec.split(":")
    mod_spec = importlib.util.spec_from_file_location(f"_cmd_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module  # dataclasses look their module up there
    mod_spec.loader.exec_module(module)
    return [f.name for f in dataclasses.fields(getattr(module, cls))]


@pytest.mark.parametrize("argv,spec,bad,dash,error", OPTIONS_COMMANDS, ids=[" ".join(e[0]) for e in OPTIONS_COMMANDS])
def test_options_commands_list_every_field_and_refuse_in_one_line(argv, spec, bad, dash, error):
    """--help has one `--field_name (default ...)` line per dataclass field; a dash spelling still
    works (one deprecation line); a bad value is one `error:` line naming the field, exit 2."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    missing = [f for f in _command_fields(spec) if f"  --{f} (default " not in r.stdout]
    assert not missing, f"{argv} --help lacks {missing}"
    r = subprocess.run([sys.executable, *argv, *bad], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    warning = [f"warning: --{dash} is deprecated; use --{dash.replace('-', '_')} (the dash spelling goes in "
               "the next release)"] if dash else []
    assert r.stderr.splitlines() == warning + [f"error: {error}"]
