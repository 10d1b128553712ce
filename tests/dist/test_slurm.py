"""kd-train under SLURM: scripts/slurm/kd-train.sbatch, submitted with `sbatch --wait` to a real
single-node cluster started here (munged, slurmctld, slurmd in a temporary folder: slurm_cluster.py),
runs 2 srun tasks on CPU that give the self-launch's per-step losses. Needs root and the Debian
packages slurm-wlm and munge (`make test-slurm`, and CI, install them); without them the tests are
skipped with the reason. (Several nodes: tests/unit/test_launch.py reads srun's variables of a
multi-node step; tests/dist/test_two_nodes.py runs two "nodes" under torchrun.)"""
import os
import re
import sys
from pathlib import Path

import pytest

from . import slurm_cluster
from .conftest import LAUNCH_COMMON, REPO, metrics

pytestmark = pytest.mark.dist

SBATCH = REPO / "scripts" / "slurm" / "kd-train.sbatch"
COMMON = list(LAUNCH_COMMON)
# the script's H100 defaults, turned into 2 single-core CPU ranks on this node
CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def _unavailable() -> str | None:
    gone = slurm_cluster.missing()
    if gone:
        return (f"SLURM not installed ({', '.join(gone)} not found): `make test-slurm` installs slurm-wlm and "
                "munge with apt and runs this file")
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root (SlurmUser=root): run as root (`sudo make test-slurm`)"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _unavailable()
    if why:
        pytest.skip(why)
    c = slurm_cluster.Cluster()
    try:
        c.start_controller()
    except slurm_cluster.ClusterError as e:     # e.g. a sandbox that refuses a daemon: its own words
        pytest.fail(f"the test cluster did not start: {e}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def node(cluster):
    try:
        cluster.start_node()
    except slurm_cluster.ClusterError as e:
        pytest.fail(f"slurmd did not start: {e}", pytrace=False)
    return cluster


def _job_env(cluster) -> dict:
    """What a user's shell has at sbatch time: kd-train's python first on PATH, DS_ACCELERATOR=cpu."""
    env = cluster.env(DS_ACCELERATOR="cpu")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[k]      # the test itself may run inside a SLURM job
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    return env


def test_sbatch_takes_the_script_and_the_cpu_override(node):
    """The #SBATCH defaults ask for 8 GPUs a node, which a node without GRES refuses; --gpus-per-node=0
    on the command line replaces them (--gres=none would not). (--test-only needs a registered node.)"""
    cluster = node
    env = _job_env(cluster)
    plain = cluster.run(["sbatch", "--test-only", str(SBATCH), "recipe.yaml"], env=env, cwd=REPO)
    assert plain.returncode != 0 and "Invalid generic resource" in plain.stderr, plain.stderr
    cpu = cluster.run(["sbatch", "--test-only", *CPU_NODE, str(SBATCH), "recipe.yaml"], env=env, cwd=REPO)
    assert cpu.returncode == 0 and "to start at" in cpu.stderr, cpu.stderr


def test_sbatch_equals_self_launch(node, kd_setup, self_launched):
    out = node.root / "job-%j.out"
    env = _job_env(node)
    job = node.run(["sbatch", "--wait", "--parsable", *CPU_NODE, f"--output={out}", f"--chdir={REPO}", str(SBATCH),
                    str(kd_setup / "recipe.yaml"), "run_name=slurm", *COMMON], env=env, cwd=REPO, timeout=900)
    job_id = job.stdout.strip().split(";")[0]
    log_file = Path(str(out).replace("%j", job_id)) if job_id else None
    log = log_file.read_text(errors="replace") if log_file and log_file.exists() else "(no job output file)"
    assert job.returncode == 0, (f"sbatch --wait exited {job.returncode}\n{job.stderr}\n--- job output\n{log[-8000:]}"
                                 f"\n{node.log('slurmd')}")
    assert re.search(r"2 tasks on 1 node\(s\)", log), log[-3000:]
    # srun --label prefixes each line with its task: rank 0 of the srun step reports the world it joined
    assert re.search(r"^0: \[kd-train\] 2 ranks ", log, flags=re.M), log[-3000:]
    losses = [r["loss"] for r in metrics(kd_setup / "runs" / "slurm")]
    assert losses == pytest.approx(self_launched, rel=1e-5)
