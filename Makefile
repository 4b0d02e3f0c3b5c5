# Two entry points (see README): `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned in the same pip command as the project, so a CPU machine gets the local CPU wheel
# instead of resolving `torch` to a multi-GB CUDA build. GPU users: see README ("GPU set-up").
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,tensorboard]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m apo_toy.run --preset rsc --out runs/rsc
	HF_HUB_OFFLINE=1 $(PY) -m apo_llm.train

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
