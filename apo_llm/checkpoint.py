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
new one, never a half-written `step-*` directory. Temporary leftovers are ignored and cleaned,
by the run directory's lock holder only (apo_llm.runlock: only the holder ever saves).
The manifest catches what the rename cannot: a file truncated or altered later (disk full on a
copy, a bad sync). `--resume auto` verifies it and falls back to the newest intact checkpoint.
A failed write (disk full) is a one-line CheckpointError naming the file and the OS's reason.

The TRL engine's checkpoints (`<run_dir>/checkpoint-N/`, written by transformers' Trainer) get the
same manifest and COMPLETE marker (`seal_checkpoint`) plus `apo_state.pt` (the run's config,
metrics offset and input fingerprints); `Layout` tells the two apart, and the listing,
verification, fallback and resume resolution below serve both.

Input fingerprints (`file_fingerprint`, `weights_fingerprint`, `problems_fingerprint`) are saved in
every checkpoint's state, so that a resume on other data or another base model is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from apo_llm.cli import UserError

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^(?:step|checkpoint)-(\d+)$")


@dataclass(frozen=True)
class Layout:
    """Where an engine keeps its checkpoints and which files an intact one must list."""

    subdir: str  # below the run directory ("" = the run directory itself)
    prefix: str  # a checkpoint is <prefix><step>
    required: tuple[str, ...]
    state_file: str  # the torch-pickled dict with config, metrics offset, input fingerprints


NATIVE = Layout(CKPT_DIR, "step-", ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                                    "trainer_state.pt"), "trainer_state.pt")
TRL = Layout("", "checkpoint-", ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                 "apo_state.pt"), "apo_state.pt")
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


def checkpoint_root(run_dir: str | Path, layout: Layout = NATIVE) -> Path:
    return Path(run_dir) / layout.subdir if layout.subdir else Path(run_dir)


def list_checkpoints(run_dir: str | Path, layout: Layout = NATIVE) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir, layout)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir()
             if p.name.startswith(layout.prefix) and (p / "COMPLETE").is_file()]
    return [p for step, p in sorted(found) if step >= 0]


def latest_checkpoint(run_dir: str | Path, layout: Layout = NATIVE) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir, layout)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict[str, Any], *,
                    keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically; prune to the newest `keep_last`. Returns its path.
    Only the holder of the run directory's lock calls this (it also removes others' temporaries)."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:06d}"
    writing(root, lambda: root.mkdir(parents=True, exist_ok=True))
    tmp = Path(writing(root, lambda: tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root)))
    try:
        writing(final / "adapter", lambda: model.save_pretrained(tmp / "adapter"))
        for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict()),
                          ("trainer_state.pt", {**state, "step": step, "rng": rng_state()})):
            writing(final / name, lambda: save_torch(obj, tmp / name))
        writing(final / MANIFEST, lambda: seal_checkpoint(tmp, step))
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


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file: a failed write surfaces as the OSError itself (ENOSPC, EFBIG),
    where a path argument gives torch's "unexpected pos" RuntimeError and hides it."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def writing(path: Path, write: Callable):
    """write(); any failure becomes a one-line CheckpointError naming `path` and the OS's reason."""
    try:
        return write()
    except Exception as e:
        raise CheckpointError(f"checkpoint: cannot write {path} ({_os_reason(e, path)})") from e


def _os_reason(e: BaseException, path: Path) -> str:
    """The OS message behind a failed write: torch.save / safetensors wrap ENOSPC in their own errors."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        code = re.search(r"os error (\d+)", str(seen))  # safetensors: "I/O error: ... (os error 28)"
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
        if st.f_bavail * st.f_frsize < (1 << 20):  # the library hid it, the filesystem tells
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def seal_checkpoint(path: Path, step: int) -> None:
    """manifest.json of every file, then the COMPLETE marker (last), fsynced: what makes it a checkpoint."""
    write_manifest(path)
    (path / "COMPLETE").write_text(f"{step}\n")
    _fsync_dir(path)


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


def verify_checkpoint(path: str | Path, layout: Layout = NATIVE) -> Optional[str]:
    """None when the checkpoint is intact, else why not (naming the file)."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        return f"{path}: no COMPLETE marker"
    man = path / MANIFEST
    try:
        entries = json.loads(man.read_text())
    except (OSError, ValueError) as e:
        return f"{man}: missing or unreadable manifest ({type(e).__name__})"
    for rel in layout.required:
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


def read_trainer_state(path: str | Path, layout: Layout = NATIVE) -> dict[str, Any]:
    """The state file of a checkpoint (step, counters, the run's config, input fingerprints; RNG states
    in the native one), without loading weights."""
    return _torch_load(Path(path) / layout.state_file)


def resolve_resume(resume: Optional[str], run_dir: str | Path, layout: Layout = NATIVE) -> Optional[Path]:
    """checkpoint.resume -> a verified checkpoint path or None.

    'auto': the newest checkpoint whose manifest verifies; each newer one that fails is renamed
    `invalid-step-*` (kept for inspection, never picked again) and a warning says why. When
    checkpoints exist but none verifies, CheckpointError lists them. An explicit path must verify.
    """
    if resume in NO_RESUME:
        return None
    if resume == "auto":
        skipped = []
        for ckpt in reversed(list_checkpoints(run_dir, layout)):
            why = verify_checkpoint(ckpt, layout)
            if why is None:
                for bad in skipped:
                    log.warning(f"resume: skipped checkpoint {bad[0].name}: {bad[1]}")
                    os.replace(bad[0], unused_path(bad[0].with_name("invalid-" + bad[0].name)))
                return ckpt
            skipped.append((ckpt, why))
        if skipped:
            raise CheckpointError("checkpoint.resume: no intact checkpoint in "
                                  f"{checkpoint_root(run_dir, layout)}: " + "; ".join(w for _, w in skipped))
        return None
    p = Path(resume)
    why = verify_checkpoint(p, layout) if p.is_dir() else f"{p}: not a checkpoint directory"
    if why is not None:
        raise CheckpointError(f"checkpoint.resume: {why}")
    return p


# --------------------------------------------------------------------------------------------
# Input fingerprints: what a resume must find unchanged
# --------------------------------------------------------------------------------------------

FULL_HASH_BYTES = 4 << 30  # weights up to this size are hashed whole; larger ones by sampled blocks
_SAMPLE_BLOCKS, _BLOCK = 64, 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def file_fingerprint(path: str | Path) -> dict:
    p = Path(path)
    return {"file": str(p), "size": p.stat().st_size, "sha256": _sha256(p)}


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the first block and _SAMPLE_BLOCKS evenly spaced 1 MiB blocks (and the size): any
    retrained or re-quantised weight file changes them; hashing 15 GB at every start would not pay."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for i in range(_SAMPLE_BLOCKS + 1):
            fh.seek(max(0, (size - _BLOCK) * i // _SAMPLE_BLOCKS))
            h.update(fh.read(_BLOCK))
    return h.hexdigest()


def weights_fingerprint(model_dir: str | Path) -> Optional[dict]:
    """{file name: {size, sha256}} of a local model's weight files (None when it has none here)."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    sizes = {p.name: p.stat().st_size for p in files}
    whole = sum(sizes.values()) <= FULL_HASH_BYTES
    return {p.name: {"size": sizes[p.name], "sha256": _sha256(p) if whole else _sampled_sha256(p, sizes[p.name])}
            for p in files}


def problems_fingerprint(problems) -> dict:
    """sha256 over (id, prompt, gold) of the loaded problems: the data a step draws from, any source."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.prompt, p.gold]).encode("utf-8", "surrogatepass"))
    return {"problems": len(problems), "sha256": h.hexdigest()}


def changed_inputs(saved: Optional[dict], now: dict) -> dict:
    """{input name: (saved, now)} for the inputs both sides fingerprinted that differ."""
    saved = saved or {}
    return {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
