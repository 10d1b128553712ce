"""Worker for test_sp: kd-train's own rank code (``train.cli.main``), with ``DeepSpeedEngine.step``
instrumented to save the full gradients of the first optimizer step to ``$KD_TEST_GRADS``."""
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from train.cli import main

captured = False
original_step = deepspeed.DeepSpeedEngine.step


def step_and_capture(self, *args, **kwargs):
    global captured
    if not captured and self.is_gradient_accumulation_boundary():
        captured = True      # on every rank: the gather below is collective under ZeRO-3
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in self.module.named_parameters()}
        if dist.get_rank() == 0:
            torch.save(grads, os.environ["KD_TEST_GRADS"])
    return original_step(self, *args, **kwargs)


deepspeed.DeepSpeedEngine.step = step_and_capture
sys.exit(main(sys.argv[1:]))
