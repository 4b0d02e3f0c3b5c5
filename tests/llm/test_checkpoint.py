"""Atomic checkpoints: round trip of adapter/optimizer/scheduler/RNG, pruning, SIGKILL mid-write."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from apo_llm.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
)
from apo_llm.modeling import load_model_and_tokenizer, wrap_lora
from tests.llm.test_modeling import build_char_llama

torch.set_num_threads(1)  # see tests/llm/test_modeling.py

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    return build_char_llama(tmp_path_factory.mktemp("char_llama_ckpt"), seed=5)


def _setup(char_dir):
    from transformers import get_scheduler

    base, _ = load_model_and_tokenizer(str(char_dir))
    model = wrap_lora(base, r=4, alpha=8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    return model, opt, sched, params


def _train_a_bit(model, opt, sched, params, n=3):
    for _ in range(n):
        ids = torch.randint(4, 40, (2, 6))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_roundtrip_restores_everything(char_dir, tmp_path):
    model, opt, sched, params = _setup(char_dir)
    _train_a_bit(model, opt, sched, params)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {"data_position": 17, "metrics_lines": 4})
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    weights = [p.detach().clone() for p in params]
    lr = sched.get_last_lr()

    model2, opt2, sched2, params2 = _setup(char_dir)  # fresh LoRA init, fresh optimizer
    assert any(not torch.equal(a, b) for a, b in zip(weights, params2))
    random.seed(99)
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 3 and state["data_position"] == 17 and state["metrics_lines"] == 4
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    for a, b in zip(weights, params2):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == lr
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # the adapter directory is plain peft format
    from peft import PeftModel

    base, _ = load_model_and_tokenizer(str(char_dir))
    loaded = PeftModel.from_pretrained(base, str(path / "adapter"))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(lora[n], p) for n, p in model.named_parameters() if n in lora)


def test_prune_and_latest_and_resume_resolution(char_dir, tmp_path):
    model, opt, sched, _ = _setup(char_dir)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path).name == "step-000004"
    assert resolve_resume("auto", tmp_path).name == "step-000004"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nowhere") is None
    with pytest.raises(ValueError, match="checkpoint.resume"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    # re-saving an existing step replaces it atomically
    save_checkpoint(tmp_path, 4, model, opt, sched, {"x": 1}, keep_last=2)
    assert load_checkpoint(latest_checkpoint(tmp_path), model, restore_rng=False)["x"] == 1
    # an incomplete directory is neither listed nor loadable
    bad = tmp_path / "checkpoints" / "step-000009"
    bad.mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000004"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(bad, model)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.llm.test_checkpoint import _setup, _train_a_bit
    from apo_llm import checkpoint as ck
    run, char_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model, opt, sched, params = _setup(char_dir)
    _train_a_bit(model, opt, sched, params)
    ck.save_checkpoint(run, 1, model, opt, sched, {{"data_position": 8}})
    torch.save([p.detach() for p in params], os.path.join(run, "expected.pt"))
    _train_a_bit(model, opt, sched, params)
    real_save = torch.save
    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if str(getattr(f, "name", f)).endswith({victim!r}):  # written (f: a path or an open file), not finished
            os.kill(os.getpid(), signal.SIGKILL)
    ck.torch.save = dying_save
    ck.save_checkpoint(run, 2, model, opt, sched, {{"data_position": 16}})
    print("NOT KILLED")
""")


@pytest.mark.parametrize("victim", ["trainer_state.pt"])  # everything written but COMPLETE + rename
def test_sigkill_during_save_leaves_previous_checkpoint(char_dir, tmp_path, victim):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), victim=victim))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(char_dir)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "NOT KILLED" not in proc.stdout
    leftovers = list((tmp_path / "checkpoints").glob(".tmp-step-000002-*"))
    assert leftovers, "the kill should have happened inside the temporary directory"
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-000001"
    model, opt, sched, params = _setup(char_dir)
    state = load_checkpoint(latest, model, opt, sched)
    assert state["data_position"] == 8
    for a, b in zip(torch.load(tmp_path / "expected.pt"), params):
        assert torch.equal(a, b)
    # the next save cleans the leftovers
    save_checkpoint(tmp_path, 2, model, opt, sched, {})
    assert not list((tmp_path / "checkpoints").glob(".tmp-step-*"))
    assert latest_checkpoint(tmp_path).name == "step-000002"


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte flipped: only the hash can tell
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


@pytest.mark.parametrize("victim,how", [("adapter/adapter_model.safetensors", "truncate"),
                                        ("optimizer.pt", "truncate"), ("optimizer.pt", "flip")])
def test_resume_auto_falls_back_past_a_corrupt_checkpoint(char_dir, tmp_path, caplog, victim, how):
    """Issue 12 item 2: the newest intact checkpoint is chosen, the skipped one named with the reason."""
    model, opt, sched, params = _setup(char_dir)
    _train_a_bit(model, opt, sched, params)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"data_position": 4}, keep_last=3)
    good = [p.detach().clone() for p in params]
    _train_a_bit(model, opt, sched, params)
    save_checkpoint(tmp_path, 2, model, opt, sched, {"data_position": 8}, keep_last=3)
    bad_file = tmp_path / "checkpoints" / "step-000002" / victim
    _corrupt(bad_file, how)
    with caplog.at_level("WARNING", logger="apo_llm.checkpoint"):
        chosen = resolve_resume("auto", tmp_path)
    assert chosen.name == "step-000001"
    assert "step-000002" in caplog.text and victim.split("/")[-1] in caplog.text
    assert ("truncated" if how == "truncate" else "sha256") in caplog.text
    # the bad one is kept for inspection under a name that is never picked again
    assert (tmp_path / "checkpoints" / "invalid-step-000002").is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    model2, opt2, sched2, params2 = _setup(char_dir)
    assert load_checkpoint(chosen, model2, opt2, sched2)["data_position"] == 4
    assert all(torch.equal(a, b) for a, b in zip(good, params2))


def test_explicit_or_all_corrupt_checkpoints_are_one_line_errors(char_dir, tmp_path):
    from apo_llm.checkpoint import CheckpointError

    model, opt, sched, _ = _setup(char_dir)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    _corrupt(path / "trainer_state.pt", "truncate")
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(path), tmp_path)
    assert "trainer_state.pt" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no intact checkpoint.*trainer_state.pt"):
        resolve_resume("auto", tmp_path)
    # reading a damaged file directly names it too (no bare PytorchStreamReader / SafetensorError)
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        load_checkpoint(path, model)
    _corrupt(path / "adapter" / "adapter_model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_checkpoint(path, model)


def test_saving_prunes_relative_to_the_saved_step(char_dir, tmp_path):
    """After resuming from step 2, saving step 3 must not be pruned by a stale step 5 (issue 12 item 1)."""
    model, opt, sched, _ = _setup(char_dir)
    for step in (2, 5):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    save_checkpoint(tmp_path, 3, model, opt, sched, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
