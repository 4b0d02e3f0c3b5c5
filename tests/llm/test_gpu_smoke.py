"""benchmarks/gpu_smoke.py on a machine without a GPU: the CLI's refusal, the JSON summary, the
padded tokenizer, and the per-step timing plumbing of both engines on the tiny model (CPU, float32).

The GPU run itself (Qwen2.5-0.5B shape, bf16, vLLM) cannot run here; these tests check every part
of it that does not need CUDA."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import gpu_smoke as G

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--engines", "native", "--steps", "1"]])
def test_cli_refuses_on_cpu_with_one_line_and_exit_2(tmp_path, extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), *extra], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert list(tmp_path.iterdir()) == []  # refused before building (the model dir goes to a temp dir)


steps_st = st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 1), st.integers(0, 10**6)), min_size=1, max_size=6)


@given(steps_st, st.floats(0, 1e6), st.floats(0, 1e6))
def test_summary_rates_over_the_steps_after_the_first(raw, peak, used):
    steps = [{"step_s": s, "generate_s": s * f, "tokens": n} for s, f, n in raw]
    out = G.summarize("native", steps, peak, used)
    json.loads(json.dumps(out))  # one JSON-serialisable record
    rest = raw[1:] or raw
    total = math.fsum(s for s, _, _ in rest)
    assert out["steps"] == len(raw) and out["first_step_s"] == pytest.approx(raw[0][0], abs=1e-4)
    assert out["s_per_step"] == pytest.approx(total / len(rest), abs=1e-4)
    assert out["generate_share"] == pytest.approx(math.fsum(s * f for s, f, _ in rest) / total, abs=1e-4)
    assert 0 <= out["generate_share"] <= 1
    assert out["tokens_per_s"] == pytest.approx(sum(n for _, _, n in rest) / total, rel=1e-6, abs=0.05)
    assert out["peak_gpu_mb"] == pytest.approx(peak, abs=0.05)


def test_summary_refuses_empty_or_inconsistent_timings():
    with pytest.raises(ValueError, match="trl_hf: no step timings"):
        G.summarize("trl_hf", [], 0.0, 0.0)
    with pytest.raises(ValueError, match="step 2 has step_s=1.0 generate_s=2.0"):
        G.summarize("native", [{"step_s": 1.0, "generate_s": 0.5, "tokens": 3},
                               {"step_s": 1.0, "generate_s": 2.0, "tokens": 3}], 0.0, 0.0)


@pytest.mark.slow
def test_padded_tokenizer_has_qwen_size_and_decodes_every_id():
    from apo_llm.tiny import train_tokenizer

    trained = train_tokenizer()
    tok = G.padded_tokenizer(G.QWEN25_05B["vocab_size"])
    assert len(tok) == 151936
    text = "Ann has 12 apples and buys 30 more. How many?"
    assert tok(text).input_ids == trained(text).input_ids  # the trained ids are unchanged
    assert max(tok(text).input_ids) < len(trained)
    assert tok.decode([151935, len(trained)]) == f"fill151935fill{len(trained)}"
    assert tok.eos_token_id == trained.eos_token_id and tok.pad_token_id == trained.pad_token_id
    with pytest.raises(ValueError, match="vocab_size"):
        G.padded_tokenizer(10)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "trl_hf"])
def test_engine_timings_on_the_tiny_model(random_tiny_model_dir, tmp_path, engine):
    """The real run_native / run_trl (trainer setup + rl_step, TRL build_trainer + train) on CPU."""
    from apo_llm.config import load_config

    a = argparse.Namespace(prompts=2, G=2, max_new_tokens=8, micro=2, loss="apo", steps=2)
    cfg = load_config(G.config_args(a, engine, str(random_tiny_model_dir), str(tmp_path), "cpu", "float32"))
    steps = (G.run_native if engine == "native" else G.run_trl)(cfg)
    assert len(steps) == 2
    for s in steps:
        assert 0 < s["generate_s"] < s["step_s"]
        assert 0 < s["tokens"] <= 2 * 2 * 8  # completion tokens of 4 rows of at most 8
    rec = G.summarize(engine, steps, 1.0, 1.0)
    assert rec["tokens_per_s"] > 0 and 0 < rec["generate_share"] < 1


@pytest.mark.slow
def test_a_failed_engine_is_one_json_line_and_counted(tmp_path, capsys, monkeypatch):
    """The parent's handling of a worker that exits non-zero (here: the worker's own CPU refusal)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the worker refuses also where a GPU is present
    a = argparse.Namespace(engines="native", timeout=120)
    assert G.run_engines(a, ["--engines", "native"], tmp_path / "no_model") == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    rec = json.loads(out[0])
    assert rec["engine"] == "native" and rec["failed"].startswith("exit 2: gpu_smoke: no CUDA device")
