"""kd-train's own rank code (``train.cli.main``) with test instruments, each switched on by an
environment variable:

- ``KD_TEST_GRADS=PATH``: the full gradients of the first optimizer step, saved by rank 0.
- ``KD_TEST_COUNTS=PATH``: JSON from rank 0, per step: forwards of the student's MLPs (a layer
  recomputed by activation checkpointing runs its MLP twice), DeepSpeed's backward prologues, and
  the optimizer's own settings (lr, betas, weight decay of each group) as the step applies them.
- ``KD_TEST_NAN=CALL[,CALL...]``: the fused loss of those calls (counted from 1 over the run, one
  call per micro-batch; run without data.eval, whose batches call it too) is made NaN on every
  rank, as a non-finite micro-batch would be.
- ``KD_TEST_MISSING_ON=RANK``: that rank's input checks find data.train missing, as when the file
  is on one node's local disk only.
- ``KD_TEST_KILL_IN_SHARD=N``: mode=cache-teacher's writer is SIGKILLed while it writes its N-th shard
  (counted from 1 on each writing rank), its temporary file written, not yet renamed.
- ``KD_TEST_MEMORY=PATH``: JSON from every rank (PATH.rank<N>): its resident memory when the engines
  start to be built, and its peak resident memory from then to the end of the last step (Linux's
  VmHWM, reset at that point through /proc/self/clear_refs).
"""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

import train.loop
import train.preflight
from train.cli import main
from train.launch import exit_process

counts = {"mlp_forwards": [0], "backward_prologues": [0]}
optimizer = []
captured = False
original_step = deepspeed.DeepSpeedEngine.step


def step_and_record(self, *args, **kwargs):
    global captured
    if self.optimizer is not None:
        optimizer.append([[g["lr"], list(g["betas"]), g["weight_decay"]] for g in self.optimizer.param_groups])
    if os.environ.get("KD_TEST_GRADS") and not captured:
        captured = True      # on every rank: the gather below is collective under ZeRO-3
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in self.module.named_parameters()}
        if dist.get_rank() == 0:
            torch.save(grads, os.environ["KD_TEST_GRADS"])
    out = original_step(self, *args, **kwargs)
    if self.optimizer is not None:
        for series in counts.values():
            series.append(0)
    return out


deepspeed.DeepSpeedEngine.step = step_and_record

if os.environ.get("KD_TEST_COUNTS"):
    original_prologue = deepspeed.DeepSpeedEngine._backward_prologue

    def prologue(self):
        counts["backward_prologues"][-1] += 1
        return original_prologue(self)

    deepspeed.DeepSpeedEngine._backward_prologue = prologue
    from transformers.models.llama import modeling_llama
    original_mlp = modeling_llama.LlamaMLP.forward

    def mlp_forward(self, *args, **kwargs):
        # inside the checkpointed layer: a recompute runs it again
        if self.training:                        # the student (the teacher is in eval mode)
            counts["mlp_forwards"][-1] += 1
        return original_mlp(self, *args, **kwargs)

    modeling_llama.LlamaMLP.forward = mlp_forward

nan_calls = {int(c) for c in os.environ.get("KD_TEST_NAN", "").split(",") if c}
if nan_calls:
    original_loss, calls = train.loop.kd.fused_distill_loss, [0]

    def loss_with_nan(*args, **kwargs):
        loss, stats = original_loss(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan"), stats) if calls[0] in nan_calls else (loss, stats)

    train.loop.kd.fused_distill_loss = loss_with_nan

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


if os.environ.get("KD_TEST_MEMORY"):
    memory = {}
    original_build, original_train_step = train.loop.engines.build, train.loop.train_step

    def build_and_measure(*args, **kwargs):
        import gc
        gc.collect()
        memory["before_models"] = _status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:      # "5": reset the peak (VmHWM) to the current RSS
            f.write("5")
        out = original_build(*args, **kwargs)
        memory["after_models"] = _status_kb("VmRSS") * 1024
        return out

    def step_and_measure(*args, **kwargs):
        out = original_train_step(*args, **kwargs)
        memory["peak"] = _status_kb("VmHWM") * 1024
        memory.setdefault("steps", []).append((_status_kb("VmRSS") * 1024, memory["peak"]))
        with open(f"{os.environ['KD_TEST_MEMORY']}.rank{os.environ['RANK']}", "w") as f:
            json.dump(memory, f)
        return out

    train.loop.engines.build, train.loop.train_step = build_and_measure, step_and_measure

if os.environ.get("KD_TEST_MISSING_ON"):
    original_check = train.preflight.check

    def check_missing_here(cfg, nproc):
        if os.environ["RANK"] == os.environ["KD_TEST_MISSING_ON"]:
            raise FileNotFoundError(f"data.train={cfg.data.train}: no such file or directory (on this node)")
        return original_check(cfg, nproc)

    train.preflight.check = check_missing_here

if os.environ.get("KD_TEST_KILL_IN_SHARD"):
    import signal

    import train.cache.store as store
    original_write, written = store._write_atomic, [0]

    def write_and_die(path, write):
        if path.name.startswith("shard-"):
            written[0] += 1
            if written[0] == int(os.environ["KD_TEST_KILL_IN_SHARD"]):
                write(path.with_name(f".{path.name}.tmp-{os.uname().nodename}-{os.getpid()}"))
                os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, write)

    store._write_atomic = write_and_die

code = main(sys.argv[1:])
if os.environ.get("KD_TEST_COUNTS") and int(os.environ.get("RANK", 0)) == 0:
    with open(os.environ["KD_TEST_COUNTS"], "w") as f:
        json.dump({**{k: v[:-1] for k, v in counts.items()}, "optimizer": optimizer}, f)
exit_process(code)
