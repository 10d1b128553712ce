"""Worker for test_rollout: generation from the ZeRO-3 student on 2 deepspeed CPU ranks, through the
trainer's own pieces (``train.engines.build``, ``Engine.for_generation``, ``train.rollout``).

    rollout_worker.py WORKDIR first    greedy (gathered and layerwise), all-gather counts, sampling
                                       through Rollout, a save/restore of its state (saved to WORKDIR)
    rollout_worker.py WORKDIR second   a new launch: sampling from the seed again, and from the state
                                       the first launch saved

WORKDIR holds ``student/`` (an HF directory, written by the test). Rank 0 writes
``WORKDIR/<phase>.json``: one entry per rank. The test compares them (the worker asserts only its own
setup: a ZeRO-3 student, exactly N tokens where no EOS can stop a row).
"""
import argparse
import copy
import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

PAD, EOS, VOCAB = 0, 1, 128
MAX_LEN = 64

parser = argparse.ArgumentParser()
parser.add_argument("workdir", type=Path)
parser.add_argument("phase", choices=("first", "second"))
parser.add_argument("--local_rank", type=int, default=0)   # the deepspeed launcher adds it
args = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train import data, engines, parallel  # noqa: E402
from train.config import load_config  # noqa: E402
from train.rollout import Rollout, sample  # noqa: E402

torch.set_num_threads(1)
parallel.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
work = args.workdir
student_dir = work / "student"
# loss.method=sft: no teacher engine (generation needs only the student); the on-policy settings are
# set after loading, since a recipe with onpolicy.mode != off must have a teacher
cfg = load_config(None, [f"model.student={student_dir}", "model.dtype=fp32", "model.attn_implementation=sdpa",
                         f"data.train={work / 'unused.jsonl'}", f"data.max_len={MAX_LEN}", "train.micro_batch=3",
                         "train.seed=5", "loss.method=sft", f"parallel.nproc={world}"])
cfg.onpolicy.mode, cfg.onpolicy.max_new_tokens = "always", 10
cfg.onpolicy.temperature, cfg.onpolicy.top_p = 1.5, 0.9
sp = parallel.SequenceParallel(1)
student = engines.build(cfg, world, VOCAB, sp).student
assert student.zero3
collate = data.Collator(PAD)


# ----------------------------------------------------------------------------- ZeRO-3 all-gathers

class GatherCounter:
    """Every all-gather DeepSpeed issues (parameter fetches of either kind end in one of these two
    calls of its comm backend), counted while ``on``."""

    def __init__(self):
        import deepspeed.comm.comm as ds_comm
        self.n, self.on = 0, False
        backend = ds_comm.cdb
        for name in ("all_gather_into_tensor", "all_gather"):
            original = getattr(backend, name)

            def counted(*a, _original=original, **kw):
                if self.on:
                    self.n += 1
                return _original(*a, **kw)
            setattr(backend, name, counted)

    def __enter__(self):
        self.n, self.on = 0, True
        return self

    def __exit__(self, *exc):
        self.on = False


class GatherCounterView:
    """The all-gathers of a nested block (the counter keeps running for the outer one)."""

    def __init__(self, outer):
        self.outer = outer

    def __enter__(self):
        self.start = self.outer.n
        return self

    def __exit__(self, *exc):
        self.n = self.outer.n - self.start


counter = GatherCounter()


def greedy(prompts, layerwise, max_new_tokens, eos_id=EOS):
    """``sample`` through ``for_generation``: the tokens, the all-gathers of the whole call (entering
    the context included) and those of ``generate`` itself."""
    with counter as whole:
        with student.for_generation(layerwise) as lm:
            with GatherCounterView(whole) as inner:
                out = sample(lm, prompts, max_new_tokens=max_new_tokens, pad_id=PAD, eos_id=eos_id, max_len=MAX_LEN,
                             greedy=True, synced=layerwise)
    return out, whole.n, inner.n


result = {"rank": rank}
g = torch.Generator().manual_seed(100 + rank)


def prompt(n):
    return torch.randint(2, VOCAB, (n,), generator=g).tolist()


if args.phase == "first":
    # different prompts on each rank, of different lengths (left padding), another batch width per rank
    prompts = [prompt(n) for n in ((3, 9, 5) if rank == 0 else (6, 2, 11))]
    result["prompts"] = prompts
    result["greedy_args"] = dict(max_new_tokens=12, pad_id=PAD, eos_id=EOS, max_len=MAX_LEN)   # the test's reference
    result["greedy_gathered"], _, _ = greedy(prompts, False, 12)
    result["greedy_layerwise"], _, _ = greedy(prompts, True, 12)
    # no EOS: exactly N new tokens on each rank
    counts = {}
    for mode, layerwise in (("gathered", False), ("layerwise", True)):
        for n in (4, 12):
            tokens, whole, inner = greedy(prompts, layerwise, n, eos_id=None)
            assert all(len(t) == n for t in tokens)
            counts[f"{mode}_{n}"] = {"call": whole, "generate": inner}
    result["gathers"] = counts


# ----------------------------------------------------------------------------- sampling through Rollout

def sampled(rollout, n_draws):
    """``n_draws`` micro-batches from ``rollout`` (mode always): the same prompts every time and on
    both ranks, so any difference comes from the sampling stream."""
    shared = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB, (n,), generator=shared).tolist() for n in (4, 8, 6)]
    items = [{"input_ids": torch.tensor(p + [2, 3]).numpy(), "labels": torch.tensor([-100] * len(p) + [2, 3]).numpy(),
              "prompt_len": len(p)} for p in prompts]
    batch = collate(items)
    draws = []
    for _ in range(n_draws):
        before = torch.get_rng_state().clone()
        out, src = rollout.next(iter([batch]), progress=0.0)
        draws.append({"source": src, "rng_unchanged": bool(torch.equal(before, torch.get_rng_state())),
                      "responses": [row[p:int(m.sum())].tolist()
                                    for row, p, m in zip(out["input_ids"], out["prompt_len"].tolist(),
                                                         out["attention_mask"])]})
    return draws


def new_rollout():
    return Rollout(cfg, student, sp, collate, PAD, EOS)


def snapshot(rollout):
    """The rollout's checkpointed state through a torch.save round trip, as a checkpoint holds it."""
    buf = io.BytesIO()
    torch.save({"state": rollout.state_dict(), "rank": rollout.rank_state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


torch.manual_seed(1234)            # the training RNG, which sampling must leave alone
training_rng = torch.get_rng_state().clone()
state_file = work / f"rollout_rank{rank}.pt"
if args.phase == "first":
    r = new_rollout()
    first = sampled(r, 1)
    saved = snapshot(r)
    torch.save(saved, state_file)
    rest = sampled(r, 2)
    result["uninterrupted"] = first + rest
    restored = new_rollout()
    restored.load_state_dict(copy.deepcopy(saved["state"]), copy.deepcopy(saved["rank"]))
    result["restored_in_process"] = sampled(restored, 2)
else:
    result["uninterrupted"] = sampled(new_rollout(), 3)
    saved = torch.load(state_file, weights_only=False)
    restored = new_rollout()
    restored.load_state_dict(saved["state"], saved["rank"])
    result["restored_from_file"] = sampled(restored, 2)
result["training_rng_unchanged"] = bool(torch.equal(training_rng, torch.get_rng_state()))

everything = [None] * world
dist.all_gather_object(everything, result)
if rank == 0:
    (work / f"{args.phase}.json").write_text(json.dumps(everything))
dist.barrier()
dist.destroy_process_group()
