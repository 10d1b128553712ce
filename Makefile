# `make demo` and `make test` work on a fresh machine: each creates .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo demo-spread test test-unit test-dist test-launchers bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and alone: the pinned CPU wheel, never a CUDA build pulled in by another package
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m train

# the demo's SFT and GRKD students for three seeds, and the spread of their figures (runs/demo/spread.md)
demo-spread: $(STAMP)
	$(BIN)/python -m train.demo --seeds 0 1 2 --offpolicy-only

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-dist: $(STAMP)
	$(BIN)/python -m pytest -q tests/dist

# kd-train under torchrun, mpirun (OpenMPI + mpi4py: installed here, root and apt needed) and deepspeed,
# against its self-launch; `make test` runs the same file and skips mpirun where OpenMPI is missing
test-launchers: $(STAMP)
	command -v mpirun >/dev/null || (apt-get update -q && apt-get install -y -q openmpi-bin libopenmpi-dev)
	$(BIN)/python -m pip install -q -e '.[mpi]'
	$(BIN)/python -m pytest -q tests/dist/test_launchers.py -rs

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/loss_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
