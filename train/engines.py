"""Every engine is built here: the ZeRO-3 student (optimizer + LR schedule) and the frozen ZeRO-3
teacher (inference: no optimizer state), from the ds_configs/ defaults via ``config.ds_config``.

Both are driven the same way by the loop: ``forward_hidden`` runs the engine (so ZeRO-3's hooks
gather and release each layer) and returns the decoder's final hidden states; ``gathered_head``
holds the full lm-head weight for the fused loss and, for the student, its backward.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from . import models
from .parallel import SequenceParallel


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine
    softcap: float | None
    zero3: bool
    _captured: torch.Tensor | None = None

    @property
    def module(self):
        return self.engine.module

    def __post_init__(self):
        self.module.base_model.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output):
        self._captured = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def forward_hidden(self, batch: dict) -> torch.Tensor:
        """Final hidden states ``[B, T, H]``. Logits are computed for the last position only
        (``logits_to_keep=1``): the loss head makes the rest in chunks."""
        self.engine(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), use_cache=False, logits_to_keep=1)
        hidden, self._captured = self._captured, None
        return hidden

    @contextlib.contextmanager
    def gathered_head(self):
        """The full lm-head weight (a ZeRO-3 gather once per step; a no-op without ZeRO-3)."""
        weight = models.lm_head_weight(self.module)
        ctx = deepspeed.zero.GatheredParameters([weight], modifier_rank=None) if self.zero3 \
            else contextlib.nullcontext()
        with ctx:
            yield weight


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _param_groups(model, weight_decay: float):
    """No weight decay on norms and biases (1-D tensors). Under ZeRO-3 every local tensor is a
    1-D shard: the full shape is ``ds_shape``."""
    def matrix(p):
        return len(getattr(p, "ds_shape", p.shape)) >= 2
    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _zero3(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("stage", 0) == 3


def build_student(cfg, ds: dict, vocab_size: int | None, sp: SequenceParallel) -> Engine:
    dtype = models.resolve_dtype(cfg.model.dtype)
    # Must be alive while the model is created, so from_pretrained/from_config build ZeRO-3 shards.
    _keep = HfDeepSpeedConfig(ds) if _zero3(ds) else None  # noqa: F841
    spec = cfg.model.student_init or cfg.model.student
    model = models.load_causal_lm(spec, dtype, cfg.model.attn_implementation, vocab_size, seed=cfg.train.seed)
    sp.attach(model, f"model.student={spec}")
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = cfg.train
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    # A callable: DeepSpeed hands it the optimizer it wraps (ZeRO regroups the parameters).
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        o, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return Engine(engine, models.final_logit_softcap(model), _zero3(ds))


def build_teacher(cfg, ds: dict, sp: SequenceParallel) -> Engine:
    dtype = models.resolve_dtype(cfg.model.dtype)
    _keep = HfDeepSpeedConfig(ds) if _zero3(ds) else None  # noqa: F841
    model = models.load_causal_lm(cfg.model.teacher, dtype, cfg.model.attn_implementation)
    sp.attach(model, f"model.teacher={cfg.model.teacher}")
    model.requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return Engine(engine, models.final_logit_softcap(model), _zero3(ds))
