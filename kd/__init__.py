"""kd: the distillation module. Pure PyTorch; importable without DeepSpeed.

- ``kd.losses``: per-token losses ``(student_logits, teacher_logits, T, **params) -> [N]`` and a registry
- ``kd.misfeedback``: class KD's per-token ``-min(KL(q || c), kappa)`` (an extra term, not a method)
- ``kd.distill_loss``: a method's loss on materialised logits (masking, T^2, term mixing)
- ``kd.fused_distill_loss``: the same from hidden states and lm-head weights, chunked
- ``kd.reduce``: sum / count over data- and sequence-parallel ranks
- ``kd.metrics``: OR@k, CR@k, top-1 agreement
- ``kd.schedule``: weights that move with training progress (GRKD's transition)
- ``kd.topk``: a teacher known by its top-k and log-partition (a cached teacher): top-k + tail
"""
from . import losses, metrics, reduce, schedule, topk
from .head import fused_distill_loss, softcap
from .losses import misfeedback
from .objective import METHODS, Objective, build_objective, distill_loss

__all__ = ["losses", "metrics", "reduce", "schedule", "topk", "distill_loss", "fused_distill_loss",
           "build_objective", "Objective", "METHODS", "softcap", "misfeedback"]
