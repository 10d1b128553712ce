"""``kd-train RECIPE --plan``: a per-GPU memory and FLOP plan from the shapes alone.

Nothing is loaded and no rank is started: parameter counts come from each model's config built on
the meta device. Every figure is an estimate, in GB (1e9 bytes), per GPU.

Model states (DeepSpeed's own accounting, as in ``estimate_zero3_model_states_mem_needs`` and
``estimate_zero2_model_states_mem_needs``; checked against them in tests/unit/test_plan.py):
  per parameter: p = 2 B (bf16/fp16) or 4 B (fp32) weights, p B gradients, and 16 B of optimizer
  states (fp32 master 4 + Adam m 4 + v 4 + fp32 gradient partition 4).
  ZeRO 0: all full. ZeRO 1/2: weights full, grads and the 16 B split over the data-parallel ranks
  (DeepSpeed counts stage 1 like stage 2). ZeRO 3: (p + 16) B split, plus the largest layer
  gathered in flight (4 B x its params). offload_optimizer moves the 16 B (and, ZeRO 1/2, the
  gradient partition) to CPU memory. The teacher: ZeRO-3 weights (p B split),
  on CPU with offload_teacher.
DeepSpeed's own buffers, read from the engine's DeepSpeed config (``engines.ds_config``, with
DeepSpeed's defaults for what it leaves out):
  the gradient bucket: reduce_bucket_size elements of the weights' type with contiguous_gradients
  (two with overlap_comm at ZeRO 1/2);
  ZeRO 3 keeps a gathered weight from its use in the forward to the backward when the reuse lies
  within stage3_max_reuse_distance parameters: about the last R/2 parameters of the model (all of a
  model under R/2); and, once it has traced a step, gathers the weights of the next modules ahead
  of their use, up to stage3_prefetch_bucket_size parameters (and stage3_max_live_parameters);
  p B each. (Measured on CPU: the forward ends holding the whole 57M student, and its peak is higher
  by about the prefetch bucket; tests/dist/test_plan_memory.py.)
Activations, per rank, at T = micro_batch x max_len / sequence tokens, s = max_len (attention sees
the whole row under Ulysses, with heads / sequence heads), counted per token and layer in elements
as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4.1) count them, for these models' blocks (n RMS norms of input, normalised and scaled
output; q, k, v of widths h, h_kv, h_kv and the attention output; a gated MLP of width I keeping
gate, up, activation and product; no dropout): 3 h n + 2 h + 2 h_kv + 4 I elements, plus n h fp32
bytes below fp32 (the norms compute in fp32) and, for eager attention only, 8 a s bytes of fp32 score
matrices (sdpa and flash-attn keep none). ``attn_implementation: auto`` is planned as the GPU run
resolves it (flash-attn, which the GPU image installs); plan ``eager`` explicitly for a GPU without
it. Checked against the tensors autograd saves for a Llama and a Gemma-2 layer in fp32 and bf16
(tests/unit/test_plan.py).
  With activation checkpointing: h per layer kept (the layer inputs) + one layer recomputed.
  The frozen teacher (no grad): one layer's worth per token.
Loss head: both lm heads gathered (V x H in the compute dtype), the student head's gradient (fp32
sum + result: 6 B x V x H) and ~10 fp32 chunk buffers of loss.chunk_size x V.
FLOPs per token (Kaplan et al. 2020 / PaLM appendix B): 6 N_student + 2 N_teacher
(+ 2 N_classmate + 6 N_classmate / classmate.update_every for class KD), plus attention
12 L h s for a trained model and 4 L h s for a forward-only one (s = max_len, no causal halving).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass, field

import torch

GB = 1e9
CHUNK_BUFFERS = 10


@dataclass
class Shape:
    params: int
    largest_layer: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_width: int           # num_key_value_heads x head_dim
    intermediate: int
    norms: int              # norms per layer (Llama 2, Gemma-2 4)
    eager: bool             # eager attention keeps its score matrices for the backward


def shape_of(spec: str, vocab: int | None = None, attn: str = "auto") -> Shape:
    from transformers import AutoModelForCausalLM
    from .models import model_config
    cfg = model_config(spec, vocab)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    # the norms of the residual stream (width h), not per-head q/k norms
    norms = sum(type(m).__name__.endswith("RMSNorm") and m.weight.numel() == cfg.hidden_size for m in layer.modules())
    return Shape(params, largest, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size,
                 kv, cfg.intermediate_size, norms, planned_attention(attn) == "eager")


def planned_attention(name: str) -> str:
    """The attention the GPU run uses: ``auto`` is flash-attn there (the GPU image installs it)."""
    return "flash_attention_2" if name == "auto" else name


def zero_settings(cfg, role: str, ranks: int):
    """The engine's ZeRO settings as DeepSpeed reads them (its defaults for what the file leaves out)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from .engines import ds_config
    return DeepSpeedZeroConfig(**ds_config(cfg, role, ranks).get("zero_optimization", {}))


def deepspeed_buffers(s: Shape, zero, pbytes: int) -> tuple[float, float, float]:
    """(gradient bucket, weights kept gathered for the backward, weights gathered ahead of their use)
    of a trained engine, in bytes."""
    bucket = 0.0
    if zero.stage >= 1 and zero.contiguous_gradients:
        bucket = zero.reduce_bucket_size * pbytes * (2 if zero.stage < 3 and zero.overlap_comm else 1)
    if zero.stage < 3:
        return bucket, 0.0, 0.0
    kept = pbytes * min(s.params, zero.max_reuse_distance / 2)
    ahead = pbytes * min(s.params, zero.prefetch_bucket_size, zero.max_live_parameters)
    return bucket, kept, ahead


def _is_hf(spec: str | None) -> bool:
    from .models import PRESETS
    return spec is not None and spec not in PRESETS


def model_states(params: int, largest: int, stage: int, ranks: int, pbytes: int, offload: bool) -> tuple[float, float]:
    """(GPU bytes, CPU bytes) of a trained model's weights, grads and optimizer states per rank,
    in the accounting of DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs``."""
    opt = 16 * params / (ranks if stage >= 1 else 1)          # fp32 master, Adam m, v, fp32 grad partition
    if stage == 0:
        gpu = 2 * pbytes * params
    elif stage in (1, 2):                                      # weights whole, 16-bit grads partitioned
        gpu = pbytes * params + (0 if offload else pbytes * params / ranks)
        opt += pbytes * params / ranks if offload else 0
    else:                                                      # all split, the largest layer gathered
        gpu = pbytes * params / ranks + 4 * largest
    return (gpu, opt) if offload else (gpu + opt, 0.0)


def activations(s: Shape, tokens: int, seq: int, sp: int, pbytes: int, trained: bool = True,
                checkpointing: bool = False) -> float:
    """Bytes of activations one rank keeps for ``tokens`` tokens of rows ``seq`` long."""
    elements = 3 * s.hidden * s.norms + 2 * s.hidden + 2 * s.kv_width + 4 * s.intermediate
    upcast = s.norms * s.hidden * (4 - pbytes)              # each RMS norm also keeps its input in fp32
    scores = 8 * (s.heads // sp) * seq if s.eager else 0    # two fp32 score matrices (eager's softmax is fp32)
    per_layer = elements * pbytes + upcast + scores
    if not trained:
        return tokens * per_layer
    if checkpointing:
        return tokens * (s.layers * s.hidden * pbytes + per_layer)
    return tokens * s.layers * per_layer


@dataclass
class Plan:
    rows: list = field(default_factory=list)      # (label, GB)
    total: float = 0.0
    cpu: float = 0.0
    flops_per_token: float = 0.0
    info: dict = field(default_factory=dict)


def compute(cfg, nproc: int | None = None) -> Plan:
    from .config import resolve_dtype, torch_dtype
    m, t, p = cfg.model, cfg.train, cfg.parallel
    ranks = plan_ranks(cfg, nproc)
    dtype = resolve_dtype(m.dtype)
    pbytes = torch_dtype(dtype).itemsize
    # the student as engines.build makes it: from student_init where set
    specs = {"student": m.student_init or m.student, "teacher": None if cfg.teacher_cache else m.teacher,
             "classmate": m.classmate}
    shapes = {k: shape_of(v, attn=m.attn_implementation) for k, v in specs.items() if v and _is_hf(v)}
    # presets follow the vocabulary of an HF model beside them (the demo: the tokenizer's)
    vocab = next((shapes[k].vocab for k in ("teacher", "student") if k in shapes), None)
    if vocab is None and cfg.teacher_cache:    # the cache's vocabulary, when it can be read
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            vocab = json.loads((cfg.teacher_cache / "manifest.json").read_text())["fingerprint"]["vocab"]
    shapes.update({k: shape_of(v, vocab, m.attn_implementation) for k, v in specs.items() if v and not _is_hf(v)})
    shapes = {k: shapes[k] for k in specs if k in shapes}          # student, teacher, classmate order
    sp = p.sequence
    seq = cfg.data.max_len
    tokens = t.micro_batch * seq // sp
    plan = Plan()
    stu = shapes["student"]
    gpu, cpu = model_states(stu.params, stu.largest_layer, p.zero_stage, ranks, pbytes, p.offload_optimizer)
    plan.rows.append((f"student states ({_count(stu.params)}, ZeRO-{p.zero_stage}"
                      f"{', optimizer on CPU' if p.offload_optimizer else ''})", gpu / GB))
    plan.cpu += cpu
    zero = zero_settings(cfg, "student", ranks)
    bucket, kept, ahead = deepspeed_buffers(stu, zero, pbytes)
    if kept:
        plan.rows.append((f"student weights kept gathered for the backward (stage3_max_reuse_distance "
                          f"{zero.max_reuse_distance:.2g})", kept / GB))
    if ahead:
        plan.rows.append((f"student weights gathered ahead (stage3_prefetch_bucket_size "
                          f"{zero.prefetch_bucket_size:.2g})", ahead / GB))
    if "classmate" in shapes:
        c = shapes["classmate"]
        gpu, cpu = model_states(c.params, c.largest_layer, p.zero_stage, ranks, pbytes, p.offload_optimizer)
        c_bucket, c_kept, c_ahead = deepspeed_buffers(c, zero, pbytes)
        plan.rows.append((f"classmate states ({_count(c.params)})", gpu / GB))
        if c_kept + c_ahead:
            plan.rows.append(("classmate weights gathered (kept and ahead)", (c_kept + c_ahead) / GB))
        plan.cpu += cpu
        bucket += c_bucket
    if bucket:
        plan.rows.append((f"DeepSpeed gradient buckets (reduce_bucket_size {zero.reduce_bucket_size:.2g})",
                          bucket / GB))
    if "teacher" in shapes:
        te = shapes["teacher"]
        shard = pbytes * te.params / ranks
        plan.rows.append((f"teacher weights ({_count(te.params)}, ZeRO-3 shard"
                          f"{', on CPU' if p.offload_teacher else ''})", 0.0 if p.offload_teacher else shard / GB))
        if p.offload_teacher:
            plan.cpu += shard

    def act(s: Shape, trained: bool) -> float:
        return activations(s, tokens, seq, sp, pbytes, trained, m.activation_checkpointing)

    ck = "checkpointed" if m.activation_checkpointing else "no checkpointing"
    plan.rows.append((f"student activations ({tokens} tokens, {ck})", act(stu, True) / GB))
    if "classmate" in shapes:
        plan.rows.append(("classmate activations", act(shapes["classmate"], True) / GB))
    if "teacher" in shapes:
        plan.rows.append(("teacher activations (no grad, one layer)", act(shapes["teacher"], False) / GB))
    heads = sum(s.vocab * s.hidden for s in shapes.values()) * pbytes
    plan.rows.append(("lm heads gathered for the loss", heads / GB))
    plan.rows.append(("student lm-head gradient (fp32 sum + result)", 6 * stu.vocab * stu.hidden / GB))
    chunk = min(cfg.loss.chunk_size, tokens)
    plan.rows.append((f"fused loss buffers ({CHUNK_BUFFERS} x {chunk} x {stu.vocab} fp32)",
                      CHUNK_BUFFERS * chunk * stu.vocab * 4 / GB))
    plan.total = sum(v for _, v in plan.rows)
    # FLOPs per token
    f = 6 * stu.params + 12 * stu.layers * stu.hidden * seq
    if "teacher" in shapes:
        te = shapes["teacher"]
        f += 2 * te.params + 4 * te.layers * te.hidden * seq
    if "classmate" in shapes:
        c = shapes["classmate"]
        f += (2 + 6 / cfg.classmate.update_every) * c.params + (4 + 12 / cfg.classmate.update_every) * c.layers * c.hidden * seq
    plan.flops_per_token = f
    plan.info = dict(ranks=ranks, tokens=tokens, dtype=str(dtype), shapes=shapes)
    return plan


def plan_ranks(cfg, nproc: int | None = None) -> int:
    """The ranks planned for: given, the recipe's parallel.nproc, this machine's GPUs, else 8."""
    return nproc or cfg.parallel.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 8)


def first_change(cfg, gpu_gb: float, nproc: int | None = None) -> tuple[str, float] | None:
    """The first setting (activation_checkpointing, micro_batch, parallel.sequence, offload_teacher,
    offload_optimizer) to change when the plan does not fit: ("key=value", new total GB)."""
    import dataclasses
    m, t, p = cfg.model, cfg.train, cfg.parallel
    ranks = plan_ranks(cfg, nproc)
    cands = []
    if not m.activation_checkpointing:
        cands.append(("model.activation_checkpointing", True))
    if t.micro_batch > 1:
        cands.append(("train.micro_batch", max(1, t.micro_batch // 2)))
    nxt = p.sequence * 2
    if ranks % nxt == 0 and cfg.data.max_len % nxt == 0:
        cands.append(("parallel.sequence", nxt))
    if cfg.model.teacher and not cfg.teacher_cache and not p.offload_teacher:
        cands.append(("parallel.offload_teacher", True))
    if not p.offload_optimizer:
        cands.append(("parallel.offload_optimizer", True))
    base = compute(cfg, nproc).total
    for key, value in cands:
        section, name = key.split(".")
        new = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        total = compute(new, nproc).total
        if total < base:
            return f"{key}={str(value).lower() if isinstance(value, bool) else value}", total
    return None


def _gb(v: float) -> str:
    return f"{v:.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(cfg, gpu_gb: float = 80.0, mfu: float = 0.4, peak_tflops: float = 989.0, nproc: int | None = None) -> str:
    plan = compute(cfg, nproc)
    i = plan.info
    lines = [f"kd-train plan: {i['ranks']} ranks, sequence parallel {cfg.parallel.sequence}, {i['dtype']}, "
             f"{i['tokens']} tokens per rank per micro-batch, {planned_attention(cfg.model.attn_implementation)} "
             "(estimates, nothing loaded)", "",
             "| per GPU | GB |", "|---|---|"]
    lines += [f"| {k} | {_gb(v)} |" for k, v in plan.rows]
    fits = plan.total <= gpu_gb
    lines.append(f"| **total** (of {gpu_gb:g} GB) | **{plan.total:.2f}** {'fits' if fits else 'DOES NOT FIT'} |")
    if plan.cpu:
        lines.append(f"| CPU memory per rank (offloaded) | {plan.cpu / GB:.2f} |")
    if not fits:
        change = first_change(cfg, gpu_gb, nproc)
        lines.append("")
        lines.append(f"does not fit: try {change[0]} (-> {change[1]:.1f} GB)" if change
                     else "does not fit, and no setting of the plan helps: more ranks or a smaller model")
    tps = mfu * peak_tflops * 1e12 * i["ranks"] / plan.flops_per_token
    lines += ["", "| compute | |", "|---|---|",
              f"| FLOPs per token | {plan.flops_per_token:.3g} |",
              f"| tokens/s ({i['ranks']} GPUs, MFU {mfu:g}, peak {peak_tflops:g} TFLOPS) | {tps:,.0f} |",
              f"| hours per billion tokens | {1e9 / tps / 3600:.3g} |"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", action="store_true", help="print a memory and FLOP plan per GPU and exit")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory for --plan (default 80)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for --plan (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOPS for --plan (default 989, H100 bf16)")
