"""Every engine is built here: the ZeRO-3 student (optimizer, trained) and the frozen ZeRO-3 teacher
(inference: no optimizer state), from the ds_configs/ defaults via ``config.ds_config``.

Both are driven the same way by the loop. ``forward_hidden`` runs the DeepSpeed engine, whose module
(``HiddenStates``) returns the decoder's final hidden states: the tensor the fused loss consumes is
the engine's own output, so DeepSpeed's backward hooks on its outputs run as they do for any model,
and no lm head runs inside the forward. ``gathered_head`` holds the full lm-head weight for the fused
loss and, for the student, its backward.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID as ZERO12_INITIAL_MICRO_STEP
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from transformers.integrations import HfDeepSpeedConfig

from . import models
from .config import torch_dtype
from .parallel import SequenceParallel


class HiddenStates(torch.nn.Module):
    """A causal LM as its engine sees it: the same submodules under the same names (checkpoints, ZeRO
    partitions and HF exports keep the model's own parameter names), but ``forward`` stops at the
    final norm and returns the hidden states ``[B, T, H]``; the lm head stays out of the forward."""

    def __init__(self, lm):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        own = [n for n, _ in lm.named_parameters(recurse=False)] + [n for n, _ in lm.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"{type(lm).__name__} holds tensors outside its submodules ({own}); not supported")
        self.base = lm.base_model_prefix

    def forward(self, **inputs) -> torch.Tensor:
        return getattr(self, self.base)(**inputs).last_hidden_state


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine   # its module is HiddenStates(model)
    model: torch.nn.Module              # the HF causal LM: config, lm head, save_pretrained
    zero3: bool

    @property
    def softcap(self) -> float | None:
        return models.final_logit_softcap(self.model)

    def forward_hidden(self, batch: dict) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the final norm): the engine's output."""
        return self.engine(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"), use_cache=False)

    @contextlib.contextmanager
    def gathered_head(self):
        """The full lm-head weight (a ZeRO-3 gather once per micro-batch; a no-op without ZeRO-3)."""
        weight = models.lm_head_weight(self.model)
        ctx = deepspeed.zero.GatheredParameters([weight], modifier_rank=None) if self.zero3 \
            else contextlib.nullcontext()
        with ctx:
            yield weight


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup from 0, then cosine decay
    to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def set_optimizer_settings(student: Engine, step: int, cfg) -> float:
    """The LR of optimizer step ``step`` and the run's betas and weight decay, set on every step;
    returns the LR. The LR is a function of the step, not a scheduler's state: a skipped step cannot
    put it out of phase. All three come from this run's settings, not from a checkpoint's optimizer
    state (whose hyperparameters ``load_state_dict`` restores), so a resumed run with a new
    ``train.lr``, ``train.betas`` or ``train.weight_decay`` uses the new values from its first step."""
    t = cfg.train
    lr = t.lr * warmup_cosine(step, t.warmup_steps, t.steps, t.min_lr_ratio)
    for i, group in enumerate(student.engine.optimizer.param_groups):
        group.update(lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay if group.get("decay", i == 0) else 0.0)
    return lr


def discard_gradients(student: Engine) -> None:
    """Drop the gradients accumulated since the last step (a step abandoned midway), so that the
    next backward starts afresh. DeepSpeed clears them only inside a step: after an update, or
    (ZeRO-1/2) when it skips an overflowing one; this does what those do, without the step.
    ``tests/dist/test_steps.py`` checks every ZeRO stage, offload included."""
    engine = student.engine
    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):          # ZeRO-1/2: its overflow branch's clean-up
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
            opt._offload_accumulated_param_ids = set()
        else:        # the accumulator of the step's earlier micro-batches, and the step's own
            for grads in (opt.all_grad_tensors, opt.averaged_gradients):
                for k in grads:
                    grads[k] = None
        opt.micro_step_id = ZERO12_INITIAL_MICRO_STEP   # the next backward copies instead of adding
    elif engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        opt.zero_grad()                                  # ZeRO-3 also restarts its accumulation here
    engine.zero_grad()


def _param_groups(model, weight_decay: float):
    """No weight decay on norms and biases (1-D tensors). Under ZeRO-3 every local tensor is a
    1-D shard: the full shape is ``ds_shape``. ``decay`` marks the group for
    ``set_optimizer_settings``."""
    def matrix(p):
        return len(getattr(p, "ds_shape", p.shape)) >= 2
    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def _zero3(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("stage", 0) == 3


def build_student(cfg, ds: dict, vocab_size: int | None, sp: SequenceParallel) -> Engine:
    # Must be alive while the model is created, so from_pretrained/from_config build ZeRO-3 shards.
    _keep = HfDeepSpeedConfig(ds) if _zero3(ds) else None  # noqa: F841
    spec = cfg.model.student_init or cfg.model.student
    model = models.load_causal_lm(spec, torch_dtype(cfg.model.dtype), cfg.model.attn_implementation, vocab_size,
                                  seed=cfg.train.seed)
    sp.attach(model, f"model.student={spec}")
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained returns a model in eval mode, where transformers skips activation
    # checkpointing and dropout: the student trains in train mode from its first step.
    model.train()
    t = cfg.train
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    engine, *_ = deepspeed.initialize(model=HiddenStates(model), optimizer=opt, config=ds)
    return Engine(engine, model, _zero3(ds))


def build_teacher(cfg, ds: dict, vocab_size: int | None, sp: SequenceParallel) -> Engine:
    _keep = HfDeepSpeedConfig(ds) if _zero3(ds) else None  # noqa: F841
    model = models.load_causal_lm(cfg.model.teacher, torch_dtype(cfg.model.dtype), cfg.model.attn_implementation,
                                  vocab_size)
    sp.attach(model, f"model.teacher={cfg.model.teacher}")
    model.requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=HiddenStates(model), config=ds)
    engine.eval()
    return Engine(engine, model, _zero3(ds))
