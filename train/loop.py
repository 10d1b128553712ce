"""The training run, readable top to bottom: build, (resume), step, log, evaluate, save, export.

One step: the loader's batch (this rank's slice of it under sequence parallelism) goes to the
frozen teacher (final hidden states, no grad) and to the student; ``kd.fused_distill_loss`` turns
both hidden states and lm-head weights into the loss in chunks (never a [tokens, vocab] tensor)
and reduces it over all ranks; the student engine steps. Everything else here is bookkeeping.
"""
from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import kd
from . import checkpoint, data, engines, evaluate, parallel
from .config import Config, ds_config, dump_yaml
from .runlog import RunLogger
from .tokenizer import load_tokenizer, tokenizers_match


class TrainingError(RuntimeError):
    """A failure the user must act on; the message says what happened and what to do."""


class StopFlag:
    """SIGTERM/SIGINT: finish the current step, save, exit cleanly."""

    def __init__(self, device):
        self.requested, self.device = False, device
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (ranks must stop at the same step)."""
        flag = torch.tensor(float(self.requested), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag)
        return bool(flag.item())


def _global_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_step(student, teacher, loader, sp: parallel.SequenceParallel, cfg: Config, progress: float) -> dict | None:
    """One optimizer step over ``grad_accum`` micro-batches; None if every micro-batch was bad.

    The loss is the token mean over the whole global batch: each micro-batch's loss (a mean over
    its own tokens on every rank) is reweighted by its share of the step's counted tokens. With
    sequence parallelism every rank holds a slice of its group's sequences; the sums run over all
    ranks, so nothing else changes.
    """
    loss_cfg = dict(method=cfg.loss.method, chunk_size=cfg.loss.chunk_size, metrics_k=cfg.loss.metrics_k,
                    vocab_size=cfg.model.vocab_size, **cfg.loss.objective_kwargs())
    engine, gas, device = student.engine, cfg.train.grad_accum, student.engine.device
    batches = [sp.shard(data.to_device(next(loader), device), packed=cfg.data.pack) for _ in range(gas)]
    labels = [b["targets"].flatten() for b in batches]
    counts = _global_sum([float((lab != -100).sum()) for lab in labels], device)
    tokens_in = sum(_global_sum([float(b["n_real"]) for b in batches], device))
    totals, good_tokens, bad = {}, 0.0, 0
    for batch, lab, count in zip(batches, labels, counts):
        t_hidden = None
        if teacher is not None:
            with torch.no_grad():
                t_hidden = teacher.forward_hidden(batch).flatten(0, 1)
        s_hidden = student.forward_hidden(batch).flatten(0, 1)
        with student.gathered_head() as w_s, \
                (teacher.gathered_head() if teacher else contextlib.nullcontext()) as w_t:
            loss, stats = kd.fused_distill_loss(
                s_hidden, w_s, t_hidden, w_t, lab, progress=progress, group=dist.group.WORLD,
                student_softcap=student.softcap, teacher_softcap=teacher.softcap if teacher else None,
                **loss_cfg)
            finite = bool(torch.isfinite(loss))      # the same on every rank: the loss is all-reduced
            if finite:
                # DeepSpeed divides by gas; undo that and weight by this micro-batch's token share
                engine.backward(loss * (gas * count / max(sum(counts), 1.0)))
        bad += not finite
        if finite:
            good_tokens += count
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * count
        if finite or good_tokens or not engine.is_gradient_accumulation_boundary():
            engine.step()
        else:
            engine.micro_steps += 1   # nothing to apply: keep the accumulation boundary in phase
    if not good_tokens:
        return None
    out = {k: v / good_tokens for k, v in totals.items() if k != "tokens"}
    out.update(tokens=int(good_tokens), tokens_in=int(tokens_in), bad_micro_batches=bad)
    return out


def run(cfg: Config) -> dict:
    """Train according to ``cfg``; returns the final evaluation (rank 0; {} elsewhere)."""
    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = parallel.SequenceParallel(cfg.parallel.sequence)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.manual_seed(cfg.train.seed)
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"

    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.student)
    train_set = data.TokenizedDataset(cfg.data.train, tokenizer, cfg.data.max_len)
    # one loader per data-parallel replica: the ranks of a sequence-parallel group share batches
    loader = data.make_loader(train_set, cfg.train.micro_batch, sp.dp_rank, sp.dp_world, cfg.train.seed,
                              pack=cfg.data.pack, pad_id=tokenizer.pad_id, pad_to_multiple_of=sp.pad_to_multiple_of)
    eval_loader = None
    if cfg.data.eval:
        eval_set = data.TokenizedDataset(cfg.data.eval, tokenizer, cfg.data.max_len, limit=cfg.data.eval_samples)
        eval_loader = lambda: data.make_loader(  # noqa: E731
            eval_set, cfg.train.micro_batch, sp.dp_rank, sp.dp_world, pad_id=tokenizer.pad_id, drop_last=False,
            pad_to_multiple_of=sp.pad_to_multiple_of)

    if cfg.model.teacher and cfg.loss.method != "sft":
        check_teacher_tokenizer(cfg, tokenizer)
    student = engines.build_student(cfg, ds_config(cfg, "student", world), tokenizer.vocab_size, sp)
    teacher = engines.build_teacher(cfg, ds_config(cfg, "teacher", world), sp) \
        if cfg.loss.method != "sft" else None

    stop = StopFlag(student.engine.device)
    state = {"step": 0, "bad_steps": 0, "tokens_seen": 0}
    found = checkpoint.find(cfg.resume, ckpt_dir)
    if found:
        state, rank_state = checkpoint.load(student.engine, *found)
        loader.load_state_dict(rank_state["loader"])
    log = RunLogger(run_dir, cfg, enabled=rank == 0, resumed_at=state["step"])
    if rank == 0:
        dump_yaml(cfg, run_dir / "config.yaml")
        evaluate.save_hf_meta(student.module, tokenizer, ckpt_dir / "hf_meta")
    log.info(f"{world} ranks | student {cfg.model.student} | teacher {cfg.model.teacher} | "
             f"{train_set.stats.summary()}"
             + (f" | resumed from {found[1]}" if found else ""))

    def save():
        checkpoint.save(student.engine, ckpt_dir, state["step"], state, {"loader": loader.state_dict()},
                        cfg.train.keep_checkpoints)

    last_saved = state["step"] if found else -1
    final = {}
    while state["step"] < cfg.train.steps:
        t0 = time.perf_counter()
        stats = train_step(student, teacher, loader, sp, cfg, progress=state["step"] / cfg.train.steps)
        state["step"] += 1
        if stats is None:
            state["bad_steps"] += 1
            log.warn(f"step {state['step']}: non-finite loss, step skipped "
                     f"({state['bad_steps']}/{cfg.train.max_bad_steps} allowed)")
            if state["bad_steps"] >= cfg.train.max_bad_steps:
                raise TrainingError(
                    f"{state['bad_steps']} steps had a NaN/inf loss (limit train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}). The newest good checkpoint is kept in {ckpt_dir}. Lower "
                    "train.lr, check the data for empty or corrupt records, or raise train.max_bad_steps.")
        else:
            state["tokens_seen"] += stats["tokens_in"]
            stats.update(lr=student.engine.get_lr()[0], tokens_per_s=stats["tokens_in"] / (time.perf_counter() - t0))
            log.step(state["step"], stats)
        stopping = stop.agreed()     # before eval: the launcher SIGKILLs 30 s after its SIGTERM
        if eval_loader and not stopping and cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0:
            final = evaluate.held_out(student, teacher, eval_loader(), sp, cfg)
            log.eval(state["step"], final)
        if stopping or (cfg.train.save_every and state["step"] % cfg.train.save_every == 0):
            save()
            last_saved = state["step"]
        if stopping:
            log.info(f"stop requested: saved step {state['step']} in {ckpt_dir}; continue with resume=auto")
            log.close()
            return {}
    if last_saved != state["step"]:
        save()
    evaluated_now = cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0
    if eval_loader and not (final and evaluated_now):
        final = evaluate.held_out(student, teacher, eval_loader(), sp, cfg)
        log.eval(state["step"], final)
    evaluate.export_hf(student, tokenizer, run_dir / "student-hf")
    log.close(final)
    return final if rank == 0 else {}


def check_teacher_tokenizer(cfg: Config, tokenizer) -> None:
    """Token-level distillation needs one vocabulary: refuse a teacher with another tokenizer."""
    teacher_dir = Path(cfg.model.teacher)
    if not teacher_dir.is_dir() or not any(teacher_dir.glob("tokenizer*")):
        return
    ok, why = tokenizers_match(load_tokenizer(teacher_dir), tokenizer)
    if not ok:
        raise TrainingError(
            f"teacher tokenizer ({teacher_dir}) and training tokenizer "
            f"({cfg.data.tokenizer or cfg.model.student}) differ: {why}. Token-level distillation "
            "compares the two models position by position over one vocabulary; use the teacher's "
            "tokenizer for the student (data.tokenizer=...), or check with `kd-convert vocab-check`.")
