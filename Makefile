# Entry points (see README): `make demo` and `make test`; also `make test-fast` (the formula lane,
# see docs/README.md) and `make notebooks` (opens the teaching notebooks in JupyterLab).
# All create and reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned in the same pip command as the project, so a CPU machine gets the local CPU wheel
# instead of resolving `torch` to a multi-GB CUDA build. GPU users: see README ("GPU set-up").
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast notebooks notebooks-html clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,tensorboard]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m apo_toy.run --preset rsc --seeds 5 --out runs/rsc
	HF_HUB_OFFLINE=1 $(PY) -m apo_llm.train

# the test suite also runs the DeepSpeed ZeRO-2/3 equality tests on CPU (the `deepspeed` extra)
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,tensorboard,deepspeed]"
	touch $@

test: setup $(VENV)/.deepspeed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

# The formula lane: everything not marked slow by tests/conftest.py (no model builds, notebooks,
# figures or CLI subprocesses).
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# JupyterLab is an extra (`notebooks`), installed on first use next to the project.
$(VENV)/.notebooks: $(VENV)/.installed
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,tensorboard,notebooks]"
	touch $@

notebooks: $(VENV)/.notebooks
	HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter lab notebooks/

# Every lesson executed (headless, widgets at their defaults) and rendered to HTML for reading
# without Jupyter: runs/notebooks_html/<lesson>.html
notebooks-html: $(VENV)/.notebooks
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(VENV)/bin/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.timeout=600 --output-dir runs/notebooks_html notebooks/[0-9][0-9]_*.ipynb

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
