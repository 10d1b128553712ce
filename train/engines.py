"""Every engine is built here, in the manner of DeepSpeed-Chat's ``rlhf_engine.py``: the ZeRO-3 student
(optimizer, trained), the frozen ZeRO-3 teacher (inference: no optimizer state) and, for class KD, the
classmate (trained like the student, on its own optimizer), each from its role's DeepSpeed config
(``ds_config``, from the ds_configs/ defaults). ``build`` returns them as one ``Engines`` bundle: the step,
evaluation and checkpointing take the bundle, so another model is one more entry.

All are driven the same way by the loop. ``forward_hidden`` runs the DeepSpeed engine, whose module
(``HiddenStates``) returns the decoder's final hidden states: the tensor the fused loss consumes is
the engine's own output, so DeepSpeed's backward hooks on its outputs run as they do for any model,
and no lm head runs inside the forward. ``gathered_head`` holds the full lm-head weight for the fused
loss and, for the student, its backward.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID as ZERO12_INITIAL_MICRO_STEP
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit
from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
from transformers.integrations import HfDeepSpeedConfig

from . import models
from .config import Config, ConfigError, resolve_dtype, torch_dtype
from .parallel import SequenceParallel

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
ROLES = ("student", "teacher", "classmate")


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
    model: torch.nn.Module              # the HF causal LM: config, lm head, save_pretrained, generate
    zero3: bool
    name: str = "student"               # its role, and its sub-directory in a checkpoint
    lr_scale: float = 1.0               # its LR is train.lr * lr_scale on the run's schedule

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


    @contextlib.contextmanager
    def for_generation(self, layerwise: bool = False):
        """The HF model, in eval mode, ready for ``generate``. Under ZeRO-3 every parameter is gathered
        once for the whole call and ZeRO's per-module hooks are off meanwhile (DeepSpeed's
        ``unwrap_model_for_generation``), so no token gathers anything; collective: every rank enters.
        ``layerwise``: ZeRO-3's own gathers, layer by layer on every forward (for a model that does not
        fit gathered; slow: every token gathers every layer, and the ranks must ``generate`` in lockstep,
        ``synced_gpus``)."""
        training, linear = self.model.training, torch.nn.functional.linear
        self.model.eval()
        # Building a ZeRO-3 model replaces torch's F.linear process-wide with DeepSpeed's version, which
        # saves memory in backward only; generation takes torch's own (measured 1.4x faster per token)
        torch.nn.functional.linear = getattr(ZeroInit, "linear_bk", linear)
        try:
            if self.zero3 and not layerwise:
                with unwrap_model_for_generation(self.engine):
                    yield self.model
            else:
                yield self.model
        finally:
            torch.nn.functional.linear = linear
            self.model.train(training)


@dataclass
class Engines:
    """Every model of a run. ``teacher`` is None for SFT; ``classmate`` only for class KD."""
    student: Engine
    teacher: Engine | None = None
    classmate: Engine | None = None

    def trainable(self) -> list[Engine]:
        """The engines with an optimizer, in checkpoint order."""
        return [e for e in (self.student, self.classmate) if e is not None]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup from 0, then cosine decay
    to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def set_optimizer_settings(model: Engine, step: int, cfg) -> float:
    """The LR of optimizer step ``step`` and the run's betas and weight decay, set on every step;
    returns the LR. The LR is a function of the step, not a scheduler's state: a skipped step cannot
    put it out of phase. All three come from this run's settings, not from a checkpoint's optimizer
    state (whose hyperparameters ``load_state_dict`` restores), so a resumed run with a new
    ``train.lr``, ``train.betas`` or ``train.weight_decay`` uses the new values from its first step."""
    t = cfg.train
    lr = t.lr * model.lr_scale * warmup_cosine(step, t.warmup_steps, t.steps, t.min_lr_ratio)
    for i, group in enumerate(model.engine.optimizer.param_groups):
        group.update(lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay if group.get("decay", i == 0) else 0.0)
    return lr


def discard_gradients(model: Engine) -> None:
    """Drop the gradients accumulated since the last step (a step abandoned midway), so that the
    next backward starts afresh. DeepSpeed clears them only inside a step: after an update, or
    (ZeRO-1/2) when it skips an overflowing one; this does what those do, without the step.
    ``tests/dist/test_steps.py`` checks every ZeRO stage, offload included."""
    engine = model.engine
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


def _trained(cfg, ds: dict, spec: str, role: str, vocab_size: int | None, sp: SequenceParallel, seed: int,
             lr_scale: float = 1.0) -> Engine:
    """A model with an optimizer: the student, or the classmate."""
    # Must be alive while the model is created, so from_pretrained/from_config build ZeRO-3 shards.
    _keep = HfDeepSpeedConfig(ds) if _zero3(ds) else None  # noqa: F841
    model = models.load_causal_lm(spec, torch_dtype(cfg.model.dtype), cfg.model.attn_implementation, vocab_size,
                                  seed=seed)
    sp.attach(model, f"model.{role}={spec}")
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained returns a model in eval mode, where transformers skips activation
    # checkpointing and dropout: it trains in train mode from its first step.
    model.train()
    t = cfg.train
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr * lr_scale, betas=tuple(t.betas))
    engine, *_ = deepspeed.initialize(model=HiddenStates(model), optimizer=opt, config=ds)
    return Engine(engine, model, _zero3(ds), role, lr_scale)


def _frozen(cfg, ds: dict, spec: str, role: str, vocab_size: int | None, sp: SequenceParallel) -> Engine:
    _keep = HfDeepSpeedConfig(ds) if _zero3(ds) else None  # noqa: F841
    model = models.load_causal_lm(spec, torch_dtype(cfg.model.dtype), cfg.model.attn_implementation, vocab_size)
    sp.attach(model, f"model.{role}={spec}")
    model.requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=HiddenStates(model), config=ds)
    engine.eval()
    return Engine(engine, model, _zero3(ds), role)


def frozen_teacher(cfg: Config, world: int, vocab_size: int | None, sp: SequenceParallel) -> Engine:
    return _frozen(cfg, ds_config(cfg, "teacher", world), cfg.model.teacher, "teacher", vocab_size, sp)


def build(cfg: Config, world: int, vocab_size: int | None, sp: SequenceParallel, universal: bool = False) -> Engines:
    """Every engine of the run. ``universal``: the trained engines resume from DeepSpeed universal
    checkpoints. A random-init classmate (preset or config.json) is seeded apart from the student,
    so the two never start as the same model. A cached teacher (``model.teacher=cache:DIR``) has no engine."""
    m = cfg.model
    student = _trained(cfg, ds_config(cfg, "student", world, load_universal=universal), m.student_init or m.student,
                       "student", vocab_size, sp, cfg.train.seed)
    teacher = frozen_teacher(cfg, world, vocab_size, sp) \
        if cfg.loss.method != "sft" and cfg.teacher_cache is None else None
    classmate = _trained(cfg, ds_config(cfg, "classmate", world, load_universal=universal), m.classmate, "classmate",
                         vocab_size, sp, cfg.train.seed + 1, cfg.classmate.lr_scale) if m.classmate else None
    return Engines(student, teacher, classmate)


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs, one per role

# Dynamic loss scaling for an fp16 student, unless the JSON file sets its own.
_FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}


def ds_config(config: Config, role: str, world_size: int, *, device: str | None = None,
              load_universal: bool = False) -> dict:
    """The DeepSpeed config dict of the ``"student"``, ``"teacher"`` or ``"classmate"`` engine.

    Starts from ``parallel.ds_config_<role>`` or the default in ``ds_configs/`` (the ``_offload``
    variant when offloading), keeps every setting of the file, and overwrites the keys the run config
    owns: batch sizes (``train_batch_size`` counts data-parallel ranks, world_size // sequence),
    gradient clipping, ZeRO stage, offload on/off and precision (``model.dtype`` through
    ``resolve_dtype(dtype, device)``). The student has no optimizer/scheduler section (the trainer
    passes a torch optimizer and sets the LR per step) and leaves gradient accumulation to the
    trainer (``managed_gradient_accumulation: false``: each ``step()`` applies what the backward
    calls since the last one accumulated). The teacher is frozen: ZeRO-3, no optimizer, no
    clipping. The classmate is trained as the student is: the student's file, ZeRO stage and offload.
    ``load_universal``: a trained engine resumes from a DeepSpeed universal checkpoint.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    p, t = config.parallel, config.train
    trained = role != "teacher"
    role = "student" if trained else role          # the classmate's engine is configured like the student's
    if world_size < 1 or world_size % p.sequence:
        raise ConfigError(f"world size {world_size} is not a positive multiple of parallel.sequence="
                          f"{p.sequence}; launch a multiple of {p.sequence} ranks.")
    offload = p.offload_optimizer if role == "student" else p.offload_teacher
    user_path = p.ds_config_student if role == "student" else p.ds_config_teacher
    default = DS_CONFIG_DIR / f"zero3_{role}{'_offload' if offload else ''}.json"
    path = Path(user_path) if user_path else default
    key = f"parallel.ds_config_{role}"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read the DeepSpeed config '{path}'"
                          f"{f' given by {key}' if user_path else ''}: {e}.") from None
    if not isinstance(d, dict):
        raise ConfigError(f"The DeepSpeed config '{path}' must hold a JSON object.")
    for section in ("optimizer", "scheduler"):
        if section in d and role == "student":
            raise ConfigError(f"The DeepSpeed config '{path}' has an '{section}' section; remove it: the "
                              "trainer builds the optimizer and LR schedule from train.lr, train.betas, "
                              "train.weight_decay, train.warmup_steps and train.min_lr_ratio.")
        d.pop(section, None)

    d["train_micro_batch_size_per_gpu"] = t.micro_batch
    d["gradient_accumulation_steps"] = t.grad_accum
    d["train_batch_size"] = t.micro_batch * t.grad_accum * (world_size // p.sequence)
    if p.sequence > 1:
        # without an mpu DeepSpeed divides the world size by this to get data-parallel ranks
        d["sequence_parallel_size"] = p.sequence
    else:
        d.pop("sequence_parallel_size", None)
    d.setdefault("steps_per_print", 10**9)        # the trainer logs; keep DeepSpeed quiet
    d.setdefault("wall_clock_breakdown", False)

    zero = d.setdefault("zero_optimization", {})
    zero["stage"] = p.zero_stage if role == "student" else 3
    if zero["stage"] < 2 and role == "student":
        # trainer-managed accumulation overlaps communication only where gradients are partitioned
        zero["overlap_comm"] = False
    offload_key = "offload_optimizer" if role == "student" else "offload_param"
    if offload:
        zero[offload_key] = {"device": "cpu", "pin_memory": True, **(zero.get(offload_key) or {})}
    else:
        zero.pop(offload_key, None)
    if role == "student":
        d["gradient_clipping"] = t.grad_clip
        d["managed_gradient_accumulation"] = False
        d["zero_allow_untested_optimizer"] = True
        if load_universal:
            d["checkpoint"] = {**d.get("checkpoint", {}), "load_universal": True}
        if offload:
            d["zero_force_ds_cpu_optimizer"] = False   # a torch optimizer is passed on purpose
    else:
        d.pop("gradient_clipping", None)
        zero.pop("offload_optimizer", None)

    dtype = resolve_dtype(config.model.dtype, device)
    for name in ("bf16", "fp16"):
        d[name] = {**d.get(name, {}), "enabled": dtype == name}
    if dtype == "fp16" and role == "student":
        d["fp16"] = {**_FP16_LOSS_SCALING, **d["fp16"]}
    return d
