"""kd-train: ``kd-train RECIPE.yaml [dotted.key=value ...]``; with no arguments, the CPU demo.

Not under a launcher, it checks the config (so a typo fails in a second, not after spawning
ranks), prepares the demo's data and teacher when the recipe points at them, and re-launches
itself with the ``deepspeed`` launcher (``parallel.nproc`` ranks; 2 on CPU, every GPU otherwise;
``DS_ACCELERATOR=cpu`` without a GPU). Under a launcher (``deepspeed ... -m train RECIPE``, MPI,
torchrun) it just runs.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

USER_ERRORS = ("ConfigError", "DataError", "TrainingError", "CheckpointError", "FileNotFoundError", "ParallelError")


def launched() -> bool:
    return any(v in os.environ for v in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def default_nproc() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: str, overrides: list[str], nproc: int) -> int:
    """Run this recipe on ``nproc`` local ranks through the deepspeed launcher; its exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(nproc),
           "--master_port", str(_free_port()), "--module", "train", recipe, *overrides]
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        # To the ranks themselves: they finish the step, save and exit 0, and the launchers, left
        # running, see clean exits (the deepspeed runner would die without passing it on).
        import psutil
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(a.startswith("--local_rank") for a in child.cmdline()):
                    child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


def preflight(cfg, nproc: int) -> None:
    """Missing inputs and impossible parallel settings fail here, in a second, rather than after the
    ranks have started."""
    from .models import PRESETS
    paths = {"data.train": cfg.data.train, "data.eval": cfg.data.eval, "data.tokenizer": cfg.data.tokenizer,
             "model.student_init": cfg.model.student_init}
    paths.update({f"model.{k}": v for k, v in (("student", cfg.model.student), ("teacher", cfg.model.teacher))
                  if v not in PRESETS})
    if cfg.loss.method == "sft":
        paths.pop("model.teacher", None)
    for key, value in paths.items():
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{key}={value}: no such file or directory (paths are relative to "
                                    f"{Path.cwd()}, where kd-train runs)")
    sp = cfg.parallel.sequence
    if sp > 1:
        from .models import model_config, resolve_attention
        from .parallel import check_model, check_world
        check_world(sp, nproc)
        models = {"student": cfg.model.student_init or cfg.model.student}
        if cfg.loss.method != "sft":
            models["teacher"] = cfg.model.teacher
        for role, spec in models.items():
            conf = model_config(spec)
            check_model(conf, f"model.{role}={spec}", sp, resolve_attention(cfg.model.attn_implementation, conf))


def fail(err: BaseException) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"\nkd-train: error: {err}\n", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]   # the deepspeed launcher adds it
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from .config import load_config
    try:
        if not argv:
            from . import demo
            return demo.main()
        recipe, overrides = argv[0], argv[1:]
        cfg = load_config(recipe, overrides)
        if not launched():
            from . import demo
            demo.ensure_prerequisites(cfg)
            nproc = cfg.parallel.nproc or default_nproc()
            preflight(cfg, nproc)
            return launch(recipe, overrides, nproc)
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
    sys.exit(main())
