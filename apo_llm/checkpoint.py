"""Atomic checkpoints of everything a run needs to continue bit-for-bit.

Layout of <run_dir>/checkpoints/step-000010/:
    adapter/            peft format (PeftModel.from_pretrained loads it)
    optimizer.pt        AdamW state
    scheduler.pt        LR scheduler state
    trainer_state.pt    step, data position, metrics offset, counters, RNG states (python, numpy,
                        torch CPU, CUDA)
    COMPLETE            written last

A checkpoint is written into a temporary sibling directory and renamed into place with
os.replace, so a crash or SIGKILL at any moment leaves either the old set of checkpoints or the
new one, never a half-written `step-*` directory. Temporary leftovers are ignored and cleaned.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (sampling, data order, dropout)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict[str, Any], *,
                    keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically; prune to the newest `keep_last`. Returns its path."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        model.save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "COMPLETE").write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): swap atomically
            old = root / f".old-step-{step:06d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".tmp-step-*"):  # leftovers of a killed writer (not our own: renamed already)
        shutil.rmtree(junk, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not supported on every filesystem
        pass


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, *, restore_rng: bool = True
                    ) -> dict[str, Any]:
    """Load adapter weights (into the trainable "default" adapter), optimizer, scheduler, RNG.

    Returns the trainer state dict (step, data position, metrics offset, ...).
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"checkpoint: {path} is not a complete checkpoint (no COMPLETE marker)")
    weights = path / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"checkpoint: adapter weights missing at {weights}")
    result = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint: adapter at {weights} does not match the model ({len(unexpected)} "
                         f"unexpected keys, e.g. {unexpected[0]})")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    state = torch.load(path / "trainer_state.pt", weights_only=False)  # our own file: RNG states are pickled
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def resolve_resume(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """checkpoint.resume -> a checkpoint path or None. 'auto': the latest, if any."""
    if resume in (None, "", "none", "None", "false"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if not (p / "COMPLETE").is_file():
        raise ValueError(f"checkpoint.resume: {p} is not a complete checkpoint directory")
    return p
