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
# compilation. Workers and the subprocesses tests start share one fresh
# persistent compilation cache, so a program several tests build (the same
# tiny run in a resume, a kill and a CLI test) compiles once per session;
# worksteal keeps both workers busy to the end. The tests check semantics, not
# speed: XLA's lowest CPU backend optimisation level compiles faster.
test: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=$$(mktemp -d) XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" \
	  $(BIN)/python -m pytest tests -n auto --dist worksteal

bench: $(STAMP)
	$(BIN)/python experiments/benchmarks/round_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
