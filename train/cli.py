"""kd-train: distil a teacher into a student with DeepSpeed, from a YAML recipe.

Not under a launcher, kd-train checks the config and every input first (a typo or a missing file fails
in a second, not after spawning ranks), then re-launches itself with the `deepspeed` launcher on
`parallel.nproc` ranks (2 on CPU, every GPU otherwise; DS_ACCELERATOR=cpu without a GPU). Under a
launcher (`deepspeed ... --module train RECIPE`, torchrun, mpirun) it runs as one rank, with the same checks.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

USER_ERRORS = ("ConfigError", "DataError", "TrainingError", "CheckpointError", "FileNotFoundError", "ParallelError",
               "ModelError")

EPILOG = """\
examples:
  kd-train                                          the CPU demo (data, tokenizer, teacher made here)
  kd-train recipes/demo.yaml train.steps=8 run_name=x
  kd-train runs/x/config.yaml                       continue a run from its newest checkpoint
  deepspeed --hostfile hosts --module train RECIPE  already launched: kd-train runs as one rank

overrides are dotted keys: train.steps=8, loss.params.k=16, data.pack=true, train.betas=[0.9,0.99].
Every key, its default and its check: train/config.py (the README lists the stable ones).
A run lives in output_dir/run_name; an existing run is continued with resume=auto, never overwritten
unless overwrite=true (which moves it aside). SIGTERM or Ctrl-C: the step finishes, a checkpoint is
saved, the run exits 0.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-train", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1] + "\n" + EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="YAML recipe (or a run's config.yaml); none: the CPU demo")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted settings that replace the recipe's")
    from .plan import add_arguments
    add_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)   # the deepspeed launcher's
    return p


PARENT_ENV = "KD_TRAIN_PARENT"      # the pid of the self-launching kd-train, for its ranks to watch


def launched() -> bool:
    return any(v in os.environ for v in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def default_nproc() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: str, overrides: list[str], nproc: int) -> int:
    """Run this recipe on ``nproc`` local ranks through the deepspeed launcher; its exit code.

    The launcher runs in a session of its own, so Ctrl-C in the terminal reaches only this process,
    which passes it to the ranks: they finish the step, save and exit 0, and the launcher (which
    would SIGKILL them 30 s after a signal of its own) sees clean exits. A closed terminal (SIGHUP)
    stops them the same way, and so does this process's death (the ranks watch ``PARENT_ENV``)."""
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


def fail(err: BaseException) -> int:
    """Print a user error once: by rank 0, or by every rank that alone saw it (``rank_local``)."""
    rank = int(os.environ.get("RANK", "0"))
    if getattr(err, "rank_local", False) and launched():
        print(f"\nkd-train: error (rank {rank}): {err}\n", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"\nkd-train: error: {err}\n", file=sys.stderr, flush=True)
    return 2


def exit_process(code: int):
    """Leave with ``code``. A rank skips the interpreter's teardown: by then its files are written and
    its process group destroyed, and communicator threads torn down at exit have aborted finished
    runs ("terminate called without an active exception": 2 runs in 45 on a busy 2-core machine)."""
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        mpi = sys.modules.get("mpi4py.MPI")     # under mpirun: a rank that skips MPI_Finalize "exits improperly"
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from .config import load_config
    try:
        if args.recipe is None and args.plan:      # the demo's plan, not the demo
            from .demo import RECIPE
            args.recipe = str(RECIPE)
        if args.recipe is None:
            from . import demo
            return demo.main([])
        cfg = load_config(args.recipe, args.overrides)
        if args.plan:               # shapes only: no weights loaded, no ranks launched
            from .plan import render
            print(render(cfg, args.gpu_memory_gb, args.mfu, args.peak_tflops))
            return 0
        if not launched():
            from . import demo, preflight
            if demo.is_demo_recipe(args.recipe):
                demo.ensure_prerequisites(cfg)
            nproc = cfg.parallel.nproc or default_nproc()
            plan = preflight.check(cfg, nproc)
            if plan.universal:          # here, in one process: a conversion can outlast the ranks' timeouts
                from .checkpoint import make_universal
                print(f"kd-train: converting {plan.resume[1]} to a universal checkpoint for {nproc} ranks",
                      flush=True)
                make_universal(*plan.resume)
            return launch(args.recipe, args.overrides, nproc)
        from .loop import run
        run(cfg)
        import torch.distributed as dist
        if dist.is_initialized():   # leave with no live communicator threads (they can abort the exit)
            dist.barrier()
            dist.destroy_process_group()
    except Exception as e:  # user errors: one paragraph, no traceback; bugs keep theirs
        if type(e).__name__ in USER_ERRORS:
            return fail(e)
        raise
    return 0


if __name__ == "__main__":
    exit_process(main())
