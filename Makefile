# Quick start (each target does all of its own set-up on a fresh machine):
#   make pipeline   virtual env + pinned packages + Fashion-MNIST, then `dvc repro`
#   make test       the same set-up, then the test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/fashion-mnist
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
export DVC_NO_ANALYTICS := 1

.PHONY: setup pipeline test check-results data lint bench setup-robustbench test-robustbench

setup: $(VENV)/.installed $(DATA)/train-images-idx3-ubyte.gz

# important: torch first, from the exact pin (a CPU wheel); then everything else under the lock.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	touch $@

# RobustBench's environment: another torch (requirements-robustbench.lock says why), so another venv.
# torch + torchvision with their own dependencies (from this machine's package store), then the
# project's lock without its torch pin and the RobustBench pins, with no resolution of their own.
RB_VENV := .venv-rb
setup-robustbench: $(RB_VENV)/.installed $(DATA)/train-images-idx3-ubyte.gz

$(RB_VENV)/.installed: pyproject.toml requirements.lock requirements-robustbench.lock
	test -x $(RB_VENV)/bin/python || python3 -m venv $(RB_VENV)
	$(RB_VENV)/bin/python -m pip install -q --upgrade pip
	$(RB_VENV)/bin/python -m pip install -q $$(grep -E '^torch(vision)?==' requirements-robustbench.lock)
	$(RB_VENV)/bin/python -m pip install -q --no-deps -r <(grep -v '^torch==' requirements.lock) \
	  -r <(grep -vE '^torch(vision)?==' requirements-robustbench.lock)
	$(RB_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# The embedded default dataset: Debian's dataset-fashion-mnist package, copied into data/.
$(DATA)/train-images-idx3-ubyte.gz:
	@if [ ! -f $(FMNIST_SYSTEM)/train-images-idx3-ubyte.gz ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  { echo "error: could not install dataset-fashion-mnist; put the IDX files in $(DATA)/"; exit 1; }; fi
	mkdir -p $(DATA)
	cp $(FMNIST_SYSTEM)/*-ubyte.gz $(DATA)/

pipeline: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "error: dvc needs a git repository (clone this one)"; exit 1; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro  # `python` in dvc.yaml cmds: the venv
	@echo "report: artifacts/report/report.md"

# the three tiers, each reported on its own (pyproject.toml: markers); all must pass
test: setup
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m 'e2e and not slow'
	$(MAKE) --no-print-directory check-results
	$(MAKE) --no-print-directory test-robustbench

test-robustbench: setup-robustbench
	$(RB_VENV)/bin/python -m pytest -q -m robustbench

check-results: setup
	$(PY) -m pytest -q -m results

lint: setup
	$(VENV)/bin/ruff check pipeline stages tests scripts

bench: setup
	$(PY) -m pipeline bench
