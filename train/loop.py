"""The training run, readable top to bottom: build, (resume), step, log, evaluate, save, export.

One step: the loader's batch (its responses replaced by the student's own samples in on-policy modes;
this rank's slice of it under sequence parallelism) goes to the frozen teacher (final hidden states, no
grad) and to the student; ``kd.fused_distill_loss`` turns both hidden states and lm-head weights into
the loss in chunks (never a [tokens, vocab] tensor) and reduces it over all ranks; the student engine
steps (and, for class KD, the classmate's). Everything else here is bookkeeping.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

import kd
from kd.reduce import IGNORE_INDEX, all_reduce_values
from . import checkpoint, data, engines, evaluate, launch, parallel
from .cache import TeacherCache
from .config import Config, dump_yaml
from .rollout import Rollout
from .runlog import RunLogger
from .tokenizer import load_tokenizer


class TrainingError(RuntimeError):
    """A failure the user must act on; the message says what happened and what to do."""


class StopFlag:
    """SIGTERM/SIGINT, or the end of the kd-train process that launched this rank: finish the
    current step, save, exit cleanly."""

    def __init__(self, device):
        self.requested, self.device = False, device
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        parent = os.environ.get(launch.PARENT_ENV)
        if parent:
            threading.Thread(target=self._watch, args=(int(parent),), daemon=True).start()

    def _handle(self, signum, _frame):
        self.requested = True

    def _watch(self, pid: int, every_s: float = 5.0) -> None:
        """Nobody supervises ranks whose kd-train was killed: stop them as a signal would."""
        while not self.requested:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.requested = True
            except PermissionError:
                pass

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (ranks must stop at the same step)."""
        flag, = all_reduce_values([float(self.requested)], dist.group.WORLD, "max", self.device)
        return bool(flag)


def train_step(models: engines.Engines, loader, rollout: Rollout, sp: parallel.SequenceParallel, cfg: Config,
               progress: float, classmate_learns: bool = False,
               cache: TeacherCache | None = None) -> dict | None:
    """One optimizer step over ``grad_accum`` micro-batches; None when the step was skipped.

    Each micro-batch comes from the rollout seam (the dataset's responses, or the student's own samples),
    is sharded for sequence parallelism, and is scored by the frozen teacher (or read from its ``cache``:
    each counted token's top-k row, found from the batch's dataset indices). The loss is the token
    mean over the whole global batch: each micro-batch's loss (a mean over its own tokens on every rank)
    is weighted by its share of the step's counted tokens, so the step equals one micro-batch of
    ``grad_accum`` times the size. A non-finite micro-batch (the same on every rank: the loss is
    all-reduced) makes that bigger batch non-finite too, so the whole step is skipped and the gradients
    already accumulated are dropped. Class KD: on student samples the student also moves away from the
    classmate (misfeedback); on dataset responses of the steps where ``classmate_learns``, the classmate
    learns KL(p || c) from the teacher hidden states already computed.
    """
    student, teacher, classmate = models.student, models.teacher, models.classmate
    device, head = student.engine.device, dict(chunk_size=cfg.loss.chunk_size, vocab_size=cfg.model.vocab_size)
    loss_cfg = dict(method=cfg.loss.method, metrics_k=cfg.loss.metrics_k, **head, **cfg.loss.objective_kwargs())
    micro = rollout.micro_batches(loader, cfg.train.grad_accum, progress)
    batches = [sp.shard(cache.mark(b) if cache else b, packed=cfg.data.pack) for b, _ in micro]
    # a cached teacher's rows, read on the CPU before the step's device work
    cached = [cache.rows(b.pop("cache_rows").flatten()[b["targets"].flatten() != IGNORE_INDEX], device)
              if cache else None for b in batches]
    batches = [data.to_device(b, device) for b in batches]
    sampled = [src != "dataset" for _, src in micro]
    counts = all_reduce_values([float((b["targets"] != IGNORE_INDEX).sum()) for b in batches], dist.group.WORLD,
                               device=device)
    tokens_in = sum(all_reduce_values([float(b["n_real"]) for b in batches], dist.group.WORLD, device=device))
    c_counts = [n if classmate and classmate_learns and not s else 0.0 for n, s in zip(counts, sampled)]
    sums: dict[str, list[float]] = {}         # name -> [sum of value * tokens, tokens]

    def add(stats, n):
        for k, v in stats.items():
            if k != "tokens":
                sums.setdefault(k, [0.0, 0.0])
                sums[k][0] += v * n
                sums[k][1] += n
    for batch, n, on_policy, c_n, t_topk in zip(batches, counts, sampled, c_counts, cached):
        labels = batch["targets"].flatten()
        t_hidden = None
        if teacher is not None:
            with torch.no_grad():
                t_hidden = teacher.forward_hidden(batch).flatten(0, 1)
        s_hidden = student.forward_hidden(batch).flatten(0, 1)
        c_hidden = None
        if classmate is not None and (on_policy or c_n):
            with contextlib.nullcontext() if c_n else torch.no_grad():   # it learns only on dataset responses
                c_hidden = classmate.forward_hidden(batch).flatten(0, 1)
        with student.gathered_head() as w_s, \
                (teacher.gathered_head() if teacher else contextlib.nullcontext()) as w_t, \
                (classmate.gathered_head() if c_hidden is not None else contextlib.nullcontext()) as w_c:
            mis = dict(classmate_hidden=c_hidden, classmate_weight=w_c, classmate_softcap=classmate.softcap,
                       misfeedback_weight=cfg.classmate.misfeedback_weight, kappa=cfg.classmate.kappa) \
                if on_policy and c_hidden is not None else {}
            loss, stats = kd.fused_distill_loss(
                s_hidden, w_s, t_hidden, w_t, labels, progress=progress, group=dist.group.WORLD,
                student_softcap=student.softcap, teacher_softcap=teacher.softcap if teacher else None,
                teacher_topk=t_topk, **loss_cfg, **mis)
            c_loss = None
            if c_n:
                c_loss, c_stats = kd.fused_distill_loss(
                    c_hidden, w_c, t_hidden, w_t, labels, method="forward_kl", temperature=cfg.loss.temperature,
                    group=dist.group.WORLD, student_softcap=classmate.softcap, teacher_softcap=teacher.softcap, **head)
            if not torch.isfinite(loss) or (c_loss is not None and not torch.isfinite(c_loss)):
                for model in models.trainable():
                    engines.discard_gradients(model)
                return None
            student.engine.backward(loss * (n / max(sum(counts), 1.0)), scale_wrt_gas=False)
            if c_loss is not None:
                classmate.engine.backward(c_loss * (c_n / sum(c_counts)), scale_wrt_gas=False)
                add({"classmate_loss": c_stats["forward_kl"]}, c_n)
        add(stats, n)
    student.engine.step()
    if any(c_counts):
        classmate.engine.step()
    out = {k: total / max(w, 1.0) for k, (total, w) in sums.items()}
    out.update(tokens=int(sum(counts)), tokens_in=int(tokens_in), **rollout.stats())
    return out


def run(cfg: Config) -> dict:
    """Train according to ``cfg``; returns the final evaluation (rank 0; {} elsewhere)."""
    plan, device = launch.join(cfg)             # checked inputs on every rank, one process group
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = parallel.SequenceParallel(cfg.parallel.sequence)
    torch.manual_seed(cfg.train.seed)
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    if rank == 0 and plan.replaces:
        print(f"[kd-train] overwrite=true: moved the earlier run to {checkpoint.move_aside(run_dir)}", flush=True)

    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.student)
    train_set = data.TokenizedDataset(cfg.data.train, tokenizer, cfg.data.max_len, chat_template=cfg.data.chat_template)
    # one loader per data-parallel replica: the ranks of a sequence-parallel group share batches
    loader = data.make_loader(train_set, cfg.train.micro_batch, sp.dp_rank, sp.dp_world, cfg.train.seed,
                              pack=cfg.data.pack, pad_id=tokenizer.pad_id, pad_to_multiple_of=sp.pad_to_multiple_of)
    eval_loader = None
    if cfg.data.eval:
        eval_set = data.TokenizedDataset(cfg.data.eval, tokenizer, cfg.data.max_len, limit=cfg.data.eval_samples,
                                         chat_template=cfg.data.chat_template)
        eval_loader = lambda: data.make_loader(  # noqa: E731
            eval_set, cfg.train.micro_batch, sp.dp_rank, sp.dp_world, pad_id=tokenizer.pad_id, drop_last=False,
            pad_to_multiple_of=sp.pad_to_multiple_of)

    cache, failure = None, None
    if cfg.teacher_cache is not None and cfg.loss.method != "sft":     # its settings checked by the preflight
        try:                                    # every rank: the items as this environment tokenizes them
            cache = TeacherCache(cfg.teacher_cache)
            cache.check_items(loader.dataset)
        except Exception as e:
            if not launch.is_user_error(e):
                raise
            failure = e
        launch.agree(failure, device)
    found, same_world = plan.resume, plan.resume_world in (None, world)
    models = engines.build(cfg, world, tokenizer.vocab_size, sp, universal=plan.universal)
    student, trained = models.student, {m.name: m.engine for m in models.trainable()}
    rollout = Rollout(cfg, student, sp, loader.collate_fn, tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size)

    stop = StopFlag(student.engine.device)
    state = {"step": 0, "bad_steps": 0, "last_finite_step": 0, "tokens_seen": 0}
    if found:
        saved, rank_state = checkpoint.load(trained, *found, universal=plan.universal, same_world=same_world)
        state.update({k: saved[k] for k in state if k in saved})
        # the same on every rank, at any world size (checkpoints before 2026-12 kept it per rank)
        loader.load_state_dict(saved.get("loader") or rank_state["loader"])
        rollout.load_state_dict(saved.get("rollout"), (rank_state or {}).get("rollout"))
    resumed_at = state["step"]
    log = RunLogger(run_dir, cfg, enabled=rank == 0, resumed_at=resumed_at)
    if rank == 0:
        dump_yaml(cfg, run_dir / "config.yaml")
        evaluate.save_hf_meta(student.model, tokenizer, ckpt_dir / "hf_meta")
        if models.classmate:         # kd-convert zero-to-hf --engine classmate finds its config here
            evaluate.save_hf_meta(models.classmate.model, tokenizer, ckpt_dir / "hf_meta" / "classmate")
    log.info(f"{world} ranks | student {cfg.model.student} | teacher {cfg.model.teacher} | "
             + (f"classmate {cfg.model.classmate} | " if cfg.model.classmate else "")
             + (f"on-policy: {cfg.onpolicy.mode} | " if rollout.active else "") +
             f"{train_set.stats.summary()}")
    for line in plan.notes:
        log.info(line)

    def save():
        checkpoint.save(trained, ckpt_dir, state["step"],
                        {**state, "loader": loader.state_dict(), "rollout": rollout.state_dict()},
                        {"rollout": rollout.rank_state_dict()}, cfg.train.keep_checkpoints,
                        (run_dir / "config.yaml").read_text() if rank == 0 else "", state["last_finite_step"])

    def evaluation():
        metrics = evaluate.held_out(models, eval_loader(), sp, cfg)
        rollout.on_eval(metrics)
        return metrics

    if rollout.o.mode == "distillm" and rollout.ref_loss is None:   # DistiLLM's reference, before step 1
        evaluation()
    e = cfg.train.eval_every
    if found and eval_loader and e and state["step"] % e == 0 and not log.has_eval(state["step"]):
        # a run stopped on an evaluation step saved without it (time was short): it is owed, and
        # DistiLLM's phi moves on it as in an uninterrupted run
        log.eval(state["step"], evaluation())

    last_saved = state["step"] if found else -1
    final = {}
    while state["step"] < cfg.train.steps:
        t0 = time.perf_counter()
        lr = [engines.set_optimizer_settings(m, state["step"], cfg) for m in models.trainable()][0]
        stats = train_step(models, loader, rollout, sp, cfg, progress=state["step"] / cfg.train.steps,
                           classmate_learns=state["step"] % cfg.classmate.update_every == 0, cache=cache)
        state["step"] += 1
        if stats is None:
            state["bad_steps"] += 1
            log.warn(f"step {state['step']}: non-finite loss, step skipped "
                     f"({state['bad_steps']}/{cfg.train.max_bad_steps} allowed)")
            if state["bad_steps"] >= cfg.train.max_bad_steps:
                good = checkpoint.confirmed(ckpt_dir, state["last_finite_step"])
                raise TrainingError(
                    f"{state['bad_steps']} steps had a NaN/inf loss (limit train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}). "
                    + (f"The newest checkpoint a finite step followed is kept: resume from it with "
                       f"resume={ckpt_dir / good} and a lower train.lr. " if good else
                       "No checkpoint was followed by a finite step; lower train.lr and start afresh. ")
                    + "Check the data for empty or corrupt records, or raise train.max_bad_steps.")
        else:
            state["last_finite_step"] = state["step"]
            state["tokens_seen"] += stats["tokens_in"]
            stats.update(lr=lr, tokens_per_s=stats["tokens_in"] / (time.perf_counter() - t0))
            log.step(state["step"], stats)
        stopping = stop.agreed()     # before eval: the launcher SIGKILLs 30 s after its SIGTERM
        if eval_loader and not stopping and cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0:
            final = evaluation()
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
    if eval_loader and not log.has_eval(state["step"]):
        final = evaluation()
        log.eval(state["step"], final)
    evaluate.export_hf(student, tokenizer, run_dir / "student-hf", state["step"],
                       trained=state["step"] != resumed_at)
    log.close(final or log.last_eval())
    return final if rank == 0 else {}
