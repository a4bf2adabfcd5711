# The two commands of the README:
#   make reproduce   -> set up .venv (pinned), then `dvc repro` (profile from params.yaml, default cpu):
#                       every notebook stage runs `python -m pfcrepro.nbrun` (the reproduction harness)
#   make test        -> set up .venv (pinned), then ruff + pytest (unit tests of pfclib and pfcrepro,
#                       multi-process, structure of notebooks and dvc.yaml, nbval on every notebook)
# Everything else here is plumbing for those two.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Tools from the venv first (dvc stages call papermill/python); never reach the HF hub.
export PATH := $(BIN):$(PATH)
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: reproduce test
reproduce: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -p no:cacheprovider tests notebooks --nbval-lax --durations=15

# (Re)install when the lock or the package metadata changes. torch is pinned inside the lock, in the
# same pip call, so a CPU machine never resolves a CUDA build. `-e .` installs both packages of
# pyproject.toml: pfclib (the library) and pfcrepro (the reproduction harness). The Jupyter kernel
# `pfclib` is registered inside the venv (--sys-prefix): every notebook names it in its metadata, and
# papermill (pfcrepro.nbrun), nbval and JupyterLab started from .venv find it there.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name pfclib --display-name "pfclib (.venv)"
	touch $@
