# `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,tensorboard]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedjax-priv run experiments/demo.toml --out runs/demo --overwrite

# One pytest worker per core: most of the suite's time is single-threaded XLA
# compilation (8m46s serial, 6m07s with 2 workers on a 2-core machine).
test: $(STAMP)
	$(BIN)/python -m pytest tests -n auto

bench: $(STAMP)
	$(BIN)/python experiments/benchmarks/round_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
