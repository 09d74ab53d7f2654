# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint typecheck bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/gradguard demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2

lint: $(VENV)/.installed
	$(BIN)/ruff check gradguard integrations tests benchmarks examples
	$(BIN)/ruff format --check gradguard integrations tests benchmarks examples

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/overhead.py --threads 1 --markdown benchmarks/RESULTS-cpu.md

.PHONY: stability
# The stability sweep (~8 minutes on one CPU thread); the raw numbers go to runs/ (ignored).
stability: $(VENV)/.installed
	$(BIN)/python benchmarks/stability.py --threads 1 --markdown benchmarks/RESULTS-stability.md --json runs/stability.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
