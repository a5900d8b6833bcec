# `make book` and `make test` each set up .venv on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Without a CUDA driver, pin the CPU build of torch (constraints-cpu.txt); on a GPU workstation take the normal build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
PIP_CONSTRAINT_FLAG := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: setup test test-fast test-families book bench bench-scale clean-book

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_CONSTRAINT_FLAG) -e ".[book,dev]" 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import instab_core, torch, transformers, papermill, jupyter_book"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -rs -m "not families"

# The whole family x notebook grid of smoke runs (about an hour on 2 cores), then the README's family table from it.
test-families: setup
	INSTAB_FAMILY_REPORT=$(CURDIR)/.families.json $(BIN)/python -m pytest -q -rs tests/test_families.py
	$(BIN)/python scripts/family_table.py $(CURDIR)/.families.json --readme README.md

test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow"

book: setup
	$(BIN)/instab book

bench: setup
	$(BIN)/python benchmarks/bench_boundary.py
	$(BIN)/python benchmarks/bench_jacobian.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_lipschitz.py
	$(BIN)/python benchmarks/bench_decision.py
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_wordpred.py
	$(BIN)/python benchmarks/bench_levelsets.py
	$(BIN)/python benchmarks/bench_fisher.py
	$(BIN)/python benchmarks/bench_linearity.py
	$(BIN)/python benchmarks/bench_curvature.py
	$(BIN)/python benchmarks/bench_prefix_cache.py
	$(BIN)/python benchmarks/bench_scale_costs.py
	$(BIN)/python benchmarks/bench_campaign.py

# The cost model at d = 128/512/2048, then every notebook with its default parameters on llama-3.2-1b -L 2 (d=2048,
# V=128256), built locally: benchmarks/scale.md (both resume where an interrupted run stopped)
bench-scale: setup
	$(BIN)/python benchmarks/bench_scale_costs.py --record benchmarks/scale_costs.json
	$(BIN)/python benchmarks/scale.py

clean-book:
	rm -rf _build book/experiments/*.ipynb
