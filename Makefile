# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint typecheck bench clean
.PHONY: docs docs-images docs-examples stability fixed-cost

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@

# The docs extra has its own stamp, so `make test` never installs it.
$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[docs]'
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
	$(BIN)/python benchmarks/fixed_cost.py --threads 1 --markdown benchmarks/RESULTS-fixed-cost.md
	$(BIN)/python benchmarks/overhead.py --threads 1 --markdown benchmarks/RESULTS-cpu.md

# gradguard's fixed per-step cost next to clip_grad_norm_'s (about a minute).
fixed-cost: $(VENV)/.installed
	$(BIN)/python benchmarks/fixed_cost.py --threads 1

# The site, into site/, with `mkdocs build --strict` (docs/check_api.py runs as a hook).
# Not --quiet: it hides the warnings that --strict counts, and the build passes them.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# TensorBoard screenshots in docs/img/ from a real `gradguard demo` run (needs chromium).
docs-images: $(VENV)/.installed
	MPLBACKEND=Agg $(BIN)/python docs/screenshots.py

# The Event texts the docs quote, in docs/snippets/events/, from small real runs.
docs-examples: $(VENV)/.installed
	$(BIN)/python docs/event_examples.py

# The stability sweep (~8 minutes on one CPU thread); the raw numbers go to runs/ (ignored).
stability: $(VENV)/.installed
	$(BIN)/python benchmarks/stability.py --threads 1 --markdown benchmarks/RESULTS-stability.md --json runs/stability.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	rm -rf site
