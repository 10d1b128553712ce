"""kd-train under the launchers users have, against its own self-launch (the deepspeed launcher it
starts itself): torchrun, mpirun (OpenMPI + mpi4py, the `mpi` extra) and the user's own `deepspeed`
command (with --num_gpus, and with a one-node hostfile), each on 2 CPU ranks, give the same per-step
losses; a user error under torchrun or mpirun is printed once. mpirun needs system packages:
`make test-launchers` installs them (openmpi-bin, libopenmpi-dev, the mpi extra) and runs this file;
without them that case is skipped with the reason."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LAUNCH_COMMON, REPO, metrics
from .launch import free_port

pytestmark = pytest.mark.dist

BIN = Path(sys.executable).parent
COMMON = list(LAUNCH_COMMON)


def _launch(cmd: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _mpi_missing() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not found (OpenMPI: apt-get install openmpi-bin libopenmpi-dev; or `make test-launchers`)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install -e '.[mpi]'; or `make test-launchers`)"
    return None


def _losses(kd_setup, name):
    return [r["loss"] for r in metrics(kd_setup / "runs" / name)]


def _torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "train", *args]


def _mpirun(*args: str) -> list[str]:
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR", "-x",
            "OMP_NUM_THREADS", "-x", "PATH", sys.executable, "-m", "train", *args]


def test_torchrun_equals_self_launch(kd_setup, self_launched):
    _launch(_torchrun(str(kd_setup / "recipe.yaml"), "run_name=torchrun", *COMMON))
    assert _losses(kd_setup, "torchrun") == pytest.approx(self_launched, rel=1e-5)


def test_deepspeed_launcher_equals_self_launch(kd_setup, self_launched):
    """The user's own `deepspeed` command: kd-train finds itself launched and runs as one rank."""
    _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "train",
             str(kd_setup / "recipe.yaml"), "run_name=deepspeed", *COMMON])
    assert _losses(kd_setup, "deepspeed") == pytest.approx(self_launched, rel=1e-5)


def test_deepspeed_hostfile_equals_self_launch(kd_setup, self_launched, tmp_path):
    """A one-node hostfile. The launcher checks each host over ssh and asks the first one for its
    address (ssh HOST hostname -I) unless told: --no_ssh_check and --master_addr, as on a node
    without sshd; with one host it then starts the ranks itself, as --num_gpus does."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    _launch([str(BIN / "deepspeed"), "--hostfile", str(hosts), "--no_ssh_check", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "--module", "train", str(kd_setup / "recipe.yaml"),
             "run_name=hostfile", *COMMON])
    assert _losses(kd_setup, "hostfile") == pytest.approx(self_launched, rel=1e-5)


def test_mpirun_equals_self_launch(kd_setup, self_launched):
    why = _mpi_missing()
    if why:
        pytest.skip(why)
    # train/launch.py reads rank and world from OpenMPI's variables, rank 0 sends its address and a free
    # port through mpi4py; each rank leaves through MPI_Finalize, which mpirun requires of a clean exit
    proc = _launch(_mpirun(str(kd_setup / "recipe.yaml"), "run_name=mpirun", *COMMON))
    assert "exiting improperly" not in proc.stdout + proc.stderr
    assert _losses(kd_setup, "mpirun") == pytest.approx(self_launched, rel=1e-5)


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_user_error_printed_once_before_ranks_join(kd_setup, launcher):
    """Under an external launcher every rank runs the self-launch's input checks before joining the
    others: a missing file stops all of them, rank 0 says so once, and nothing is written."""
    if launcher == "mpirun" and _mpi_missing():
        pytest.skip(_mpi_missing())
    name = f"bad-{launcher}"
    args = (str(kd_setup / "recipe.yaml"), f"run_name={name}", "data.train=no/such/train.jsonl", *COMMON)
    proc = _launch(_torchrun(*args) if launcher == "torchrun" else _mpirun(*args), timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("kd-train: error") == 1, out[-3000:]
    assert "data.train=no/such/train.jsonl: no such file" in out
    assert not (kd_setup / "runs" / name).exists()


def test_mpi_rank0_address_problem_stops_every_rank(tmp_path):
    """Several nodes, no MASTER_ADDR, and rank 0's host name resolving to loopback only (as on this
    machine): rank 0 cannot give an address the others reach; every rank raises the same error
    instead of waiting for it. (The two "nodes" are 2 ranks whose one_node is forced False.)"""
    why = _mpi_missing()
    if why:
        pytest.skip(why)
    from train import launch
    if launch._routable_address() is not None:
        pytest.skip("this host's name resolves to a routable address: rank 0 would send it")
    script = tmp_path / "probe.py"
    script.write_text("import pathlib, sys\nfrom train import launch\nlaunch.Rank.one_node = property(lambda self: False)\n"
                      "try:\n    launch.discover()\nexcept launch.LaunchError as e:\n"
                      "    pathlib.Path(sys.argv[1], f'rank{launch.rank()}').write_text(str(e))\n"
                      "    launch.exit_process(0)\nlaunch.exit_process(3)\n")
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PATH", "-x",
                           "PYTHONPATH", sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    # each rank records the error and leaves 0 (a rank leaving non-zero makes mpirun kill the others)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert "is only a loopback address" in (tmp_path / f"rank{rank}").read_text()


def test_input_missing_on_one_rank_stops_every_rank(kd_setup, tmp_path):
    """A file one rank cannot see (another node's local disk): that rank says so with its rank, rank 0
    says how many failed, and every rank leaves instead of waiting in a collective."""
    from .launch import run_deepspeed
    proc = run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", f"output_dir={tmp_path}",
                         "run_name=one-rank", *COMMON, env={"KD_TEST_MISSING_ON": "1"}, check=False, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("kd-train: error (rank 1): data.train=") == 1, out[-3000:]
    assert out.count("kd-train: error: 1 of 2 ranks failed their input checks") == 1, out[-3000:]
    assert not (tmp_path / "one-rank").exists()
