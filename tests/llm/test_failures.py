"""Bad input through the real command lines (issue 12): every probe exits with code 2 and one line
on stderr naming the culprit (a file or a config field), without a traceback, and leaves an
earlier finished run in the same output directory byte for byte as it was.

The previous run and the probes use the instant random character-level Llama of
tests/llm/test_modeling.py: the probes must fail before a model matters (validation runs before
loading), and the one fresh training run they share takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.llm.test_modeling import build_char_llama

REPO = Path(__file__).resolve().parents[2]


# Loaded first by every subprocess of a `no_network` probe (as sitecustomize): any attempt to resolve a
# host or open a connection is appended to the file in $APO_NET_LOG and refused, so a probe that would
# ask the hub leaves a record instead of waiting on retries.
_NO_NETWORK = """
import os, socket
def _refuse(*args, **kwargs):
    with open(os.environ["APO_NET_LOG"], "a") as fh:
        fh.write(repr(args[:2]) + "\\n")
    raise OSError("network access refused by the test")
socket.getaddrinfo = _refuse
socket.create_connection = _refuse
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def _env(offline: bool = True, net_log: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if not offline:  # as a user without HF_HUB_OFFLINE: a hub call here would retry for ~50 s
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.pop(k, None)
    if net_log is not None:  # sitecustomize from a directory ahead of the repo on the path
        site = net_log.parent / "no_network_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_NO_NETWORK)
        env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}", APO_NET_LOG=str(net_log))
    return env


def _run(module: str, *args: str, offline: bool = True, cwd: Path | None = None,
         net_log: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=_env(offline, net_log), cwd=cwd or REPO, timeout=300)


def _network_attempts(net_log: Path) -> list[str]:
    return net_log.read_text().splitlines() if net_log.exists() else []


def test_the_network_guard_records_an_attempt(tmp_path):
    """The control for the no-hub-retries probes below: the guard does see a connection attempt."""
    log = tmp_path / "net.log"
    r = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('huggingface.co', 443))"],
                       capture_output=True, text=True, env=_env(False, log), timeout=60)
    assert r.returncode != 0 and "network access refused" in r.stderr
    attempts = _network_attempts(log)
    assert len(attempts) == 1 and "huggingface.co" in attempts[0]


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prev(tmp_path_factory):
    """A finished 2-step run `prev` under OUT, with two checkpoints; returns (model dir, OUT, base argv)."""
    root = tmp_path_factory.mktemp("failures")
    model = build_char_llama(root / "char", seed=3)
    out = root / "out"
    base = ["--model.name_or_path", str(model), "--logging.output_dir", str(out), "--train.prompts_per_step", "2",
            "--rollout.num_generations", "2", "--rollout.max_new_tokens", "4", "--train.mini_batch_size", "4",
            "--train.micro_batch_size", "4", "--eval.every", "0", "--checkpoint.every", "1",
            "--logging.plots", "false", "--data.synthetic_n", "8", "--train.steps", "2"]
    r = _run("apo_llm.train", *base, "--logging.run_name", "prev")
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "prev"
    assert (run / "adapter").is_dir() and len(list((run / "checkpoints").glob("step-*"))) == 2
    return model, out, base, _snapshot(run)


def _assert_one_line(r: subprocess.CompletedProcess, *names: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), last
    for name in names:
        assert name in last, (name, last)
    return last


def _untouched(prev) -> None:
    _, out, _, snap = prev
    assert _snapshot(out / "prev") == snap


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reusing_a_run_name_without_resume_is_refused(prev):
    _, out, base, _ = prev
    r = _run("apo_llm.train", *base, "--logging.run_name", "prev", "--train.steps", "1")
    _assert_one_line(r, "logging.run_name", str(out / "prev"), "--resume auto", "--logging.overwrite")
    _untouched(prev)


def test_resume_with_a_changed_setting_is_refused(prev):
    _, out, base, _ = prev
    r = _run("apo_llm.train", *base, "--logging.run_name", "prev", "--resume", "auto", "--train.lr", "1e-4")
    _assert_one_line(r, "train.lr", "0.0001", "0.001")
    _untouched(prev)


def test_resume_with_every_checkpoint_corrupt_names_the_files(prev, tmp_path):
    _, out, base, _ = prev
    copy_out = tmp_path / "out"
    shutil.copytree(out / "prev", copy_out / "prev")
    for ck in (copy_out / "prev" / "checkpoints").glob("step-*"):
        f = ck / "adapter" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])  # truncated
    args = [a if a != str(out) else str(copy_out) for a in base]
    r = _run("apo_llm.train", *args, "--logging.run_name", "prev", "--resume", "auto")
    _assert_one_line(r, "checkpoint.resume", "adapter_model.safetensors", "truncated")
    _untouched(prev)


@pytest.mark.parametrize("setting,value,name", [
    ("train.max_grad_norm", "nan", "train.max_grad_norm"),
    ("loss.kl_estimator", "full", "loss.kl_estimator"),  # offered by --help before; the trainer refuses it
    ("data.source", "jsonl", "data.reward"),  # with a path: the reward is never guessed from the rows
])
def test_config_values_are_refused(prev, tmp_path, setting, value, name):
    _, out, base, _ = prev
    extra = ["--loss.kl_coef", "0.1"] if setting == "loss.kl_estimator" else []
    extra += ["--data.path", str(_write(tmp_path / "d.jsonl", '{"question": "q", "gold": "1"}\n'))] \
        if value == "jsonl" else []
    r = _run("apo_llm.train", *base, "--logging.run_name", "prev", f"--{setting}", value, *extra)
    _assert_one_line(r, name)
    _untouched(prev)


def test_config_file_errors_name_the_file(prev, tmp_path):
    _, out, base, _ = prev
    bad = _write(tmp_path / "bad.yaml", "train:\n  lr: 1e-3\n  steps: [1, 2\nmodel: {}\n")
    r = _run("apo_llm.train", "--config", bad, *base, "--logging.run_name", "prev")
    last = _assert_one_line(r, str(bad), "YAML syntax error", "line")
    assert "<unicode string>" not in last
    r = _run("apo_llm.train", "--config", tmp_path / "missing.yaml")
    _assert_one_line(r, str(tmp_path / "missing.yaml"))
    _untouched(prev)


def test_missing_local_model_fails_at_once_without_hub_retries(prev, tmp_path):
    _, out, base, _ = prev
    args = [a for a in base]
    args[args.index("--model.name_or_path") + 1] = "./models/no-such-model"
    log = tmp_path / "net.log"
    r = _run("apo_llm.train", *args, "--logging.run_name", "fresh", offline=False, cwd=tmp_path, net_log=log)
    _assert_one_line(r, "model.name_or_path", "./models/no-such-model")
    assert _network_attempts(log) == []  # refused before any hub call, so there is nothing to retry
    assert not (out / "fresh").exists()
    _untouched(prev)


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_unusable_output_dir(prev, tmp_path, kind):
    _, out, base, _ = prev
    if kind == "file":
        target = _write(tmp_path / "iamafile", "x")
        where = target
    else:  # /proc refuses new directories even to root (a chmod'ed directory would not stop root)
        target = Path("/proc/apo-rlvr-probe")
        where = Path("/proc")
    args = [a if a != str(out) else str(target) for a in base]
    r = _run("apo_llm.train", *args, "--logging.run_name", "x")
    _assert_one_line(r, "logging.output_dir", str(where))
    _untouched(prev)


@pytest.mark.parametrize("content,why", [
    ("", "no valid problems"),
    ('{not json\n["a list"]\n{"question": "q"}\n', "no valid problems"),
    (None, "no such file"),
])
def test_bad_data_file_fails_before_the_model_loads(prev, tmp_path, content, why):
    model, out, base, _ = prev
    f = tmp_path / "data.jsonl"
    if content is not None:
        f.write_text(content)
    r = _run("apo_llm.train", *base, "--logging.run_name", "fresh", "--data.source", "jsonl", "--data.path", f,
             "--data.reward", "gsm8k_strict")
    last = _assert_one_line(r, "data.path", why)
    if content:
        assert "line" in last  # skipped rows are reported with their line numbers
    assert "Loading weights" not in r.stderr  # validated before the model loads
    assert not (out / "fresh").exists()  # and no empty run directory is left behind
    _untouched(prev)


def test_missing_start_adapter_is_named(prev, tmp_path):
    _, out, base, _ = prev
    r = _run("apo_llm.train", *base, "--logging.run_name", "fresh", "--lora.adapter_path", tmp_path / "no-adapter")
    _assert_one_line(r, "lora.adapter_path", str(tmp_path / "no-adapter"))
    assert not (out / "fresh").exists()
    _untouched(prev)


def test_evaluate_missing_local_adapter_fails_at_once(prev, tmp_path):
    (tmp_path / "runs").mkdir()  # 'runs/no-such-run' has the shape of a hub id 'org/name'; ./runs says local
    log = tmp_path / "net.log"
    r = _run("apo_llm.evaluate", "--adapters", "runs/no-such-run", "--out", tmp_path / "ev", "--n", "2",
             "--k", "1", offline=False, cwd=tmp_path, net_log=log)
    _assert_one_line(r, "adapters", "runs/no-such-run")
    assert _network_attempts(log) == []
    assert not (tmp_path / "ev" / "run_config.json").exists()


def test_overwrite_moves_the_old_run_aside(prev, tmp_path):
    """The explicit way to reuse a name: the old run is moved, intact, never mixed with the new one."""
    _, out, base, snap = prev
    copy_out = tmp_path / "out"
    shutil.copytree(out / "prev", copy_out / "prev")
    args = [a if a != str(out) else str(copy_out) for a in base]
    r = _run("apo_llm.train", *args, "--logging.run_name", "prev", "--train.steps", "1", "--logging.overwrite",
             "true")
    assert r.returncode == 0, r.stderr[-2000:]
    aside = [p for p in copy_out.iterdir() if p.name.startswith("prev.old-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == snap
    new = copy_out / "prev"
    assert [p.name for p in (new / "checkpoints").glob("step-*")] == ["step-000001"]
    assert len((new / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((new / "summary.json").read_text())["steps"] == 1
