"""On-policy generation benchmark: ZeRO-3 generation vs plain ``generate``, and what sampling and class
KD add to a step.

One 2-rank deepspeed launch through the trainer's own pieces (``train.engines`` ZeRO-3 student, teacher
and classmate, ``train.rollout``, ``train.loop.train_step``), 1 thread per rank. Every case runs the same
prompts: ``--batch`` per rank, ``--prompt`` tokens on average (lengths vary: left padding), ``--new``
sampled tokens (no EOS: every sample is exactly that long). Generation, per rank (the slower rank's
figure), the cases interleaved in ``--rounds`` rounds (one more, untimed, first):

- plain: ``rollout.sample`` on the whole HF model (the same weights), no ZeRO, with torch's own
  ``F.linear`` (as in a process without DeepSpeed): in rank 0 alone while rank 1 waits (one process on
  the machine), and in both ranks at once (each with the share of the machine the ZeRO-3 cases have);
  and in both ranks through the ``F.linear`` DeepSpeed installs process-wide when it builds a ZeRO-3 model
  (``zero3_linear_wrap``, ``zero_optimization.memory_efficient_linear``), the one the trainer generates with;
- gathered: ``Engine.for_generation()`` (every parameter gathered once per call, ZeRO hooks off) +
  ``sample``, as the trainer runs it; the time includes the gather, also timed alone (entering the
  context, no generate) (``for_generation`` puts torch's ``F.linear`` back for the call); and the same
  through DeepSpeed's ``F.linear``, for contrast;
- layerwise: ``for_generation(layerwise=True)``, ZeRO-3's own per-layer gathers on every token, ranks
  in lockstep (``synced_gpus``).

Steps (``train_step``, micro batch ``--batch`` per rank, GRKD, median of the timed steps, interleaved):
off-policy GRKD, also right after an (untimed) empty ``for_generation()`` (DeepSpeed re-registers the
ZeRO-3 hooks on leaving it, which invalidates its prefetch trace: the next forward re-records it);
on-policy GRKD (``onpolicy.mode=always``: every micro-batch sampled), with the share of
the step spent in generate (``generation_s`` from the step's stats); class KD (``model.classmate`` set,
``onpolicy.mode=gkd``, fraction 0.5, ``classmate.update_every=2``), its steps split by kind: a sampled
micro-batch (generate, classmate forward for the misfeedback) or a dataset micro-batch on which the
classmate learns (its forward/backward and optimizer step; timed on every dataset micro-batch, where
the loop does it on every ``update_every``-th step and otherwise runs the off-policy step); and the
expected class-KD step at these settings from those medians (4 class-KD steps per round, sampled or not
as the seeded draws fall).

    python benchmarks/rollout_bench.py                      # 256 x 4 student, V=4096, 8 prompts, 64 new
    python benchmarks/rollout_bench.py --new 32 --rounds 2  # quicker
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
TEACHER = dict(STUDENT, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
VOCAB = 4096
PAD = 0


def prompts_of_rank(rank: int, batch: int, mean_len: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(1000 + rank)
    lengths = torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def timed_sample(model, prompts, args, **kw) -> float:
    import torch

    from train.rollout import sample
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = sample(model, prompts, max_new_tokens=args.new, pad_id=PAD, eos_id=None, max_len=args.max_len, **kw)
    dt = time.perf_counter() - t0
    assert all(len(r) == args.new for r in out)
    return dt


# ---------------------------------------------------------------------------------------- one rank

def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from train import data, engines, parallel
    from train.config import load_config
    from train.loop import train_step
    from train.rollout import Rollout

    torch.set_num_threads(1)
    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(args.workdir)
    common = [f"model.student={work / 'student'}", f"model.teacher={work / 'teacher.json'}", "model.dtype=fp32",
              "model.attn_implementation=sdpa", f"model.vocab_size={VOCAB}", f"data.train={work}",
              f"data.max_len={args.max_len}", f"train.micro_batch={args.batch}", "train.steps=100",
              "loss.method=grkd", "loss.chunk_size=256", f"onpolicy.max_new_tokens={args.new}",
              f"parallel.nproc={world}"]
    cfg_off = load_config(None, common)
    cfg_always = load_config(None, common + ["onpolicy.mode=always"])
    cfg_ckd = load_config(None, common + [f"model.classmate={work / 'classmate.json'}", "onpolicy.mode=gkd",
                                          "onpolicy.fraction=0.5", "classmate.update_every=2"])
    sp = parallel.SequenceParallel(1)
    models = engines.build(cfg_ckd, world, VOCAB, sp)           # student, teacher, classmate
    no_classmate = engines.Engines(models.student, models.teacher)
    student = models.student
    prompts = prompts_of_rank(rank, args.batch, args.prompt)
    plain = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()

    # ---- generation: interleaved rounds, the first one not timed
    # Building a ZeRO-3 model makes DeepSpeed replace torch.nn.functional.linear for the whole process
    # (zero.Init's memory-efficient linear, "persists unless manually reset"): the ZeRO-3 cases run
    # through it as the trainer does; the plain ones get torch's own, as a process without DeepSpeed has.
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit
    assert F.linear is zero3_linear_wrap, "DeepSpeed no longer patches F.linear: drop the torch_linear cases"
    torch_linear = ZeroInit.linear_bk

    @contextlib.contextmanager
    def linear(fn):
        saved, F.linear = F.linear, fn
        try:
            yield
        finally:
            F.linear = saved

    def plain_sample(fn=torch_linear):
        with linear(fn):
            return timed_sample(plain, prompts, args)

    def gathered(fn=None):
        t0 = time.perf_counter()
        with student.for_generation() as lm, (linear(fn) if fn else contextlib.nullcontext()):
            timed_sample(lm, prompts, args)
        return time.perf_counter() - t0

    def layerwise():
        t0 = time.perf_counter()
        with student.for_generation(layerwise=True) as lm:
            timed_sample(lm, prompts, args, synced=True)
        return time.perf_counter() - t0

    def gather_only():
        t0 = time.perf_counter()
        with student.for_generation():
            pass
        return time.perf_counter() - t0

    cases = {"plain_alone": lambda: plain_sample() if rank == 0 else None,     # rank 1 waits at the barrier
             "plain_in_rank": plain_sample, "plain_patched": lambda: plain_sample(zero3_linear_wrap),
             "gathered": gathered, "gathered_ds_linear": lambda: gathered(zero3_linear_wrap), "layerwise": layerwise,
             "gather_only": gather_only}
    gen = {k: [] for k in cases}
    for r in range(args.rounds + 1):
        for name, fn in cases.items():
            dist.barrier()
            dt = fn()
            if r and dt is not None:
                gen[name].append(dt)
    del plain

    # ---- steps
    class Prompted(torch.utils.data.Dataset):
        """Random prompts (lengths as above) with random responses of --new tokens."""
        def __len__(self):
            return 64

        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            p = rng.integers(3, VOCAB, rng.integers(args.prompt // 2, args.prompt * 3 // 2 + 1)).tolist()
            response = rng.integers(3, VOCAB, args.new).tolist()
            return {"input_ids": np.asarray(p + response), "labels": np.asarray([-100] * len(p) + response),
                    "prompt_len": np.int64(len(p))}

    loader = data.make_loader(Prompted(), args.batch, sp.dp_rank, sp.dp_world, pad_id=PAD)
    rollouts = {name: Rollout(c, student, sp, loader.collate_fn, pad_id=PAD, eos_id=None)
                for name, c in (("off", cfg_off), ("always", cfg_always), ("ckd", cfg_ckd))}
    rollouts["off_after_gen"] = rollouts["off"]
    steps = {"off": [], "off_after_gen": [], "always": [], "ckd": []}

    def step(name):
        rollout = rollouts[name]
        if name == "off_after_gen":      # enter and leave generation (untimed): what is left for the step?
            with student.for_generation():
                pass
        before = dict(rollout.counts)
        # The loop lets the classmate learn on the steps divisible by update_every; here it learns on
        # every dataset micro-batch, so that each one is timed (on the others the classmate does not run:
        # the off-policy step). classmate_learns is a no-op on a sampled micro-batch.
        learns = name == "ckd"
        dist.barrier()
        t0 = time.perf_counter()
        stats = train_step(models if name == "ckd" else no_classmate, loader, rollout, sp,
                           {"ckd": cfg_ckd, "always": cfg_always}.get(name, cfg_off), progress=0.5,
                           classmate_learns=learns)
        dt = time.perf_counter() - t0
        assert stats is not None
        src = [k for k in rollout.counts if rollout.counts[k] != before[k]]
        return {"s": dt, "generation_s": stats.get("generation_s", 0.0), "source": src[0] if src else "dataset",
                "classmate_learns": learns, "loss": stats["loss"]}

    # warm-up (optimizer states, allocators): every kind of step once before any is timed
    for name in ("off", "always"):
        step(name)
    seen = set()
    for _ in range(12):
        seen.add(step("ckd")["source"])
        if {"fresh", "dataset"} <= seen:
            break
    for _ in range(args.rounds):
        for name in ("off", "off_after_gen", "always", "ckd", "ckd", "ckd", "ckd"):
            steps[name].append(step(name))

    result = {"rank": rank, "gen": gen, "steps": steps}
    everything = [None] * world
    dist.all_gather_object(everything, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(everything))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="prompts per rank (and the micro batch)")
    ap.add_argument("--prompt", type=int, default=32, help="mean prompt length (half to 1.5x)")
    ap.add_argument("--new", type=int, default=64, help="sampled tokens per prompt")
    ap.add_argument("--max-len", type=int, default=160, help="data.max_len")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds (before them: an untimed generation round, and each kind of step once)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
    spec = dict(STUDENT, vocab_size=VOCAB)
    (workdir / "teacher.json").write_text(json.dumps(dict(TEACHER, vocab_size=VOCAB)))
    (workdir / "classmate.json").write_text(json.dumps(spec))
    kind = spec.pop("model_type")
    torch.manual_seed(0)        # the student as an HF directory: the ranks and the plain baseline load it
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **spec))
    model.save_pretrained(workdir / "student")
    n_params = sum(p.numel() for p in model.parameters())
    del model

    out = workdir / "result.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TRANSFORMERS_VERBOSITY": "error"}
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000), __file__, "--worker",
           "--workdir", str(workdir), "--out", str(out), "--batch", str(args.batch), "--prompt", str(args.prompt),
           "--new", str(args.new), "--max-len", str(args.max_len), "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the deepspeed launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    ranks = json.loads(out.read_text())
    shutil.rmtree(workdir, ignore_errors=True)

    med = statistics.median
    tokens = args.batch * args.new                        # per rank and call
    gen = {name: max(med(r["gen"][name]) for r in ranks if r["gen"][name])   # the slower rank
           for name in ranks[0]["gen"]}

    print(f"student {STUDENT['hidden_size']}x{STUDENT['num_hidden_layers']} ({n_params / 1e6:.1f}M params), teacher "
          f"{TEACHER['hidden_size']}x{TEACHER['num_hidden_layers']}, V={VOCAB}; {args.batch} prompts per rank "
          f"(mean {args.prompt} tokens), {args.new} sampled tokens each; 2 ranks x 1 thread; median of "
          f"{args.rounds} rounds\n")
    print("| generation (per rank) | s per call | tokens/s | vs plain alone | vs plain in rank |\n|---|---|---|---|---|")
    labels = {"plain_alone": "plain `generate`, whole model, one process (rank 0 alone)",
              "plain_in_rank": "plain `generate`, whole model, in each rank at once",
              "plain_patched": "plain `generate` in each rank, through DeepSpeed's `F.linear`",
              "gathered": "**ZeRO-3, gathered once per call (`for_generation()`), as the trainer runs it**",
              "gathered_ds_linear": "ZeRO-3 gathered, through DeepSpeed's `F.linear` (before the trainer restored torch's)",
              "layerwise": "ZeRO-3, layerwise (`for_generation(layerwise=True)`, synced)"}
    for name, label in labels.items():
        print(f"| {label} | {gen[name]:.2f} | {tokens / gen[name]:.0f} | {gen['plain_alone'] / gen[name]:.2f} | "
              f"{gen['plain_in_rank'] / gen[name]:.2f} |")
    print(f"\nof which the gather (entering `for_generation()`, {n_params * 4 / 1e6:.0f} MB fp32): "
          f"{gen['gather_only'] * 1e3:.0f} ms per call")

    def step_med(name, pick=lambda s: True, key="s"):
        rows = [[s for s in r["steps"][name] if pick(s)] for r in ranks]
        if not rows[0]:
            return None
        return max(med(s[key] for s in rs) for rs in rows)

    off = step_med("off")
    always, always_gen = step_med("always"), step_med("always", key="generation_s")
    sampled = lambda s: s["source"] == "fresh"                               # noqa: E731
    learning = lambda s: s["source"] == "dataset"                            # noqa: E731
    ckd_rows = ranks[0]["steps"]["ckd"]
    print(f"\n| step (micro batch {args.batch} per rank) | time | in generate | generate share | vs off-policy GRKD |"
          "\n|---|---|---|---|---|")
    print(f"| off-policy GRKD | {off:.2f} s | | | 1.00 |")
    after = step_med("off_after_gen")
    print(f"| off-policy GRKD right after entering and leaving `for_generation()` (nothing generated) | {after:.2f} s "
          f"| | | {after / off:.2f} |")
    print(f"| on-policy GRKD (mode always) | {always:.2f} s | {always_gen:.2f} s | {always_gen / always:.0%} | "
          f"{always / off:.2f} |")
    kinds = {}
    for name, label, pick in (("sampled", "class KD, sampled micro-batch", sampled),
                              ("learns", "class KD, dataset micro-batch, classmate learns", learning)):
        t, g = kinds[name] = step_med("ckd", pick), step_med("ckd", pick, "generation_s")
        label += f" ({sum(map(pick, ckd_rows))} steps)"
        if t is None:
            print(f"| {label} | (none in this run) | | | |")
        else:
            print(f"| {label} | {t:.2f} s | {g:.2f} s | {g / t:.0%} | {t / off:.2f} |")
    if None not in (kinds["sampled"][0], kinds["learns"][0]):
        # lambda sampled; of the dataset micro-batches, 1 / update_every with the classmate learning, the
        # rest with the classmate idle (the off-policy step)
        lam, every = 0.5, 2
        t = lam * kinds["sampled"][0] + (1 - lam) * (kinds["learns"][0] / every + off * (1 - 1 / every))
        g = lam * kinds["sampled"][1]
        print(f"| class KD, expected step at gkd 0.5, update_every 2 (from the rows above) | {t:.2f} s | {g:.2f} s | "
              f"{g / t:.0%} | **{t / off:.2f}** |")
    print(f"\nZeRO-3 gathered / plain generate (tokens/s): {gen['plain_alone'] / gen['gathered']:.2f}x (goal >= 0.8x); "
          f"through DeepSpeed's F.linear: {gen['plain_alone'] / gen['gathered_ds_linear']:.2f}x; layerwise: "
          f"{gen['plain_alone'] / gen['layerwise']:.2f}x. [{time.perf_counter() - t_start:.0f} s]")


if __name__ == "__main__":
    main()
