"""kd-train: distil a teacher into a student with DeepSpeed, from a YAML recipe.

Not under a launcher, kd-train checks the config and every input first (a typo or a missing file fails
in a second, not after spawning ranks), then re-launches itself with the `deepspeed` launcher on
`parallel.nproc` ranks (2 on CPU, every GPU otherwise; DS_ACCELERATOR=cpu without a GPU). Under a
launcher (`deepspeed ... --module train RECIPE`, torchrun, mpirun, srun) it runs as one rank, with the
same checks (train/launch.py).
"""
from __future__ import annotations

import argparse
import sys

from . import launch
from .launch import exit_process

EPILOG = """\
examples:
  kd-train                                          the CPU demo (data, tokenizer, teacher made here)
  kd-train recipes/demo.yaml train.steps=8 run_name=x
  kd-train runs/x/config.yaml                       continue a run from its newest checkpoint
  kd-train RECIPE --plan                            memory and FLOPs per GPU, nothing loaded
  kd-train RECIPE mode=cache-teacher cache.out=DIR  the teacher's top-k over data.train, once (--dry-run: its size)
  kd-train RECIPE model.teacher=cache:DIR           train from that cache: no teacher engine
  deepspeed --hostfile hosts --module train RECIPE  already launched: kd-train runs as one rank
  torchrun --nproc-per-node 8 -m train RECIPE       (also mpirun -np 16 python -m train RECIPE)
  sbatch --nodes=4 scripts/slurm/kd-train.sbatch RECIPE   SLURM: one rank per GPU, started by srun

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
    p.add_argument("--dry-run", action="store_true",
                   help="with mode=cache-teacher: the cache's tokens, bytes per token and size; nothing is written")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)   # the deepspeed launcher's
    return p


def main(argv: list[str] | None = None) -> int:
    """kd-train's exit code; a user error is one paragraph (no traceback), a bug keeps its traceback."""
    return launch.reporting(_main, parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv))


def _main(args: argparse.Namespace) -> int:
    from .config import load_config
    if args.recipe is None and args.plan:      # the demo's plan, not the demo
        from .demo import RECIPE
        args.recipe = str(RECIPE)
    if args.recipe is None:
        from . import demo
        return demo.main([])
    ranks = launch.launched() and not (args.plan or args.dry_run)
    if ranks:                   # first: under MPI every rank takes part (rank 0's address is broadcast)
        launch.discover()
    cfg = load_config(args.recipe, args.overrides)
    if args.plan:               # shapes only: no weights loaded, no ranks launched
        from .plan import render
        print(render(cfg, args.gpu_memory_gb, args.mfu, args.peak_tflops))
        return 0
    if args.dry_run:
        return _dry_run(cfg)
    if not ranks:
        from . import demo
        if demo.is_demo_recipe(args.recipe):
            demo.ensure_prerequisites(cfg)
        return launch.start(args.recipe, args.overrides, cfg)
    if cfg.mode == "cache-teacher":
        from .cache import build
        build(cfg)
    else:
        from .loop import run
        run(cfg)
    import torch.distributed as dist
    if dist.is_initialized():   # leave with no live communicator threads (they can abort the exit)
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _dry_run(cfg) -> int:
    from .config import ConfigError
    if cfg.mode != "cache-teacher":
        raise ConfigError("--dry-run describes the cache of mode=cache-teacher; add mode=cache-teacher (or use "
                          "--plan for a training run's memory)")
    from . import preflight
    from .cache import distill_vocab, plan_text
    from .tokenizer import load_tokenizer
    preflight.check(cfg, cfg.parallel.nproc or launch.default_nproc())
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.student)
    print(plan_text(cfg, tokenizer, distill_vocab(cfg, tokenizer)))
    return 0


if __name__ == "__main__":
    exit_process(main())
