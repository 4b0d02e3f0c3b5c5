"""Shared test set-up: offline hub, headless plots, hypothesis profile, tiny-model fixtures.

`tiny_model_dir` builds the quick SFT'd tiny model once per test run: under pytest-xdist every
worker points at the same cache folder (the run's shared temp root) and ensure_tiny_model's file
lock lets one worker build while the others wait. The home cache is never used, so a clean CI
machine builds it exactly as a developer's machine does.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub call would hang 20-50 s in retries before failing
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores shared by xdist workers
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per subprocess/notebook kernel they start): with 2 workers on
    # 2 cores, torch's default of one thread per core oversubscribes and small generate calls run
    # several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("apo", deadline=None, print_blob=True)
settings.load_profile("apo")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch  # noqa: E402

    torch.set_num_threads(1)


def _shared_cache(tmp_path_factory) -> Path:
    """A folder shared by all xdist workers of this run (and only this run)."""
    base = tmp_path_factory.getbasetemp()
    # With xdist each worker's basetemp is <run root>/popen-gwN; the run root is shared.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "apo_tiny_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The quick SFT-warm-started tiny Llama (pass@1 strictly between 0 and 1), built once per run."""
    from apo_llm.tiny import ensure_tiny_model

    return ensure_tiny_model(_shared_cache(tmp_path_factory), quick=True, log=lambda *a: None)


@pytest.fixture(scope="session")
def random_tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny Llama with the same tokenizer: instant, for shape-only tests."""
    from apo_llm.tiny import ensure_random_tiny_model

    return ensure_random_tiny_model(_shared_cache(tmp_path_factory))
