"""Rank discovery (train/launch.py): each launcher's variables give the rank, the world, the local rank
(the device) and one master address and port, exported under torch's names."""
import os
import shutil
import subprocess
import sys

import pytest

from train import launch

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID")


@pytest.fixture
def env(monkeypatch):
    """A process started by nobody: no launcher's variables; discovery's cache cleared."""
    for key in list(os.environ):
        if key in LAUNCHER_VARS or key.startswith(("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_")):
            monkeypatch.delenv(key)
    monkeypatch.setattr(launch, "_DISCOVERED", None)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
    return set_env


def exported() -> tuple:
    return tuple(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def test_nobody_launched(env):
    assert not launch.launched() and launch.rank() == 0
    with pytest.raises(launch.LaunchError, match="not started by a launcher"):
        launch.discover()


def test_torchrun(env):
    env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, MASTER_ADDR="node7", MASTER_PORT=1234,
        TORCHELASTIC_RUN_ID="x")
    r = launch.discover()
    assert (r.rank, r.world, r.local_rank, r.launcher) == (3, 4, 1, "torchrun")
    assert exported() == ("3", "4", "1", "node7", "1234")


def test_openmpi_one_node(env, monkeypatch):
    # the local rank, not the global one, picks the device; one node: the loopback address
    monkeypatch.setitem(sys.modules, "mpi4py", None)     # with it, rank 0 sends a free port (tests/dist)
    env(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=2,
        PMIX_NAMESPACE="prterun-host-123@1")
    r = launch.discover()
    assert (r.rank, r.world, r.local_rank, r.launcher, r.one_node) == (1, 2, 1, "mpirun", True)
    rank, world, local, addr, port = exported()
    assert (rank, world, local, addr) == ("1", "2", "1", "127.0.0.1")
    # every rank derives the same port from the job's id (no mpi4py needed on one node)
    assert int(port) == launch._job_port() and 20000 <= int(port) < 32768


def test_openmpi_two_nodes_local_rank(env, monkeypatch):
    env(OMPI_COMM_WORLD_RANK=5, OMPI_COMM_WORLD_SIZE=8, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=4,
        MASTER_ADDR="head", MASTER_PORT=4000)
    monkeypatch.setitem(sys.modules, "mpi4py", None)     # as without the mpi extra
    r = launch.discover()
    assert (r.rank, r.local_rank, r.one_node) == (5, 1, False)
    assert exported() == ("5", "8", "1", "head", "4000")


def test_mpi_several_nodes_without_mpi4py_or_address(env, monkeypatch):
    env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_LOCAL_RANK=0, OMPI_COMM_WORLD_LOCAL_SIZE=2)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(launch.LaunchError, match=r"several nodes.*mpi extra.*MASTER_ADDR"):
        launch.discover()


def test_mpich_hydra(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    env(PMI_RANK=2, PMI_SIZE=4, MPI_LOCALRANKID=0, MPI_LOCALNRANKS=2, MASTER_ADDR="n1", MASTER_PORT=9000)
    r = launch.discover()
    assert (r.rank, r.world, r.local_rank, r.launcher) == (2, 4, 0, "mpiexec")
    assert exported() == ("2", "4", "0", "n1", "9000")


def test_srun_one_node(env):
    env(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_LOCALID=1, SLURM_STEP_ID=0,
        SLURM_STEP_NUM_NODES=1, SLURM_JOB_ID=77, SLURM_STEP_NODELIST="cpu01")
    r = launch.discover()
    assert (r.rank, r.world, r.local_rank, r.launcher) == (1, 2, 1, "srun")
    rank, world, local, addr, port = exported()
    assert (rank, world, local, addr) == ("1", "2", "1", "127.0.0.1")
    assert int(port) == launch._job_port()


def test_srun_several_nodes_plain_host(env):
    env(SLURM_PROCID=9, SLURM_NTASKS=16, SLURM_LOCALID=1, SLURM_STEP_ID=0, SLURM_STEP_NUM_NODES=2,
        SLURM_JOB_ID=77, SLURM_STEP_NODELIST="gpu-a", MASTER_PORT=5555)
    launch.discover()
    assert exported() == ("9", "16", "1", "gpu-a", "5555")


def test_srun_several_nodes_compressed_list(env, monkeypatch):
    env(SLURM_PROCID=0, SLURM_NTASKS=16, SLURM_LOCALID=0, SLURM_STEP_ID=3, SLURM_STEP_NUM_NODES=2,
        SLURM_JOB_ID=77, SLURM_STEP_NODELIST="gpu[07-08]")
    scontrol = shutil.which("scontrol")
    if scontrol and subprocess.run([scontrol, "show", "hostnames", "a"], capture_output=True).returncode == 0:
        launch.discover()               # SLURM's own parser of node lists (it needs a slurm.conf, no daemon)
        assert os.environ["MASTER_ADDR"] == "gpu07"
    else:
        monkeypatch.setenv("PATH", "/nonexistent")
        with pytest.raises(launch.LaunchError, match=r"gpu\[07-08\].*Export MASTER_ADDR"):
            launch.discover()


@pytest.mark.parametrize("step", [None, "4294967294", "4294967292", "batch"])
def test_batch_script_is_not_a_rank(env, step):
    """The batch script carries SLURM_PROCID=0 and the job's task count but no SLURM_STEP_ID (seen on
    SLURM 22.05, the test cluster of test_slurm.py), and it is one process:
    kd-train there launches its ranks itself rather than wait for 7 others."""
    env(SLURM_PROCID=0, SLURM_NTASKS=8, SLURM_LOCALID=0, SLURM_JOB_ID=5, SLURM_JOB_NODELIST="gpu[1-2]")
    if step is not None:
        env(SLURM_STEP_ID=step)
    assert not launch.launched()


def test_mpirun_inside_slurm_uses_mpi(env):
    """mpirun in an allocation: MPI's ranks, not the allocation's."""
    env(SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0, SLURM_STEP_ID=0, SLURM_JOB_ID=5,
        OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_LOCAL_RANK=3, OMPI_COMM_WORLD_LOCAL_SIZE=4)
    assert launch._from_env().rank == 3 and launch._from_env().launcher == "mpirun"


def test_job_port_differs_by_job(env):
    env(SLURM_JOB_ID=1, SLURM_STEP_ID=0)
    a = launch._job_port()
    env(SLURM_JOB_ID=2)
    assert launch._job_port() != a


def test_srun_pmi2_local_rank(env, monkeypatch):
    """srun --mpi=pmi2 sets PMI_RANK / PMI_SIZE only: the local rank (the GPU) comes from SLURM_LOCALID."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    env(PMI_RANK=5, PMI_SIZE=16, SLURM_PROCID=5, SLURM_NTASKS=16, SLURM_LOCALID=1, SLURM_STEP_ID=0,
        SLURM_STEP_NUM_NODES=2, SLURM_JOB_ID=9, MASTER_ADDR="gpu07", MASTER_PORT=4000)
    r = launch.discover()
    assert (r.rank, r.world, r.local_rank) == (5, 16, 1)


def test_pmi_without_a_local_rank_is_an_error(env):
    env(PMI_RANK=1, PMI_SIZE=2)
    with pytest.raises(launch.LaunchError, match="LOCAL_RANK"):
        launch._from_env()


def test_one_task_srun_step_launches_its_ranks(env):
    """srun --pty bash (or a notebook started by srun): one task, which launches the node's ranks."""
    env(SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_STEP_NUM_TASKS=1, SLURM_LOCALID=0, SLURM_STEP_ID=0, SLURM_JOB_ID=3)
    assert not launch.launched()


def test_stale_rank_in_the_shell_loses_to_mpirun(env, monkeypatch):
    env(RANK=0, WORLD_SIZE=1, OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=1,
        OMPI_COMM_WORLD_LOCAL_SIZE=2)
    assert launch._from_env().rank == 1 and launch._from_env().launcher == "mpirun"


def test_torchrun_under_srun_is_torchrun(env):
    env(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_STEP_ID=0, SLURM_JOB_ID=3,
        TORCHELASTIC_RUN_ID="r", RANK=5, WORLD_SIZE=16, LOCAL_RANK=5)
    assert launch._from_env() == launch.Rank(5, 16, 5, None, None, "torchrun")


def test_loopback_master_on_several_nodes_is_an_error(env):
    env(SLURM_PROCID=3, SLURM_NTASKS=16, SLURM_LOCALID=3, SLURM_STEP_ID=0, SLURM_STEP_NUM_NODES=2, SLURM_JOB_ID=3,
        MASTER_ADDR="localhost")
    with pytest.raises(launch.LaunchError, match="MASTER_ADDR=localhost is a loopback address"):
        launch.discover()
