"""Processes: which rank this process is, how kd-train starts its own ranks, and how a rank leaves.

kd-train runs either as one rank of somebody else's job or as the parent of its own ranks.

Under a launcher, ``discover()`` reads the rank from whichever launcher started the process and
exports torch's names (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
so the rest of the code (``deepspeed.init_distributed``, the device choice) sees one convention:

    deepspeed, torchrun      RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, as set by them
    mpirun (OpenMPI)         OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}
    mpiexec (MPICH, Intel)   PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
    srun (SLURM)             SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NUM_NODES

The master address and port are the user's MASTER_ADDR / MASTER_PORT when set. Otherwise: under MPI
with mpi4py (the ``mpi`` extra), rank 0 sends its address and a free port to every rank; under
srun, the step's first node (``scontrol show hostnames``) and a port derived from the job and step
ids, the same on every rank; on one node, 127.0.0.1. A multi-node MPI job without mpi4py and
without MASTER_ADDR is an error that says so.

Not under a launcher, ``start()`` checks the recipe's inputs in this one process (a typo fails in a
second, before any rank starts) and re-launches kd-train with the deepspeed launcher on local ranks.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

PARENT_ENV = "KD_TRAIN_PARENT"      # the pid of the self-launching kd-train, for its ranks to watch
USER_ERRORS = ("ConfigError", "DataError", "TrainingError", "CheckpointError", "FileNotFoundError", "ParallelError",
               "ModelError", "LaunchError", "CacheError")
DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The launcher's environment does not say enough to join the ranks; the message says what to set."""


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    local_world: int | None     # None: the launcher does not say
    nodes: int | None           # None: the launcher does not say
    launcher: str

    @property
    def one_node(self) -> bool:
        return self.nodes == 1 or self.local_world == self.world


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _srun_step() -> bool:
    """A task of an srun step of several tasks. Not the batch script (which also carries
    SLURM_PROCID=0 and the job's SLURM_NTASKS), nor a one-task step such as ``srun --pty bash``:
    each is one process that launches its node's ranks itself."""
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
    tasks = _int("SLURM_STEP_NUM_TASKS") or _int("SLURM_NTASKS") or 1
    # the batch and extern steps have reserved ids near 2^32
    return ("SLURM_PROCID" in os.environ and step is not None and step.isdigit() and int(step) < 0xFFFFFF00
            and tasks > 1)


# where process managers put the node-local rank beside PMI_RANK: MPICH/Intel MPI's Hydra, Cray PALS,
# Flux, and SLURM's pmi2 plugin (which sets only PMI_RANK/PMI_SIZE; SLURM_LOCALID has it)
PMI_LOCAL_RANK = ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "FLUX_TASK_LOCAL_ID", "SLURM_LOCALID")


def _pmi_local_rank() -> int:
    for name in PMI_LOCAL_RANK:
        if _int(name) is not None:
            return _int(name)
    raise LaunchError(f"the process manager set PMI_RANK={os.environ['PMI_RANK']} but none of "
                      f"{', '.join(PMI_LOCAL_RANK)}, so this rank's GPU on its node is unknown. Export LOCAL_RANK "
                      "(the rank's index on its node) to each rank, or launch with mpiexec (Hydra), srun or torchrun.")


def _from_env() -> Rank | None:
    """This process's rank from its launcher's variables; None when no launcher started it. torchrun
    first (it may run under srun or mpirun, one agent per node), then MPI (before RANK: a RANK left
    in the user's shell reaches every rank mpirun starts), the deepspeed launcher, srun."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and not _mpi_vars()):
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "deepspeed"
            return Rank(_int("RANK"), _int("WORLD_SIZE"), _int("LOCAL_RANK") or 0, _int("LOCAL_WORLD_SIZE"), None,
                        launcher)
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        return Rank(_int("OMPI_COMM_WORLD_RANK"), _int("OMPI_COMM_WORLD_SIZE"), _int("OMPI_COMM_WORLD_LOCAL_RANK"),
                    _int("OMPI_COMM_WORLD_LOCAL_SIZE"), None, "mpirun")
    if "PMI_RANK" in os.environ:
        return Rank(_int("PMI_RANK"), _int("PMI_SIZE"), _pmi_local_rank(), _int("MPI_LOCALNRANKS"),
                    _int("SLURM_STEP_NUM_NODES") if _srun_step() else None, "mpiexec")
    if _srun_step():
        return Rank(_int("SLURM_PROCID"), _int("SLURM_STEP_NUM_TASKS") or _int("SLURM_NTASKS"), _int("SLURM_LOCALID"),
                    None, _int("SLURM_STEP_NUM_NODES") or _int("SLURM_NNODES"), "srun")
    return None


def _mpi_vars() -> bool:
    return "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ


def launched() -> bool:
    """True in a rank started by a launcher (kd-train's own launch included)."""
    return _from_env() is not None


def rank() -> int:
    """This process's global rank (0 when not launched); no communication."""
    found = _from_env()
    return found.rank if found else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _job_port() -> int:
    """A port every rank derives alike from the job's id (two jobs on a node rarely collide), below
    Linux's ephemeral ports (32768 and up), which the system hands out to outgoing connections."""
    job = next((os.environ[k] for k in ("SLURM_JOB_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_KVSNAME")
                if k in os.environ), None)
    if job is None:
        return DEFAULT_PORT
    return 20000 + zlib.crc32(job.encode()) % 12000


def _srun_master() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if nodelist and not any(c in nodelist for c in "[,"):
        return nodelist                                  # a single plain host name
    scontrol = shutil.which("scontrol")
    if scontrol and nodelist:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    raise LaunchError(f"srun started {_int('SLURM_NTASKS')} ranks on the nodes {nodelist or '(unknown)'}, and "
                      "their first host could not be found (no `scontrol show hostnames`). Export MASTER_ADDR (the "
                      "first node's host name) and MASTER_PORT in the batch script before srun, as "
                      "scripts/slurm/kd-train.sbatch does.")


def _routable_address() -> str | None:
    """An IPv4 address of this host's name that other hosts can reach: not a loopback one (Debian
    maps a host's own name to 127.0.1.1)."""
    with contextlib.suppress(OSError):
        for *_, (addr, _port) in socket.getaddrinfo(socket.getfqdn(), None, socket.AF_INET):
            if not addr.startswith("127."):
                return addr
    return None


def _mpi_master(found: Rank) -> tuple[str, int]:
    """Rank 0's address and port, sent to every rank by mpi4py; every rank takes part, whatever its
    own environment says (ranks on other nodes may lack the MASTER_* that rank 0 has). An error goes
    out the same way, so that every rank raises it rather than wait for rank 0."""
    import mpi4py
    mpi4py.rc.finalize = False              # exit_process finalizes; a crashed rank must not wait in it
    from mpi4py import MPI
    mine = None
    if found.rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if found.one_node else _routable_address())
        if _loopback(addr) and not found.one_node:
            addr = None
        mine = (addr, int(os.environ.get("MASTER_PORT") or _free_port())) if addr else (
            f"{found.launcher} started {found.world} ranks on several nodes, and rank 0's host name "
            f"{socket.getfqdn()!r} (or its MASTER_ADDR) is only a loopback address, which the other nodes cannot reach. "
            "Export MASTER_ADDR (rank 0's address on the network the nodes share) to every rank "
            "(mpirun -x MASTER_ADDR).")
    sent = MPI.COMM_WORLD.bcast(mine, root=0)
    if isinstance(sent, str):
        raise LaunchError(sent)
    return sent


def _loopback(addr: str | None) -> bool:
    return addr is not None and (addr == "localhost" or addr.startswith("127.") or addr == "::1")


def _master(found: Rank) -> tuple[str, int]:
    addr, port = os.environ.get("MASTER_ADDR"), _int("MASTER_PORT")
    if found.launcher in ("deepspeed", "torchrun"):
        return addr or "127.0.0.1", port or DEFAULT_PORT
    if _loopback(addr) and not found.one_node:
        raise LaunchError(f"MASTER_ADDR={addr} is a loopback address, but {found.launcher} started ranks on several "
                          "nodes, which cannot reach it. Unset MASTER_ADDR (a value left in the shell?) or set it to "
                          "rank 0's address on the network the nodes share.")
    if found.launcher in ("mpirun", "mpiexec"):
        with contextlib.suppress(ImportError):
            import mpi4py  # noqa: F401
            return _mpi_master(found)
        if addr is None and not found.one_node:
            raise LaunchError(f"{found.launcher} started {found.world} ranks on several nodes, and without mpi4py "
                              "they cannot learn the first rank's address. Install the mpi extra (pip install "
                              "'kd-stack[mpi]'), or export MASTER_ADDR (rank 0's host) and MASTER_PORT to every rank "
                              "(mpirun -x MASTER_ADDR -x MASTER_PORT).")
        return addr or "127.0.0.1", port or _job_port()
    if addr is None:
        addr = "127.0.0.1" if found.one_node else _srun_master()
    return addr, port or _job_port()


_DISCOVERED: Rank | None = None


def discover() -> Rank:
    """This rank, with torch's variables exported for ``deepspeed.init_distributed``; a
    ``LaunchError`` when the launcher's environment is not enough. Call once, before anything else
    of the run: under MPI every rank must take part (rank 0's address is broadcast)."""
    global _DISCOVERED
    if _DISCOVERED is None:
        found = _from_env()
        if found is None:
            raise LaunchError("kd-train was not started by a launcher (deepspeed, torchrun, mpirun, srun)")
        addr, port = _master(found)
        os.environ.update(RANK=str(found.rank), WORLD_SIZE=str(found.world), LOCAL_RANK=str(found.local_rank),
                          MASTER_ADDR=addr, MASTER_PORT=str(port))
        if found.local_world is not None:
            os.environ["LOCAL_WORLD_SIZE"] = str(found.local_world)
        _DISCOVERED = found
    return _DISCOVERED


def device_index(me: Rank) -> int:
    """This rank's GPU among those it sees: its local rank, or the only one when the launcher binds
    one GPU per task (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES set per rank)."""
    import torch
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if me.local_rank >= count:
        raise LaunchError(f"rank {me.rank} is local rank {me.local_rank} on its node but sees {count} GPUs "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Each rank must "
                          "see all of its node's GPUs, or exactly one: launch one rank per GPU.")
    return me.local_rank


def agree(failure: BaseException | None, device) -> None:
    """After every rank's input checks, once the ranks have joined: raise on every rank if any failed,
    so that none goes on to wait in a collective for a rank that left. A rank that failed raises its
    own error (printed by itself when only some failed: a file missing on one node); the others raise
    one that rank 0 prints."""
    import torch.distributed as dist
    from kd.reduce import all_reduce_values
    failed, = all_reduce_values([float(failure is not None)], dist.group.WORLD, "sum", device)
    if not failed:
        return
    world = dist.get_world_size()
    if failure is not None:
        failure.rank_local = failed < world
        raise failure
    raise LaunchError(f"{int(failed)} of {world} ranks failed their input checks (their errors are above); "
                      "the inputs differ between nodes: check that every node sees the same files.")


def join(cfg):
    """This rank's start under any launcher: its GPU, the input checks (``preflight.check``, its failure
    held back), the process group, then ``agree`` so that one rank's bad input stops them all.
    Returns ``(plan, device)``."""
    import torch

    from . import parallel, preflight
    me = discover()
    if torch.cuda.is_available():               # the device of this node's rank, not of the global rank
        torch.cuda.set_device(device_index(me))
    plan, failure = None, None
    try:                                        # every rank, before anything is written
        plan = preflight.check(cfg, me.world)
    except Exception as e:
        if not is_user_error(e):
            raise
        failure = e
    parallel.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    agree(failure, device)
    return plan, device


def default_nproc() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def start(recipe: str, overrides: list[str], cfg=None) -> int:
    """``kd-train RECIPE`` from outside any launcher: check everything here, convert a checkpoint for
    another world size once, then run the ranks (``self_launch``); their exit code."""
    from . import preflight
    from .config import load_config
    cfg = cfg or load_config(recipe, overrides)
    nproc = cfg.parallel.nproc or default_nproc()
    plan = preflight.check(cfg, nproc)
    if plan.universal:          # here, in one process: a conversion can outlast the ranks' timeouts
        from .checkpoint import make_universal
        print(f"kd-train: converting {plan.resume[1]} to a universal checkpoint for {nproc} ranks", flush=True)
        make_universal(*plan.resume)
    return self_launch(recipe, overrides, nproc)


def self_launch(recipe: str, overrides: list[str], nproc: int) -> int:
    """Run this recipe on ``nproc`` local ranks through the deepspeed launcher; its exit code.

    The launcher runs in a session of its own, so Ctrl-C in the terminal reaches only this process,
    which passes it to the ranks: they finish the step, save and exit 0, and the launcher (which
    would SIGKILL them 30 s after a signal of its own) sees clean exits. A closed terminal (SIGHUP)
    stops them the same way, and so does this process's death (the ranks watch ``PARENT_ENV``)."""
    import torch

    from .preflight import CHECKED_ENV
    env = {**os.environ, CHECKED_ENV: "1", PARENT_ENV: str(os.getpid())}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(nproc),
           "--master_port", str(_free_port()), "--module", "train", recipe, *overrides]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        import psutil
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(a.startswith("--local_rank") for a in child.cmdline()):
                    child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def is_user_error(err: BaseException) -> bool:
    return type(err).__name__ in USER_ERRORS


def reporting(fn, *args) -> int:
    """``fn(*args)``'s exit code; a user error is reported (one paragraph, no traceback) and gives 2,
    a bug keeps its traceback."""
    try:
        return fn(*args)
    except Exception as e:
        if not is_user_error(e):
            raise
        return report(e)


_ALONE = False      # this rank reported an error the others did not see (exit_process)


def report(err: BaseException) -> int:
    """Print a user error once: by rank 0, or by the one rank that alone saw it (``rank_local``); 2."""
    global _ALONE
    _ALONE = bool(getattr(err, "rank_local", False))
    me = rank()
    if _ALONE and launched():
        print(f"\nkd-train: error (rank {me}): {err}\n", file=sys.stderr, flush=True)
    elif me == 0:
        print(f"\nkd-train: error: {err}\n", file=sys.stderr, flush=True)
    return 2


def exit_process(code: int):
    """Leave with ``code``. A rank skips the interpreter's teardown: by then its files are written and
    its process group destroyed, and communicator threads torn down at exit have aborted finished
    runs ("terminate called without an active exception": 2 runs in 45 on a busy 2-core machine).
    Under mpirun every rank leaving together passes MPI_Finalize (a rank that skips it "exits
    improperly"); a rank leaving alone (it reported an error only it saw) skips it, since MPI_Finalize
    would wait for ranks still busy, and mpirun ends the job when it sees that rank's exit code."""
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and not (_ALONE and code):
            mpi.Finalize()
        os._exit(code)
    sys.exit(code)
