"""Atomic checkpoints of everything a run needs to continue bit-for-bit.

Layout of <run_dir>/checkpoints/step-000010/:
    adapter/            peft format (PeftModel.from_pretrained loads it)
    optimizer.pt        AdamW state
    scheduler.pt        LR scheduler state
    trainer_state.pt    step, data position, metrics offset, counters, RNG states (python, numpy,
                        torch CPU, CUDA), the run's resolved config
    manifest.json       size and sha256 of every file above, written after them
    COMPLETE            written last

A checkpoint is written into a temporary sibling directory and renamed into place with
os.replace, so a crash or SIGKILL at any moment leaves either the old set of checkpoints or the
new one, never a half-written `step-*` directory. Temporary leftovers are ignored and cleaned.
The manifest catches what the rename cannot: a file truncated or altered later (disk full on a
copy, a bad sync). `--resume auto` verifies it and falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from apo_llm.cli import UserError

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
log = logging.getLogger("apo_llm.checkpoint")


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


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
    found = [(checkpoint_step(p), p) for p in root.iterdir() if (p / "COMPLETE").is_file()]
    return [p for step, p in sorted(found) if step >= 0]


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
        write_manifest(tmp)
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
    # Prune relative to the step just saved, not to the newest on disk: after a fallback resume a
    # later (corrupt or abandoned) step-* must never outrank, and so delete, the fresh checkpoint.
    for other in list_checkpoints(run_dir):
        if checkpoint_step(other) > step:
            shutil.rmtree(other, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".tmp-step-*"):  # leftovers of a killed writer (not our own: renamed already)
        shutil.rmtree(junk, ignore_errors=True)
    return final


def checkpoint_step(path: str | Path) -> int:
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """manifest.json: {relative path: {size, sha256}} of every file written so far."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))
    entries = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (ckpt / MANIFEST).write_text(json.dumps(entries, indent=1))


def verify_checkpoint(path: str | Path) -> Optional[str]:
    """None when the checkpoint is intact, else why not (naming the file)."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        return f"{path}: no COMPLETE marker"
    man = path / MANIFEST
    try:
        entries = json.loads(man.read_text())
    except (OSError, ValueError) as e:
        return f"{man}: missing or unreadable manifest ({type(e).__name__})"
    for rel in ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.pt"):
        if rel not in entries:
            return f"{path / rel}: not listed in the manifest"
    for rel, want in entries.items():
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f}: size {size} bytes, manifest says {want['size']} (truncated or altered)"
        if _sha256(f) != want["sha256"]:
            return f"{f}: sha256 differs from the manifest (corrupted)"
    return None


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
        raise CheckpointError(f"checkpoint: {path} is not a complete checkpoint (no COMPLETE marker)")
    weights = path / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"checkpoint: adapter weights missing at {weights}")
    result = set_peft_model_state_dict(model, _read(weights, lambda: load_file(str(weights))),
                                       adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint: adapter at {weights} does not match the model ({len(unexpected)} "
                         f"unexpected keys, e.g. {unexpected[0]})")
    if optimizer is not None:
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    state = _torch_load(path / "trainer_state.pt")
    if restore_rng:
        set_rng_state(state["rng"])
    return state


NO_RESUME = (None, "", "none", "None", "false")  # checkpoint.resume values that start a fresh run


def unused_path(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first name not taken (never overwrite evidence)."""
    i, out = 0, path
    while out.exists():
        i += 1
        out = path.with_name(f"{path.name}.{i}")
    return out


def _read(path: Path, load):
    """Run a loader; any failure becomes a CheckpointError naming the file (not a bare library trace)."""
    try:
        return load()
    except Exception as e:
        raise CheckpointError(f"checkpoint: cannot read {path} ({type(e).__name__}: {str(e)[:200]})") from e


def _torch_load(path: Path):
    # our own files: RNG states and the config are pickled, so weights_only=False
    return _read(path, lambda: torch.load(path, weights_only=False))


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint (step, counters, RNG states, the run's config), without loading weights."""
    return _torch_load(Path(path) / "trainer_state.pt")


def resolve_resume(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """checkpoint.resume -> a verified checkpoint path or None.

    'auto': the newest checkpoint whose manifest verifies; each newer one that fails is renamed
    `invalid-step-*` (kept for inspection, never picked again) and a warning says why. When
    checkpoints exist but none verifies, CheckpointError lists them. An explicit path must verify.
    """
    if resume in NO_RESUME:
        return None
    if resume == "auto":
        skipped = []
        for ckpt in reversed(list_checkpoints(run_dir)):
            why = verify_checkpoint(ckpt)
            if why is None:
                for bad in skipped:
                    log.warning(f"resume: skipped checkpoint {bad[0].name}: {bad[1]}")
                    os.replace(bad[0], unused_path(bad[0].with_name("invalid-" + bad[0].name)))
                return ckpt
            skipped.append((ckpt, why))
        if skipped:
            raise CheckpointError("checkpoint.resume: no intact checkpoint in "
                                  f"{checkpoint_root(run_dir)}: " + "; ".join(w for _, w in skipped))
        return None
    p = Path(resume)
    why = verify_checkpoint(p) if p.is_dir() else f"{p}: not a checkpoint directory"
    if why is not None:
        raise CheckpointError(f"checkpoint.resume: {why}")
    return p
