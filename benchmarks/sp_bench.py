"""Sequence parallelism benchmark: per-rank peak memory and tokens/s of a real KD step, SP=1 vs SP=2.

Each (SP, sequence length) runs in its own 2-rank deepspeed launch through the trainer's own
pieces (``train.engines`` ZeRO-3 student + teacher, ``train.parallel``, ``train.loop.train_step``,
GRKD on the fused head). SP=1 is plain data parallelism (each rank a whole sequence); SP=2 splits one
sequence over both ranks. Per rank it records:

- step memory: peak RSS during a step minus RSS before it (activations, temporaries, gradients),
  with ``MALLOC_MMAP_THRESHOLD_`` low so freed tensors leave RSS and the next peak is its own;
- peak RSS: the whole process (weights, optimizer state, libraries) - what a memory cap sees;
- tokens/s: the global batch's tokens over the step time (median of the timed steps).

Prints the SP=2 / SP=1 ratios at every length, and the longest length that fits each setting under
``--cap-mb`` of per-rank peak RSS (lengths double from the first until both settings exceed it).

    python benchmarks/sp_bench.py                          # 2k, 4k, 8k; then doubling up to the cap
    python benchmarks/sp_bench.py --lengths 1024,2048 --cap-mb 0      # quick look, no cap search
    python benchmarks/sp_bench.py --chunk 1024           # a bigger fixed loss-head share per rank
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A Llama student and a 2x wider teacher with another head size (two Ulysses geometries).
STUDENT = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=65536, tie_word_embeddings=False)
TEACHER = dict(STUDENT, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
VOCAB = 8192


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")           # VmHWM := VmRSS


# ---------------------------------------------------------------------------------------- one rank

def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from train import data, engines, parallel
    from train.config import load_config
    from train.loop import train_step
    from train.rollout import Rollout

    torch.set_num_threads(1)
    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(args.workdir)
    cfg = load_config(None, [
        f"model.student={work / 'student.json'}", f"model.teacher={work / 'teacher.json'}", "model.dtype=fp32",
        "model.attn_implementation=sdpa", f"model.vocab_size={VOCAB}", f"data.train={work}", f"data.max_len={args.seq}",
        "train.micro_batch=1", f"train.steps={args.steps}", "loss.method=grkd", f"loss.chunk_size={args.chunk}",
        f"parallel.sequence={args.sp}", f"parallel.nproc={world}"])
    sp = parallel.SequenceParallel(args.sp)

    class Random(torch.utils.data.Dataset):
        """Whole sequences of random tokens, the first eighth a masked prompt."""
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = np.random.default_rng(i).integers(3, VOCAB, args.seq)
            labels = ids.copy()
            labels[: args.seq // 8] = data.IGNORE_INDEX
            return {"input_ids": ids, "labels": labels}

    loader = data.make_loader(Random(), 1, sp.dp_rank, sp.dp_world, pad_id=0, pad_to_multiple_of=sp.pad_to_multiple_of)
    models = engines.build(cfg, world, VOCAB, sp)
    rollout = Rollout(cfg, models.student, sp, loader.collate_fn, pad_id=0, eos_id=None)   # mode off: the dataset
    times, step_mb, peak_mb = [], [], []
    for step in range(args.steps):
        dist.barrier()
        before = status_kb("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        stats = train_step(models, loader, rollout, sp, cfg, progress=0.5)
        dist.barrier()
        if step > 0:                 # step 0 creates the optimizer state
            times.append(time.perf_counter() - t0)
            step_mb.append((status_kb("VmHWM") - before) / 1024)
            peak_mb.append(status_kb("VmHWM") / 1024)
    result = {"sp": args.sp, "seq": args.seq, "rank": rank, "step_s": statistics.median(times),
              "tokens_per_s": args.seq * sp.dp_world / statistics.median(times),
              "step_mb": max(step_mb), "peak_mb": max(peak_mb), "loss": stats["loss"]}
    all_results = [None] * world
    dist.all_gather_object(all_results, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(all_results))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver

def launch(workdir: Path, sp: int, seq: int, steps: int, chunk: int) -> dict:
    out = workdir / f"sp{sp}_{seq}.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": str(REPO)}
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(29500 + (os.getpid() + seq + sp) % 1000),
           __file__, "--worker", "--sp", str(sp), "--seq", str(seq), "--steps", str(steps), "--chunk", str(chunk),
           "--workdir", str(workdir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"sp": sp, "seq": seq, "error": "killed: out of memory" if "Killed" in tail or proc.returncode == -9
                else f"exit {proc.returncode}: {tail}"}
    ranks = json.loads(out.read_text())
    return {"sp": sp, "seq": seq, "step_s": max(r["step_s"] for r in ranks),
            "tokens_per_s": min(r["tokens_per_s"] for r in ranks), "step_mb": max(r["step_mb"] for r in ranks),
            "peak_mb": max(r["peak_mb"] for r in ranks), "loss": ranks[0]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--chunk", type=int, default=256,
                    help="loss.chunk_size: the fused head's memory (~10 x chunk x V fp32) is the same at any SP")
    ap.add_argument("--cap-mb", type=float, default=1280.0, help="per-rank peak RSS cap for the fit search (0: skip)")
    ap.add_argument("--max-length", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3, help="steps per run; the first is not timed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    workdir = Path(tempfile.mkdtemp(prefix="sp_bench_"))
    for name, spec in (("student", STUDENT), ("teacher", TEACHER)):
        (workdir / f"{name}.json").write_text(json.dumps(dict(spec, vocab_size=VOCAB)))
    results = {}

    def measure(sp, seq):
        if (sp, seq) not in results:
            t0 = time.perf_counter()
            results[sp, seq] = r = launch(workdir, sp, seq, args.steps, args.chunk)
            print(f"  SP={sp} T={seq}: " + (r.get("error") or f"step {r['step_s']:.2f} s, "
                  f"{r['tokens_per_s']:.0f} tok/s, step memory {r['step_mb']:.0f} MB, peak RSS {r['peak_mb']:.0f} MB")
                  + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        return results[sp, seq]

    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"student {STUDENT['hidden_size']}x{STUDENT['num_hidden_layers']}, teacher {TEACHER['hidden_size']}x"
          f"{TEACHER['num_hidden_layers']}, V={VOCAB}, 2 ranks x 1 thread, GRKD (chunk {args.chunk}), micro batch 1 "
          "per DP rank")
    for seq in lengths:
        for sp in (1, 2):
            measure(sp, seq)

    print("\n| T | SP=1 step memory | SP=2 step memory | ratio | SP=1 peak RSS | SP=2 peak RSS | SP=1 tok/s | SP=2 tok/s |"
          " tok/s ratio |\n|---|---|---|---|---|---|---|---|---|")
    for seq in lengths:
        a, b = results[1, seq], results[2, seq]
        if "error" in a or "error" in b:
            print(f"| {seq} | {a.get('error', '')} | {b.get('error', '')} | | | | | | |")
            continue
        print(f"| {seq} | {a['step_mb']:.0f} MB | {b['step_mb']:.0f} MB | {b['step_mb'] / a['step_mb']:.2f} | "
              f"{a['peak_mb']:.0f} MB | {b['peak_mb']:.0f} MB | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
              f"{b['tokens_per_s'] / a['tokens_per_s']:.2f} |")

    if args.cap_mb > 0:
        print(f"\nlongest length under a per-rank peak RSS cap of {args.cap_mb:.0f} MB (lengths doubling from "
              f"{lengths[0]}):")
        for sp in (1, 2):
            seq, best = lengths[0], None
            while seq <= args.max_length:
                r = measure(sp, seq)
                if "error" in r or r["peak_mb"] > args.cap_mb:
                    break
                best, seq = seq, seq * 2
            print(f"  SP={sp}: {best or 'none'}")


if __name__ == "__main__":
    main()
