"""Held-out evaluation and the HF export.

- ``held_out``: distributed over the training engines: student and teacher NLL on held-out
  responses, forward KL(teacher || student), and alignment (OR@k, CR@k, top-1 agreement); for class
  KD the classmate's own NLL and KL(teacher || classmate).
- ``generation_metrics``: one process, a plain HF model: greedy answers to held-out prompts,
  exact match and ROUGE-L against the references.
- ``export_hf``: the student gathered from its ZeRO-3 shards into an HF directory, swapped in
  atomically.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import kd
from kd.reduce import all_reduce_dict, all_reduce_values
from . import data


@torch.no_grad()
def held_out(models, loader, sp, cfg) -> dict:
    """Token-weighted means over the whole held-out set (every rank takes its shard). ``models``:
    the run's ``engines.Engines``."""
    student, teacher, classmate = models.student, models.teacher, models.classmate
    trained = models.trainable()
    for m in trained:
        m.engine.eval()
    totals: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), dtype=torch.float64, device=student.engine.device)

    def add(name, value, n):
        for key, v in ((name, value * n), (name + "/n", n)):
            totals[key] = totals.get(key, zero) + v

    head = dict(chunk_size=cfg.loss.chunk_size, vocab_size=cfg.model.vocab_size)

    def nll(name, model, hidden, labels):
        with model.gathered_head() as w:
            _, st = kd.fused_distill_loss(hidden, w, None, None, labels, method="sft", student_softcap=model.softcap,
                                          **head)
        add(f"eval_{name}_nll", st["ce"], st["tokens"])

    for batch in loader:
        batch = sp.shard(data.to_device(batch, student.engine.device))
        labels = batch["targets"].flatten()
        hidden = {m.name: m.forward_hidden(batch).flatten(0, 1) for m in (student, teacher, classmate) if m}
        for m in (student, teacher, classmate):
            if m:
                nll(m.name, m, hidden[m.name], labels)
        if teacher is None:
            continue
        with teacher.gathered_head() as w_t:
            for m, prefix in ((student, "eval_"), (classmate, "eval_classmate_")):
                if m is None:
                    continue
                with m.gathered_head() as w:
                    _, st = kd.fused_distill_loss(hidden[m.name], w, hidden["teacher"], w_t, labels,
                                                  method="forward_kl", metrics_k=cfg.loss.metrics_k if m is student
                                                  else None, student_softcap=m.softcap,
                                                  teacher_softcap=teacher.softcap, **head)
                for k, v in st.items():
                    if k not in ("tokens", "loss"):
                        add(f"{prefix}{k}", v, st["tokens"])
    for m in trained:
        m.engine.train()
    totals = all_reduce_dict(totals, dist.group.WORLD if dist.is_initialized() else None)
    return {k: float(v) / max(float(totals[k + "/n"]), 1.0) for k, v in totals.items() if not k.endswith("/n")}


def save_hf_meta(model, tokenizer, out_dir: Path) -> None:
    """config.json, generation_config.json and the tokenizer beside the checkpoints, so that
    ``kd-convert zero-to-hf`` can turn any checkpoint into a complete HF directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save(out_dir)


EXPORT_INFO = "kd_export.json"        # inside an export: the step it holds


def exported_step(out_dir: Path) -> int | None:
    info = Path(out_dir) / EXPORT_INFO
    return json.loads(info.read_text())["step"] if info.is_file() else None


def export_hf(student, tokenizer, out_dir: Path, step: int, trained: bool = True) -> None:
    """Collective. Rank 0 writes safetensors + config + tokenizer to a temp dir, then swaps it in
    for ``out_dir`` in one atomic rename: there is always a complete export at ``out_dir``. Skipped
    only when this process trained nothing and ``out_dir`` already holds this step."""
    out_dir = Path(out_dir)
    # every rank reads before any writes: the all-reduce is the meeting point
    group = dist.group.WORLD if dist.is_initialized() else None
    need, = all_reduce_values([float(trained or exported_step(out_dir) != step)], group, "max",
                              student.engine.device)
    if not need:
        return
    engine = student.engine
    state = engine._zero3_consolidated_16bit_state_dict() if student.zero3 else engine.module.state_dict()
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp, state_dict={k: v.cpu() for k, v in state.items()})
    tokenizer.save(tmp)
    (tmp / EXPORT_INFO).write_text(json.dumps({"step": step}) + "\n")
    replace_dir(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``. Where ``target`` exists, Linux swaps the two in one
    ``renameat2(RENAME_EXCHANGE)`` and the old one is removed after; elsewhere (no such call, or a
    filesystem without it) two renames leave a moment without ``target``."""
    if not target.exists():
        os.replace(new, target)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if exchange is not None and exchange(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(target),
                                         rename_exchange) == 0:
        shutil.rmtree(new)                   # now holds the old contents
        return
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of tokenized prompts (left-padded batches), cut at EOS."""
    model.eval()
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        L = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_id] * (L - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
        for row in out[:, L:].tolist():
            row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            answers.append(tokenizer.decode(row))
    return answers


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    a, b = pred.split(), ref.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)
