"""Long jobs on a shared cluster (issue 21), through the real command lines: the run-directory lock,
preemption by SIGTERM / SIGINT, requeues with the same `--resume auto` command, the TRL engine's
resume guarantees, resumes that check their inputs, rows and flags that must end in one line.

Exactness runs use the quick tiny model (its rewards vary, so the LoRA moves); the others the
instant random character-level Llama of tests/llm/test_modeling.py. Loops that wait for a job to
reach a step have a generous hang guard; nothing here asserts a wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.llm.test_failures import _assert_one_line, _env, _run
from tests.llm.test_modeling import build_char_llama

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--train.prompts_per_step", "2", "--rollout.num_generations", "2", "--rollout.max_new_tokens", "4",
         "--train.mini_batch_size", "4", "--train.micro_batch_size", "4", "--eval.every", "0", "--logging.plots",
         "false", "--data.synthetic_n", "8", "--train.num_threads", "1", "--logging.progress", "false"]
TRL = ["--train.engine", "trl", "--model.device", "cpu"]
EXACT_STEPS = 10


@pytest.fixture(scope="module")
def char(tmp_path_factory) -> Path:
    return build_char_llama(tmp_path_factory.mktemp("cluster") / "char", seed=3)


@contextlib.contextmanager
def _job(cmd: list, log: Path, env: dict | None = None):
    """A background job; killed on the way out if a failed assertion left it running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env or _env(), cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(args, log: Path):
    return _job([sys.executable, "-m", "apo_llm.train", *map(str, args)], log)


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_rows(run: Path, n: int, proc: subprocess.Popen, log: Path) -> None:
    """Block until the job has logged n steps (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + 600
    while len(_rows(run)) < n:
        assert proc.poll() is None, f"job ended early (rc {proc.returncode}): {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "job never reached its step"
        time.sleep(0.05)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "memory/")) and k != "tokens_per_second"}
            for r in rows]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _stopped(proc: subprocess.Popen, log: Path, code: int) -> str:
    proc.wait(timeout=600)
    err = log.read_text()
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Native engine: exactness after preemption and requeue
# --------------------------------------------------------------------------------------------


def _tiny_args(model: Path, out: Path, name: str) -> list:
    return ["--model.name_or_path", model, "--logging.output_dir", out, "--logging.run_name", name,
            "--train.prompts_per_step", "2", "--rollout.num_generations", "4", "--rollout.max_new_tokens", "24",
            "--train.mini_batch_size", "8", "--train.micro_batch_size", "8", "--eval.every", "0",
            "--checkpoint.every", "100", "--logging.plots", "false", "--data.synthetic_n", "16",
            "--train.num_threads", "1", "--train.steps", EXACT_STEPS, "--logging.progress", "false",
            "--resume", "auto"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    r = _run("apo_llm.train", *_tiny_args(tiny_model_dir, out, "ref"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting afresh" in r.stderr  # --resume auto without a checkpoint: a fresh start, said so
    rows = _rows(out / "ref")
    assert len({r["grad_norm"] for r in rows}) > 2  # the LoRA moves: equality below means something
    return rows, _adapter(out / "ref")


def test_sigterm_saves_the_last_step_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path,
                                                                            uninterrupted):
    args, run, log = _tiny_args(tiny_model_dir, tmp_path, "pre"), tmp_path / "pre", tmp_path / "pre.log"
    with _start(args, log) as proc:
        _wait_rows(run, 2, proc, log)
        proc.send_signal(signal.SIGTERM)
        last = _stopped(proc, log, 128 + signal.SIGTERM)
    k = len(_rows(run))
    assert 2 <= k < EXACT_STEPS
    ckpt = run / "checkpoints" / f"step-{k:06d}"
    assert last.startswith("preempted by SIGTERM: saved checkpoint") and str(ckpt) in last, last
    assert "resume with: python -m apo_llm.train" in last and last.endswith("--resume auto"), last
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [ckpt.name]
    r = _run("apo_llm.train", *args)  # the same command: it resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step {k}" in r.stderr
    rows, weights = uninterrupted
    assert _comparable(_rows(run)) == _comparable(rows)
    for name, w in _adapter(run).items():
        assert torch.equal(w, weights[name]), name


def test_a_job_killed_before_its_first_checkpoint_requeues_with_the_same_command(tiny_model_dir, tmp_path,
                                                                                 uninterrupted):
    args, run, log = _tiny_args(tiny_model_dir, tmp_path, "early"), tmp_path / "early", tmp_path / "early.log"
    with _start(args, log) as proc:
        _wait_rows(run, 1, proc, log)
        proc.kill()  # SIGKILL: no handler, no checkpoint; the kernel releases the lock
        proc.wait(timeout=60)
    assert not list(run.glob("checkpoints/step-*"))
    r = _run("apo_llm.train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting afresh" in r.stderr and "moved aside" in r.stderr
    assert _comparable(_rows(run)) == _comparable(uninterrupted[0])  # each step once, the same steps
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("early.old-")]) == 1  # nothing deleted


def test_a_second_job_on_the_run_dir_exits_2_and_sigint_stops_the_first(char, tmp_path):
    args = ["--model.name_or_path", char, "--logging.output_dir", tmp_path, "--logging.run_name", "busy",
            "--train.steps", "100000", "--checkpoint.every", "100000", *SMALL, "--resume", "auto"]
    run, log = tmp_path / "busy", tmp_path / "busy.log"
    with _start(args, log) as proc:
        _wait_rows(run, 1, proc, log)
        r = _run("apo_llm.train", *args, "--train.steps", "2")  # (today's code would run it beside the first)
        _assert_one_line(r, "logging.run_name", str(run), "in use by another job", f"pid {proc.pid}")
        assert proc.poll() is None, "the first job must be untouched"
        proc.send_signal(signal.SIGINT)
        last = _stopped(proc, log, 128 + signal.SIGINT)
    k = len(_rows(run))
    assert last.startswith("preempted by SIGINT") and f"step-{k:06d}" in last, last
    assert [x["step"] for x in _rows(run)] == list(range(1, k + 1))  # each step once: no second writer
    assert (run / "checkpoints" / f"step-{k:06d}" / "COMPLETE").is_file()


# --------------------------------------------------------------------------------------------
# TRL engine: preemption, each step logged once, refused settings, fallback past a corrupt checkpoint
# --------------------------------------------------------------------------------------------


def test_trl_engine_preempts_resumes_and_falls_back_like_the_native_one(char, tmp_path):
    steps = 10  # 4 steps per epoch of the 8-problem pool: the resume lands inside epoch 1
    args = ["--model.name_or_path", char, "--logging.output_dir", tmp_path, "--logging.run_name", "trl",
            "--train.steps", steps, "--checkpoint.every", "1", *SMALL, *TRL, "--resume", "auto"]
    run, log = tmp_path / "trl", tmp_path / "trl.log"
    with _start(args, log) as proc:
        _wait_rows(run, 6, proc, log)
        proc.send_signal(signal.SIGTERM)
        last = _stopped(proc, log, 128 + signal.SIGTERM)
    k = len(_rows(run))
    assert 6 <= k < steps
    assert last.startswith("preempted by SIGTERM: saved checkpoint") and f"checkpoint-{k}" in last, last
    for step in (k - 1, k):  # sealed like native checkpoints: manifest, COMPLETE, apo_state.pt
        assert (run / f"checkpoint-{step}" / "COMPLETE").is_file()
    r = _run("apo_llm.train", *args, "--train.lr", "1e-4")
    _assert_one_line(r, "train.lr", "0.0001", "0.001", f"checkpoint-{k}")
    newest = run / f"checkpoint-{k}" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: resume falls back to checkpoint-(k-1)
    r = _run("apo_llm.train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped checkpoint checkpoint-{k}" in r.stderr and "truncated" in r.stderr
    assert [x["step"] for x in _rows(run)] == list(range(1, steps + 1))  # each step once
    assert (run / f"invalid-checkpoint-{k}").is_dir()
    # sample-exact: the same rows as an uninterrupted run (TRL's sampler alone would reshuffle a resumed epoch)
    i = args.index("--logging.run_name")
    whole = [*args[:i + 1], "whole", *args[i + 2:]]
    r = _run("apo_llm.train", *whole)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _trl_comparable(_rows(run)) == _trl_comparable(_rows(tmp_path / "whole"))
    # a requeue of the finished run trains nothing (transformers would take one more step mid-epoch)
    adapter = _adapter(run)
    r = _run("apo_llm.train", *args)
    assert r.returncode == 0 and "the run already finished" in r.stderr, r.stderr[-3000:]
    assert [x["step"] for x in _rows(run)] == list(range(1, steps + 1))
    assert all(torch.equal(v, _adapter(run)[n]) for n, v in adapter.items())


def _trl_comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(w in k for w in ("time", "timing", "per_second", "memory"))}
            for r in rows]


# --------------------------------------------------------------------------------------------
# Resumes check their inputs
# --------------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_refuses_another_data_file_or_base_model(char, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(char, model)
    data = _jsonl(tmp_path / "d.jsonl", [{"question": f"{i} + 1 = ?", "gold": str(i + 1)} for i in range(8)])
    args = ["--model.name_or_path", model, "--logging.output_dir", tmp_path, "--logging.run_name", "inp", *SMALL,
            "--data.source", "jsonl", "--data.path", data, "--data.reward", "gsm8k_strict", "--resume", "auto"]
    r = _run("apo_llm.train", *args, "--train.steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    _jsonl(data, [{"question": f"{i} + 2 = ?", "gold": str(i + 2)} for i in range(8)])  # same row count
    r = _run("apo_llm.train", *args, "--train.steps", "2")
    _assert_one_line(r, "data.path", str(data), "checkpoint.allow_changed_inputs")
    _jsonl(data, [{"question": f"{i} + 1 = ?", "gold": str(i + 1)} for i in range(8)])  # the original again

    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # other weights at the same path, same size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    r = _run("apo_llm.train", *args, "--train.steps", "2")
    _assert_one_line(r, "model.name_or_path", "model.safetensors")
    r = _run("apo_llm.train", *args, "--train.steps", "2", "--checkpoint.allow_changed_inputs", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing (checkpoint.allow_changed_inputs)" in r.stderr
    assert [x["step"] for x in _rows(tmp_path / "inp")] == [1, 2]


# --------------------------------------------------------------------------------------------
# Rows and the context window
# --------------------------------------------------------------------------------------------


def test_unencodable_and_overlong_rows_are_skipped_and_counted(char, tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"question": "1 + 1 = ?", "gold": "2"}),
             '{"question": "bad \\ud800 text", "gold": "3"}',  # a lone surrogate: valid JSON, not UTF-8
             json.dumps({"question": "x" * 400, "gold": "4"})]  # 400 characters: past the 256-token window
    lines += [json.dumps({"question": f"{i} + 1 = ?", "gold": str(i + 1)}) for i in range(4)]
    data.write_text("\n".join(lines) + "\n")
    r = _run("apo_llm.train", "--model.name_or_path", char, "--logging.output_dir", tmp_path, "--logging.run_name",
             "rows", *SMALL, "--data.source", "jsonl", "--data.path", data, "--data.reward", "gsm8k_strict",
             "--train.steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unencodable_text=1 at line 2" in r.stderr, r.stderr[-3000:]
    assert "skipped 1 of 6 prompts longer than 252 tokens" in r.stderr and "line 3" in r.stderr, r.stderr[-3000:]


def test_max_new_tokens_at_the_window_is_refused_before_the_model_loads(char, tmp_path):
    r = _run("apo_llm.train", "--model.name_or_path", char, "--logging.output_dir", tmp_path, "--logging.run_name",
             "win", *SMALL, "--rollout.max_new_tokens", "256")
    _assert_one_line(r, "rollout.max_new_tokens=256", "max_position_embeddings=256")
    assert "Loading weights" not in r.stderr
    assert not (tmp_path / "win").exists()


# --------------------------------------------------------------------------------------------
# One line, exit code 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module,args,names", [
    ("apo_llm.train", ["--rollout.temperature", "1e-40"], ["rollout.temperature", "0.001"]),
    ("apo_llm.evaluate", ["--temperature", "1e-40", "--n", "2", "--k", "1"], ["temperature", "0.001"]),
    ("apo_llm.evaluate", ["--split", "tset", "--n", "2", "--k", "1"], ["split", "tset", "test_hard"]),
    ("apo_llm.topk_coverage", ["--split", "tset"], ["split", "tset"]),
    ("apo_llm.evaluate", ["--dataset", "gsm8k", "--n", "2", "--k", "1"], ["dataset", "openai/gsm8k", "cache"]),
    ("apo_toy.run", ["--preset", "rsc", "--quick", "--seeds", "0"], ["--seeds", ">= 1"]),
])
def test_bad_flags_are_one_line(tmp_path, module, args, names):
    out = tmp_path / "out"
    argv = args + (["--out", out] if module != "apo_llm.train" else
                   ["--logging.output_dir", out, "--logging.run_name", "x"])
    env_cache = {"HF_DATASETS_CACHE": str(tmp_path / "empty-cache")}  # gsm8k: offline and not cached
    r = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                       env={**_env(), **env_cache}, cwd=REPO, timeout=600)
    _assert_one_line(r, *names)
    assert not out.exists()  # refused before anything was written (the run name is not taken)


@pytest.mark.parametrize("module,args", [
    ("apo_llm.evaluate", ["--n", "2", "--k", "1"]),
    ("apo_llm.topk_coverage", []),
    ("apo_toy.run", ["--preset", "rsc", "--quick"]),
])
def test_out_an_existing_file_is_refused_before_any_compute(tmp_path, module, args):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    r = _run(module, *args, "--out", target)
    _assert_one_line(r, "out", str(target), "existing file")
    assert target.read_text() == "keep me\n"
    assert "pass@" not in r.stdout and "coverage" not in r.stdout.lower()  # nothing was computed


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.parametrize("how", ["tmpfs", "file_size_limit", "trl_tmpfs"])
def test_a_failed_checkpoint_write_is_one_line_naming_the_file(char, tmp_path, how):
    """Disk full (a 300 kB tmpfs: needs root to mount; also inside transformers' checkpoint saving,
    TRL engine) or a write past RLIMIT_FSIZE (anyone): the file or folder being written and the
    OS's reason, exit 2, no traceback."""
    out = tmp_path / "out"
    out.mkdir()
    tmpfs = how.endswith("tmpfs")
    if tmpfs:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(out)],
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root); the file_size_limit case covers the code path")
    try:
        r = subprocess.run([sys.executable, "-m", "apo_llm.train", "--model.name_or_path", str(char),
                            "--logging.output_dir", str(out), "--logging.run_name", "full", *SMALL,
                            "--train.steps", "2", "--checkpoint.every", "1", *(TRL if how.startswith("trl") else [])],
                           capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600,
                           preexec_fn=None if tmpfs else _limit_file_size)
        reason = os.strerror(28) if tmpfs else os.strerror(27)  # ENOSPC / EFBIG
        _assert_one_line(r, "checkpoint: cannot write", str(out / "full"), reason)
    finally:
        if tmpfs:
            subprocess.run(["umount", str(out)], capture_output=True)


# --------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo): rank 0 holds the lock, every rank hears its answer and stops
# --------------------------------------------------------------------------------------------


def _torchrun_cmd(args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "apo_llm.train", *map(str, args)]


def _mp_env() -> dict:
    env = _env()
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def test_torchrun_a_locked_run_dir_stops_every_rank_and_sigterm_stops_them_together(char, tmp_path):
    from apo_llm.runlock import RunLock

    steps = 6
    args = ["--model.name_or_path", char, "--logging.output_dir", tmp_path, "--logging.run_name", "mp",
            "--train.steps", steps, "--checkpoint.every", "1", *SMALL, "--train.micro_batch_size", "2", *TRL,
            "--resume", "auto"]
    run = tmp_path / "mp"
    with RunLock(run):  # another job holds the run directory
        r = subprocess.run(_torchrun_cmd(args), capture_output=True, text=True, env=_mp_env(), cwd=REPO,
                           timeout=600)
    assert r.returncode != 0 and "exitcode: 2" in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 2 and all("in use by another job" in x for x in lines), r.stderr[-3000:]
    assert not run.exists()

    log = tmp_path / "mp.log"
    with _job(_torchrun_cmd(args), log, _mp_env()) as proc:
        _wait_rows(run, 2, proc, log)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        proc.wait(timeout=600)
    err = log.read_text()
    k = len(_rows(run))
    assert [x["step"] for x in _rows(run)] == list(range(1, k + 1))
    said = [x for x in err.splitlines() if x.startswith("preempted by SIGTERM")]
    assert len(said) == 1 and f"checkpoint-{k}" in said[0], err[-3000:]  # rank 0 alone says it
    assert (run / f"checkpoint-{k}" / "COMPLETE").is_file()
    r = subprocess.run(_torchrun_cmd(args), capture_output=True, text=True, env=_mp_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in _rows(run)] == list(range(1, steps + 1))
