"""Worker for test_classmate: class KD's classmate learns only from the teacher on dataset responses.

On every rank: the engines of a class-KD run (``train.engines.build``: ZeRO-3 student, teacher and
classmate), a real ``Rollout`` whose per-micro-batch decisions are forced, and ``train.loop.train_step``
called directly for a few steps (sources and ``classmate_learns`` in ``STEPS``). Around each step the
full weights of the student and the classmate are gathered; at each classmate optimizer step its full
gradient is captured and compared with the gradient of a plain forward KL(teacher || classmate) on the
step's dataset micro-batches only, computed here without DeepSpeed (plain copies of the gathered
weights, summed over the ranks). Rank 0 writes the findings as JSON to argv[2]; test_classmate.py judges.

Usage: classmate_worker.py RECIPE OUT_JSON [overrides...]
"""
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

import train.loop
from kd.reduce import IGNORE_INDEX
from train import data, engines, parallel
from train.launch import exit_process
from train.config import load_config
from train.rollout import Rollout
from train.tokenizer import load_tokenizer

# (sources of the grad_accum=2 micro-batches, classmate_learns)
STEPS = [(["fresh", "fresh"], True),         # only student samples: the classmate must not move
         (["fresh", "dataset"], True),       # mixed: it learns on the dataset micro-batch only
         (["dataset", "dataset"], False),    # not its step: it must not move
         (["dataset", "dataset"], True)]     # its step on dataset responses


def full_weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter, whole (a collective gather under ZeRO-3)."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().clone() for n, p in params.items()}


def plain_copy(model, weights: dict[str, torch.Tensor]):
    """The HF model as plain torch (no ZeRO), holding ``weights``."""
    copy = type(model)(model.config)
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if k in dict(copy.named_parameters())], (missing, unexpected)
    return copy.float().train(model.training)


def reference_grad(cfg, sp, device, classmate_w, teacher_w, models, batches) -> dict[str, torch.Tensor]:
    """d/dphi of sum over the counted tokens of every rank's ``batches`` of KL(p || c) / their number."""
    c_plain = plain_copy(models.classmate.model, classmate_w)
    t_plain = plain_copy(models.teacher.model, teacher_w).eval()
    shards = [sp.shard(data.to_device(b, device), packed=cfg.data.pack) for b in batches]
    count = torch.tensor(float(sum(int((s["targets"] != IGNORE_INDEX).sum()) for s in shards)))
    dist.all_reduce(count)
    T = cfg.loss.temperature
    total = 0.0
    for s in shards:
        inputs = dict(input_ids=s["input_ids"], attention_mask=s.get("attention_mask"),
                      position_ids=s.get("position_ids"), use_cache=False)
        with torch.no_grad():
            log_p = torch.log_softmax(t_plain(**inputs).logits.double() / T, -1)
        log_c = torch.log_softmax(c_plain(**inputs).logits.double() / T, -1)
        kl = (log_p.exp() * (log_p - log_c)).sum(-1)
        total = total + kl[s["targets"] != IGNORE_INDEX].sum()
    if shards:                  # none: the classmate should have learned nothing, a zero gradient
        (total / count).backward()
    grads = {}
    for n, p in c_plain.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[n] = g
    return grads


def main(argv):
    recipe, out_path, *overrides = argv
    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(recipe, overrides)
    assert cfg.model.classmate and cfg.onpolicy.mode == "gkd" and cfg.train.grad_accum == 2, cfg
    sp = parallel.SequenceParallel(cfg.parallel.sequence)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.student)
    train_set = data.TokenizedDataset(cfg.data.train, tokenizer, cfg.data.max_len)
    loader = data.make_loader(train_set, cfg.train.micro_batch, sp.dp_rank, sp.dp_world, cfg.train.seed,
                              pad_id=tokenizer.pad_id)
    models = engines.build(cfg, world, tokenizer.vocab_size, sp)
    assert models.classmate is not None and models.classmate.zero3 and models.student.zero3
    rollout = Rollout(cfg, models.student, sp, loader.collate_fn, tokenizer.pad_id, tokenizer.eos_id)
    device = models.student.engine.device

    # instruments: forced sources, the micro-batches train_step used, optimizer steps and the classmate's grads
    forced: list[str] = []
    rollout.source = lambda progress: forced.pop(0)
    used: list[tuple[dict, str]] = []
    real_next = rollout.next

    def recording_next(loader_, progress):
        batch, src = real_next(loader_, progress)
        used.append(({k: v.clone() for k, v in batch.items()}, src))
        return batch, src
    rollout.next = recording_next
    step_calls = {"student": 0, "classmate": 0}
    captured: dict[str, torch.Tensor] = {}
    real_step = deepspeed.DeepSpeedEngine.step

    def step(self, *args, **kwargs):
        if self is models.classmate.engine:
            step_calls["classmate"] += 1        # on every rank: the gather below is collective
            captured.update({n: safe_get_full_grad(p).detach().clone() for n, p in self.module.named_parameters()})
        elif self is models.student.engine:
            step_calls["student"] += 1
        return real_step(self, *args, **kwargs)
    deepspeed.DeepSpeedEngine.step = step

    teacher_w = full_weights(models.teacher.engine)
    findings = []
    for i, (sources, learns) in enumerate(STEPS):
        for m in models.trainable():
            engines.set_optimizer_settings(m, i, cfg)
        forced[:] = list(sources)
        used.clear()
        captured.clear()
        step_calls.update(student=0, classmate=0)
        s_before, c_before = full_weights(models.student.engine), full_weights(models.classmate.engine)
        stats = train.loop.train_step(models, loader, rollout, sp, cfg, progress=i / len(STEPS),
                                      classmate_learns=learns)
        s_after, c_after = full_weights(models.student.engine), full_weights(models.classmate.engine)
        assert not forced, forced
        row = {"sources": sources, "used": [src for _, src in used], "learns": learns,
               "stats": None if stats is None else {k: float(v) for k, v in stats.items()},
               "steps": dict(step_calls),
               "classmate_identical": all(torch.equal(c_before[n], c_after[n]) for n in c_before),
               "classmate_max_change": max(float((c_before[n] - c_after[n]).abs().max()) for n in c_before),
               "student_max_change": max(float((s_before[n] - s_after[n]).abs().max()) for n in s_before)}
        if captured:
            dataset_batches = [b for b, src in used if src == "dataset"]
            ref = reference_grad(cfg, sp, device, c_before, teacher_w, models, dataset_batches)
            num = sum(float((captured[n] - ref[n]).double().pow(2).sum()) for n in ref)
            den = sum(float(ref[n].double().pow(2).sum()) for n in ref)
            row.update(grad_rel_err=(num / den) ** 0.5 if den else float("inf"), grad_ref_norm=den ** 0.5,
                       grad_norm=sum(float(g.double().pow(2).sum()) for g in captured.values()) ** 0.5)
            # what the gradient would be if the sampled micro-batches had been learned on as well
            if len(dataset_batches) < len(used):
                wrong = reference_grad(cfg, sp, device, c_before, teacher_w, models, [b for b, _ in used])
                num = sum(float((captured[n] - wrong[n]).double().pow(2).sum()) for n in wrong)
                row["grad_rel_err_if_all_batches"] = (num / den) ** 0.5 if den else float("inf")
        findings.append(row)
        if rank == 0:
            print(f"[classmate_worker] step {i}: {json.dumps(row)}", flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "steps": findings}, f, indent=1)
    dist.barrier()
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    exit_process(main(args))
