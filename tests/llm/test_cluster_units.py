"""The shared-cluster mechanisms without a model (fast lane): the run lock, the resume command,
input fingerprints. tests/llm/test_cluster.py runs them through the command lines."""

from __future__ import annotations

import os
import socket

import pytest

from apo_llm import checkpoint as ck
from apo_llm.preemption import resume_command
from apo_llm.runlock import RunLock, RunLockedError, lock_path


def test_a_second_lock_on_a_run_dir_names_the_holder_and_release_frees_it(tmp_path):
    run = tmp_path / "runs" / "x"
    first = RunLock(run).acquire()
    assert lock_path(run) == tmp_path / "runs" / ".x.lock" and not run.exists()  # nothing inside the run
    with pytest.raises(RunLockedError) as e:
        RunLock(run, "logging.run_name: the run directory").acquire()  # another open file: another job
    msg = str(e.value)
    assert msg.startswith("logging.run_name:") and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert "\n" not in msg
    first.release()
    with RunLock(run) as again:  # released: the next job gets it
        assert again.held
    assert RunLock(tmp_path / "other").acquire().held  # other run directories are independent


def test_resume_command_adds_resume_auto_and_drops_overwrite():
    cmd = resume_command(["--config", "a b.yaml", "--logging.overwrite", "true", "--resume", "step-3",
                          "--train.lr=1e-3", "--checkpoint.resume=x"])
    assert cmd == "python -m apo_llm.train --config 'a b.yaml' --train.lr=1e-3 --resume auto"


def test_fingerprints_change_with_the_content_not_only_the_size(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(bytes(3 << 20))
    whole = ck.weights_fingerprint(tmp_path)
    monkeypatch.setattr(ck, "FULL_HASH_BYTES", 1)  # the sampled hash of large weights
    sampled = ck.weights_fingerprint(tmp_path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in a sampled block, same size
    f.write_bytes(bytes(data))
    assert ck.weights_fingerprint(tmp_path) != sampled
    monkeypatch.setattr(ck, "FULL_HASH_BYTES", 4 << 30)
    assert ck.weights_fingerprint(tmp_path) != whole
    assert ck.changed_inputs({"model.name_or_path": whole, "gone": 1},
                             {"model.name_or_path": ck.weights_fingerprint(tmp_path), "new": 2}) \
        == {"model.name_or_path": (whole, ck.weights_fingerprint(tmp_path))}  # inputs on one side: not compared
    assert ck.weights_fingerprint(tmp_path / "missing") is None
