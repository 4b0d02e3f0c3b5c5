"""The offline tiny model: loadable by the Auto classes, tokenizer round trip, pass@1 strictly inside (0, 1),
deterministic SFT, cached/atomic/locked builds."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import torch

from apo_llm import tiny
from apo_llm.data import synthetic_problems
from apo_llm.rewards import gsm8k_strict


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_quick_model_loads_and_is_a_llama(tiny_model_dir):
    tok, model = _load(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert tok.eos_token == tiny.EOS and tok.pad_token == tiny.PAD and tok.eos_token_id != tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    assert model.get_output_embeddings() is not None and model.model is not None  # backbone + head for chunking
    info = json.loads((tiny_model_dir / "build_info.json").read_text())
    assert info["version"] == tiny.VERSION and info["params"] == model.num_parameters()
    assert tiny.VERSION in tiny_model_dir.name


def test_quick_model_pass_at_1_is_strictly_inside(tiny_model_dir):
    """Recorded pass@1 lies in (0.05, 0.95), and a fresh independent sample agrees: RL has room both ways."""
    info = json.loads((tiny_model_dir / "build_info.json").read_text())
    assert 0.05 < info["pass_at_1"] < 0.95, info
    tok, model = _load(tiny_model_dir)
    tok.padding_side = "left"
    problems = synthetic_problems(24, seed=123, split="test")
    enc = tok([p.prompt for p in problems for _ in range(2)], return_tensors="pt", padding=True,
              add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=80,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    rewards = [gsm8k_strict(t, p.gold) for t, p in zip(texts, [p for p in problems for _ in range(2)])]
    assert 0 < sum(rewards) < len(rewards), (sum(rewards), texts[:4])


def test_tokenizer_round_trip_and_determinism(random_tiny_model_dir):
    """Reloaded tokenizer == freshly trained one (same ids); text survives encode/decode; digits are single tokens."""
    tok, _ = _load(random_tiny_model_dir)
    fresh = tiny.train_tokenizer(tiny.QUICK.vocab_size, tiny.QUICK.seed)
    assert tok.get_vocab() == fresh.get_vocab()
    for p in synthetic_problems(30, 9, "test"):
        for text in (p.prompt, tiny.COMPLETION_PREFIX + p.solution):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == fresh(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
    assert all(len(tok(str(d), add_special_tokens=False)["input_ids"]) == 1 for d in range(10))
    assert len(tok("1234", add_special_tokens=False)["input_ids"]) == 4


def test_random_model_is_untrained_same_shape(random_tiny_model_dir, tiny_model_dir):
    _, rand = _load(random_tiny_model_dir)
    _, trained = _load(tiny_model_dir)
    assert json.loads((random_tiny_model_dir / "build_info.json").read_text())["trained"] is False
    assert rand.config.hidden_size == trained.config.hidden_size
    assert not torch.equal(rand.get_input_embeddings().weight, trained.get_input_embeddings().weight)


def test_sft_is_deterministic_and_lowers_the_loss():
    """Two short SFT runs from the same seed give bit-identical weights (CPU, one thread)."""
    spec = replace(tiny.QUICK, max_steps=4, min_steps=10**6, n_train=64, batch_size=8, warmup=2)
    tok = tiny.train_tokenizer(spec.vocab_size, spec.seed)
    states = []
    for _ in range(2):
        model = tiny.build_model(spec, tok)
        with tiny._one_thread():
            info = tiny.sft_warm_start(model, tok, spec, log=lambda *a: None)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        assert info["sft_steps"] == 4
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    untouched = tiny.build_model(spec, tok).state_dict()
    assert any(not torch.equal(untouched[k], states[0][k]) for k in untouched)


def test_sft_reports_progress_against_its_budget():
    """Issue 12 item 8: the build states its step budget and reports before the first pass@1 check."""
    spec = replace(tiny.QUICK, max_steps=6, min_steps=10**6, eval_every=2, n_train=64, batch_size=4, warmup=2,
                   hidden=32, intermediate=64)
    tok = tiny.train_tokenizer(spec.vocab_size, spec.seed)
    lines: list[str] = []
    with tiny._one_thread():
        tiny.sft_warm_start(tiny.build_model(spec, tok), tok, spec, log=lines.append)
    assert "at most 6 steps" in lines[0]
    assert [line.split()[2] for line in lines[1:]] == ["2/6", "4/6", "6/6"]


def test_lr_schedule_shape():
    spec = replace(tiny.QUICK, warmup=10, max_steps=110)
    f = [tiny._lr_factor(s, spec) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_cached_build_is_reused(tiny_model_dir):
    """A second call finds the cached build: no rebuild (the weights file is untouched)."""
    weights = next(tiny_model_dir.glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    assert tiny.ensure_tiny_model(tiny_model_dir.parent, quick=True) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before


def test_atomic_build_under_lock(tmp_path):
    """Concurrent callers build once; a failed build leaves neither the final nor a temp dir."""
    calls = []

    def make(out):
        calls.append(1)
        (out / "build_info.json").write_text("{}")

    final = tmp_path / "m-v0"
    threads = [threading.Thread(target=tiny._build_atomically, args=(final, make, False)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (final / "build_info.json").is_file()

    def broken(out):
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    bad = tmp_path / "bad-v0"
    with pytest.raises(RuntimeError, match="boom"):
        tiny._build_atomically(bad, broken, False)
    assert not bad.exists() and not list(tmp_path.glob("bad-v0.tmp-*"))
