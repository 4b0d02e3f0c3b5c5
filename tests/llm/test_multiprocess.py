"""Several processes (torchrun, gloo on CPU): the TRL engine syncs gradients; the native engine refuses.

`torchrun --standalone --nproc_per_node 2 -m apo_llm.train --train.engine trl` runs 3 steps on the
quick tiny model; tests/llm/mp_driver.py saves each rank's LoRA weights after every step and each
rank's rollouts. A single process then trains on the union of those rollouts (same config, same
seed, plain SGD); its LoRA weights must equal the ranks' after every step (1e-5), which holds only
when the gradient is averaged across ranks with the right token normaliser. The same under FSDP2:
accelerate cannot run FSDP on CPU (it silently turns it into DDP, or runs each process alone), so
the driver shards the model itself (trl_engine.shard_fsdp2, `fully_shard` per decoder layer) and
the test asserts that the model really is an FSDP2 module of DTensor shards on 2 processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _env(**extra) -> dict:
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _torchrun(args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _train_args(model_dir, out, name) -> list[str]:
    return ["--train.engine", "trl", "--model.name_or_path", str(model_dir), "--model.device", "cpu",
            "--train.steps", str(STEPS), "--train.prompts_per_step", "4", "--rollout.num_generations", "4",
            "--train.mini_batch_size", "16", "--train.micro_batch_size", "4", "--rollout.max_new_tokens", "24",
            "--train.lr", "0.1", "--train.warmup_steps", "0", "--data.synthetic_n", "16", "--eval.every", "0",
            "--checkpoint.every", "0", "--logging.output_dir", str(out), "--logging.run_name", name,
            "--logging.plots", "false", "--logging.progress", "false", "--loss.name", "apo"]


def test_native_engine_refuses_several_processes(tmp_path):
    r = _torchrun(["-m", "apo_llm.train", "--train.steps", "1", "--logging.output_dir", str(tmp_path)], _env(),
                  timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "config error:" in x]
    assert len(lines) == 2, r.stderr[-2000:]  # one line per rank, before any model is loaded
    assert "train.engine=native" in lines[0] and "--train.engine trl" in lines[0]
    assert "exitcode: 2" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _wrap_reports(dump) -> list[dict]:
    return [json.loads((dump / f"wrap_r{r}.json").read_text()) for r in (0, 1)]


WRAPPER = {"ddp": "DistributedDataParallel", "fsdp2": "PeftModelForCausalLM", "zero2": "DeepSpeedEngine",
           "zero3": "DeepSpeedEngine"}
SHARDING = ["ddp", "fsdp2", pytest.param("zero2", marks=pytest.mark.requires("deepspeed")),
            pytest.param("zero3", marks=pytest.mark.requires("deepspeed"))]


def _sharding_env(sharding: str) -> dict:
    if sharding.startswith("zero"):  # DeepSpeed's CPU accelerator; its shm op is JIT-built with ninja
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {"MP_ZERO": sharding[-1], "DS_ACCELERATOR": "cpu", "PATH": path}
    return {"MP_FSDP2": "1" if sharding == "fsdp2" else "0"}


@pytest.mark.slow
@pytest.mark.parametrize("sharding", SHARDING)
def test_trl_engine_two_processes_equal_one_process_on_the_union(tiny_model_dir, tmp_path, sharding):
    dump = tmp_path / "dump"
    dump.mkdir()
    env = _env(MP_MODE="dump", MP_DIR=str(dump))
    env.update(_sharding_env(sharding))
    r = _torchrun(["tests/llm/mp_driver.py", *_train_args(tiny_model_dir, tmp_path, "mp")], env, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    for rep in _wrap_reports(dump):  # what held the model on each rank: not a silent fallback
        assert rep["world_size"] == 2 and rep["wrapper"] == WRAPPER[sharding], rep
        if sharding == "fsdp2":
            assert rep["fsdp_module"] and not rep["ddp"], rep
            assert rep["n_dtensor"] == rep["n_params"] and rep["local_numel"] < rep["full_numel"], rep  # sharded
        elif sharding == "zero3":  # parameters partitioned away from the module (numel 0 outside a gather)
            assert rep["full_numel"] == 0 and not rep["ddp"], rep
        else:
            assert rep["ddp"] == (sharding == "ddp") and rep["n_dtensor"] == 0, rep
    rows = [json.loads(x) for x in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # one row per step: rank 0 alone writes
    assert all(row["grad_norm"] > 0 for row in rows if row["frac_reward_zero_std"] < 1)
    assert (tmp_path / "mp" / "adapter" / "adapter_config.json").is_file()

    r1 = subprocess.run([sys.executable, "tests/llm/mp_driver.py", *_train_args(tiny_model_dir, tmp_path, "one")],
                        env=_env(MP_MODE="replay", MP_DIR=str(dump)), cwd=ROOT, capture_output=True, text=True,
                        timeout=240)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # Adam is nearly blind to a constant gradient scale: the pre-clip gradient norms check the scale
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, rows1):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7), (a["step"], a, b)
    moved = 0.0
    for step in range(STEPS + 1):
        w0 = torch.load(dump / f"dump_w_r0_s{step}.pt")
        w1 = torch.load(dump / f"dump_w_r1_s{step}.pt")
        one = torch.load(dump / f"replay_w_r0_s{step}.pt")
        for name in w0:
            assert torch.equal(w0[name], w1[name]), f"step {step}: ranks differ at {name}"
            torch.testing.assert_close(one[name], w0[name], rtol=0, atol=1e-5, msg=f"step {step}: {name}")
        if step:
            before = torch.load(dump / f"dump_w_r0_s{step - 1}.pt")
            moved = max(moved, max(float((w0[n] - before[n]).abs().max()) for n in w0))
    assert moved > 1e-4  # the weights did change, so equality is not trivial
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "mp" / "adapter" / "adapter_model.safetensors"))  # gathered, full shapes
    last = torch.load(dump / f"dump_w_r0_s{STEPS}.pt")
    assert len(saved) == len(last) and {v.shape for v in saved.values()} == {v.shape for v in last.values()}
    assert sorted(float(v.double().sum()) for v in saved.values()) == pytest.approx(
        sorted(float(v.double().sum()) for v in last.values()), rel=1e-6, abs=1e-9)  # the final weights
