"""Process groups: starting torch.distributed, and sequence parallelism (Ulysses) for both engines."""
from __future__ import annotations

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator


def init_distributed() -> None:
    """nccl on GPU, gloo on CPU.

    On CPU, DeepSpeed builds its shared-memory all-reduce kernel at the first init. Only
    tensor-parallel inference uses it, and the C++ build takes 10+ minutes on a 2-core machine; a
    build killed midway leaves a lock file that hangs every later run. Marking the op unavailable
    makes DeepSpeed use plain gloo collectives, which is all the training path needs.
    """
    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
