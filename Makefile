# Two entry points: `make run` (set up + quick reproduction) and `make test` (set up + tests).
# TORCH_SPEC pins the CPU build that lies on this lab's disk; on a GPU machine use e.g.
#   make run TORCH_SPEC="torch"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[lab,dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/backproplab reproduce --quick --out results

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# unit tests and float64 oracles only (no multi-process, experiment, CLI or server runs): about 31 s on 2 cores
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not medium and not cuda"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loop_overhead.py

clean:
	rm -rf $(VENV) results
