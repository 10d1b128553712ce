"""The cached teacher (``model.teacher=cache:DIR``) against the live one: step time, bytes on disk,
build speed, and the students it makes. Sections (``--sections``, default step,bytes,build; ``--quality``
adds the slow one):

- step: one process, no DeepSpeed (as step_bench.py). Live step = teacher forward (no grad) + student
  forward/backward + fused loss + AdamW; cache step = the same without the teacher, its top-k rows read
  back from a real on-disk cache (written once, outside the timed region, by ``top_rows`` in kd-train's
  layout; ``TeacherCache.rows`` casts as training does, and its time is shown apart). Interleaved, median
  of ``--reps`` after a warm-up round, next to the FLOP-model ideal ``6 N_s / (6 N_s + 2 N_t)`` (N: matmul
  parameters, no input embedding; the ideal counts the loss as free). Every token is counted.
  Configs: ``demo`` (the demo's student preset and teacher config, its vocabulary, 16 x 64 tokens) and
  ``larger`` (512 x 4 student, 1024 x 8 teacher, V = 8192, 8 x 256 tokens). Random weights: time does
  not depend on them.
- bytes: bytes per counted token for k = 16, 64, 128: ``row_bytes`` and a 4096-row shard written to
  disk, for Llama-3's V = 128256 (17-bit ids) and the demo's vocabulary (9 bits), fp16 and bf16
  values; with the demo, also the manifest's ``bytes_per_token`` of real ``kd-train mode=cache-teacher``
  builds (2 ranks; skipped by --quick). Anchor: DistillKit's ~300 B/token at k = 128.
- build: tokens/s of the teacher's plain forward (HF forward with logits) against a cache build's
  forward + ``top_rows`` + cast + one shard written (fsync'd, as kd-train writes), same configs as step.
- quality: the demo task: GRKD and forward-KL students from the live teacher and from a k = 64 cache
  (``kd-train recipes/demo.yaml``, the recipe's settings, ``--seeds`` student seeds each, paired by seed;
  kernels pinned as in the demo). One seed is not enough: a live and a k = V cache run whose losses agree
  to 1e-6 for 50 steps end 300 steps apart by as much as two seeds do (the chaotic trajectory of a
  high learning rate), so only the spread over seeds tells a real difference.
  Exact match, ROUGE-L and top-1 agreement with the teacher from ``train.demo.compare`` (greedy, held-out
  prompts), NLL from each run's final eval in metrics.jsonl, median step time from its per-step log.

    python benchmarks/cache_bench.py                    # step + bytes + build (~3 min on 2 idle cores)
    python benchmarks/cache_bench.py --quality          # + the demo students (12 x 300 steps, ~12 min more)
    python benchmarks/cache_bench.py --sections quality --steps 100
    python benchmarks/cache_bench.py --quick            # smoke run (< 1 min)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import kd  # noqa: E402
from step_bench import hidden, llama, matmul_params  # noqa: E402
from train import cache as tc  # noqa: E402
from train.models import model_config  # noqa: E402

RECIPE = REPO / "recipes" / "demo.yaml"
DEMO_TEACHER = REPO / "runs" / "demo-teacher" / "student-hf"
DISTILLKIT_K128 = 300          # DistillKit's on-disk bytes per token at k = 128 (the issue's anchor)
LLAMA3_VOCAB = 128256


@functools.cache
def configs(quick: bool) -> dict:
    """name -> (student, teacher, vocab, batch, seq); --quick shrinks ``larger`` (the demo is small already)."""
    if DEMO_TEACHER.is_dir():
        t_cfg = model_config(str(DEMO_TEACHER))
    else:                       # no demo teacher trained here: its preset has the same shapes
        t_cfg = model_config("demo-teacher", 395)
    V = t_cfg.vocab_size
    demo = (AutoModelForCausalLM.from_config(model_config("demo-student", V)),
            AutoModelForCausalLM.from_config(t_cfg), V, 16, 64)
    s, t, V, B, L = ((256, 2), (512, 2), 4096, 4, 128) if quick else ((512, 4), (1024, 8), 8192, 8, 256)
    return {"demo": demo, "larger": (llama(*s, V), llama(*t, V), V, B, L)}


def interleaved(cases: dict, reps: int) -> dict:
    """Median seconds per case; rounds alternate the cases so drift in machine load hits all alike."""
    times = {k: [] for k in cases}
    for i in range(reps + 1):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if i:                 # round 0 warms up allocators and kernels
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def save_shard(path: Path, ids, values, log_tail, vocab: int, dtype: str) -> None:
    tc.write_shard(path, [tc.stored(ids, values, log_tail, vocab, dtype)], ids.shape[0])   # kd-train's own write


def write_cache(out: Path, ids, values, log_tail, vocab: int, per_item: list[int], dtype: str = "fp16") -> Path:
    """A one-shard cache in kd-train's layout (``prepare``, the shard, the completed manifest), so that
    ``TeacherCache`` reads it exactly as a training run does."""
    offsets = np.concatenate([[0], np.cumsum(per_item)]).astype(np.int64)
    fp = {"teacher": "cache_bench (random weights)", "vocab": vocab, "k": ids.shape[1], "temperature": 1.0,
          "dtype": dtype, "tokenizer": "-", "data.train": "-", "data.max_len": 0, "data.pack": False}
    layout = {"items": len(per_item), "rows": int(offsets[-1]), "shard_items": len(per_item), "shards": 1,
              "id_bits": tc.id_bits(vocab), "items_sha256": "-"}
    tc.prepare(out, fp, layout, offsets)
    save_shard(out / "shard-00000.safetensors", ids, values, log_tail, vocab, dtype)
    tc.finish(out)
    return out


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    print(flush=True)


def step_section(args, work: Path) -> None:
    print(f"## step: live teacher vs cache (k={args.k} fp16), method={args.method}, median of {args.reps}\n")
    rows = []
    for name, (student, teacher, V, B, L) in configs(args.quick).items():
        torch.manual_seed(0)
        teacher.eval().requires_grad_(False)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        ids = torch.randint(0, V, (B, L))
        labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1).flatten()
        with torch.no_grad():
            top = tc.top_rows(hidden(teacher, ids)[labels != -100], teacher.lm_head.weight, None, V, args.k, 1.0, 1024)
        cache = tc.TeacherCache(write_cache(work / f"step-{name}", *top, V, [L - 1] * B))
        numbers, read = torch.arange(B * (L - 1)), []

        def step(t_h=None, t_w=None, topk=None):
            loss, _ = kd.fused_distill_loss(hidden(student, ids), student.lm_head.weight, t_h, t_w, labels,
                                            method=args.method, progress=0.5, teacher_topk=topk)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def live():
            with torch.no_grad():
                t_h = hidden(teacher, ids)
            step(t_h, teacher.lm_head.weight)

        def cached():
            t0 = time.perf_counter()
            topk = cache.rows(numbers)        # the shard is in the page cache after the first round
            read.append(time.perf_counter() - t0)
            step(topk=topk)

        med = interleaved({"live": live, "cache": cached}, args.reps)
        n_s, n_t = matmul_params(student), matmul_params(teacher)
        ideal = 6 * n_s / (6 * n_s + 2 * n_t)
        rows.append([name, f"{n_s / 1e6:.2f}M / {n_t / 1e6:.2f}M", V, f"{B}x{L}",
                     f"{med['live'] * 1e3:.0f} ms ({B * L / med['live']:.0f} tok/s)",
                     f"{med['cache'] * 1e3:.0f} ms ({B * L / med['cache']:.0f} tok/s)",
                     f"{statistics.median(read[1:]) * 1e3:.1f} ms", f"**{med['cache'] / med['live']:.2f}**",
                     f"{ideal:.2f}"])
    table(["config", "N student / teacher", "V", "tokens", "live step", "cache step", "of which read",
           "cache / live", "ideal 6Ns/(6Ns+2Nt)"], rows)


def kd_train(work: Path, name: str, overrides: list[str]) -> tuple[float, str]:
    """One ``kd-train recipes/demo.yaml`` (2 ranks, the demo's pinned kernels: ``quality.kd_train``);
    (wall s, its log)."""
    from quality import kd_train as run
    log = work / "logs" / f"{name}.log"
    t0 = time.time()
    run(RECIPE, overrides, log)
    return time.time() - t0, log.read_text()


def demo_cache(work: Path, k: int, built: dict) -> dict:
    """A real cache of the demo's data (kd-train mode=cache-teacher); once per k per invocation."""
    if k not in built:
        out = work / f"demo-cache-k{k}"
        wall, text = kd_train(work, f"cache-k{k}", ["mode=cache-teacher", f"cache.out={out}", f"cache.k={k}"])
        speed = re.search(r"done: (\d+) tokens in ([\d.]+) s \((\d+) tokens/s\)", text)
        built[k] = {"dir": out, "wall": wall, "tokens_s": int(speed.group(3)) if speed else None,
                    "manifest": json.loads((out / tc.MANIFEST).read_text())}
    return built[k]


def bytes_section(args, work: Path, built: dict) -> None:
    demo_V = model_config(str(DEMO_TEACHER)).vocab_size if DEMO_TEACHER.is_dir() else 395
    print("## bytes per counted token on disk (ids + values + fp32 log tail)\n")
    rows, n = [], 4096
    for V, what in ((LLAMA3_VOCAB, "Llama-3"), (demo_V, "demo")):
        for k in (16, 64, 128):
            cells = [f"{V} ({what})", k, f"{tc.id_bits(V)} bits"]
            for dtype in ("fp16", "bf16"):
                path = work / f"bytes-{V}-{k}-{dtype}.safetensors"   # the shard layout, random contents
                save_shard(path, torch.randint(0, V, (n, k)), torch.randn(n, k), torch.randn(n), V, dtype)
                cells += [tc.row_bytes(k, V, dtype), f"{path.stat().st_size / n:.1f}"]
            if what == "demo" and not args.quick:
                b = demo_cache(work, k, built)
                cells.append(f"{b['manifest']['bytes_per_token']:.1f} ({b['manifest']['rows']} rows, "
                             f"{b['tokens_s']} tok/s)")
            else:
                cells.append("-" if what != "demo" else "(--quick: not built)")
            cells.append(f"{float(cells[4]) / DISTILLKIT_K128:.2f}x" if k == 128 else "")
            rows.append(cells)
    table(["V", "k", "ids", "fp16 row_bytes", f"fp16 on disk ({n} rows)", "bf16 row_bytes",
           f"bf16 on disk ({n} rows)", "kd-train demo cache, fp16 (manifest)", f"vs DistillKit ~{DISTILLKIT_K128} B"],
          rows)
    print("(ids bit-packed, values as stored, log tail fp32; DistillKit also quantises the values, lossily. "
          "The kd-train tokens/s count only trained tokens, over the demo's padded 64-token rows)\n")


def build_section(args, work: Path) -> None:
    print(f"## build: teacher forward vs forward + top-{args.k} + write a shard (fp16), median of {args.reps}\n")
    rows = []
    for name, (_, teacher, V, B, L) in configs(args.quick).items():
        teacher.eval().requires_grad_(False)
        ids = torch.randint(0, V, (B, L))
        parts = {"top-k": [], "write": []}

        def forward():
            with torch.no_grad():
                teacher(input_ids=ids, use_cache=False)     # logits over every position

        def build():
            with torch.no_grad():
                h = hidden(teacher, ids)
                t0 = time.perf_counter()
                top = tc.top_rows(h, teacher.lm_head.weight, None, V, args.k, 1.0, 1024)
                t1 = time.perf_counter()
            save_shard(work / f"build-{name}.safetensors", *top, V, "fp16")
            parts["top-k"].append(t1 - t0)
            parts["write"].append(time.perf_counter() - t1)

        med = interleaved({"forward": forward, "build": build}, args.reps)
        part = {k: statistics.median(v[1:]) * 1e3 for k, v in parts.items()}
        rows.append([name, f"{matmul_params(teacher) / 1e6:.2f}M", V, f"{B}x{L}", f"{B * L / med['forward']:.0f}",
                     f"{B * L / med['build']:.0f}", f"{part['top-k']:.0f} ms / {part['write']:.0f} ms",
                     f"**{med['forward'] / med['build']:.2f}**"])
    table(["config", "N teacher", "V", "tokens", "forward tok/s", "build tok/s", "of which top-k / write",
           "build / forward speed"], rows)


def quality_section(args, work: Path, built: dict) -> None:
    from transformers.utils.logging import disable_progress_bar

    from train.config import load_config
    from train.demo import compare
    disable_progress_bar()              # compare() loads five models: one bar each
    cfg = load_config(str(RECIPE), [])
    steps = args.steps or (5 if args.quick else cfg.train.steps)
    n_eval = 32 if args.quick else cfg.data.eval_samples
    cache = demo_cache(work, args.k, built)
    print(f"## quality: demo students, {steps} steps, cache k={args.k} (built in {cache['wall']:.0f} s wall, "
          f"{cache['tokens_s']} tok/s); exact match, ROUGE-L, top-1 agreement on {n_eval} held-out prompts, NLL on "
          f"the run's data.eval_samples={cfg.data.eval_samples}\n")
    runs = {}
    for seed in range(args.seeds):
        for method, extra in (("GRKD", []), ("forward KL", ["loss.method=forward_kl", "loss.params={}"])):
            for teacher in ("live", "cache"):
                name = f"{'grkd' if method == 'GRKD' else 'fkl'}-{teacher}-s{seed}"
                src = [f"model.teacher=cache:{cache['dir']}"] if teacher == "cache" else []
                wall, _ = kd_train(work, name, [f"run_name={name}", f"output_dir={work / 'runs'}",
                                                f"train.steps={steps}", f"train.seed={seed}", *extra, *src])
                log = [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines() if x]
                steps_log = [r for r in log if "kind" not in r]
                steps_log = steps_log[1:] or steps_log              # step 1 warms up
                runs[(method, teacher, seed)] = {
                    "dir": work / "runs" / name, "wall": wall,
                    "nll": [r for r in log if r.get("kind") == "eval"][-1]["eval_student_nll"],
                    "step": statistics.median(r["tokens_in"] / r["tokens_per_s"] for r in steps_log)}
    models = {"teacher": Path(cfg.model.teacher), **{key: r["dir"] / "student-hf" for key, r in runs.items()}}
    res = compare(models, Path(cfg.data.eval), Path(cfg.data.tokenizer), n_eval, cfg.data.max_new_tokens,
                  chat_template=cfg.data.chat_template)
    t = res.pop("teacher")
    for key, r in runs.items():
        r.update(em=res[key]["exact_match"], rouge=res[key]["rouge_l"], top1=res[key]["top1_agreement"])

    def spread(xs, fmt):
        sd = f"{statistics.stdev(xs):{fmt.lstrip('+')}}" if len(xs) > 1 else ""
        return f"{statistics.mean(xs):{fmt}}" + (f" +- {sd}" if sd else "")
    seeds = range(args.seeds)
    rows = [["teacher", "", f"{t['exact_match']:.3f}", f"{t['rouge_l']:.3f}", "", "", "", ""]]
    for method in ("GRKD", "forward KL"):
        for teacher in ("live", "cache"):
            rs = [runs[(method, teacher, s)] for s in seeds]
            rows.append([method, teacher] + [spread([r[m] for r in rs], f) for m, f in
                                             (("em", ".3f"), ("rouge", ".3f"), ("nll", ".4f"), ("top1", ".3f"))]
                        + [f"{statistics.median(r['step'] for r in rs) * 1e3:.0f} ms",
                           f"{statistics.mean(r['wall'] for r in rs):.0f} s"])
    table(["student", "teacher", "exact match", "ROUGE-L", "held-out NLL", "top-1 agr.", "step (median)",
           "run wall (mean)"], rows)
    print(f"mean +- standard deviation over {args.seeds} seeds (train.seed). Paired by seed, cache - live:")
    for method in ("GRKD", "forward KL"):
        d = {m: [runs[(method, "cache", s)][m] - runs[(method, "live", s)][m] for s in seeds] for m in ("em", "nll")}
        ratio = statistics.median(runs[(method, "cache", s)]["step"] / runs[(method, "live", s)]["step"] for s in seeds)
        print(f"  {method}: exact match {spread(d['em'], '+.3f')}, NLL {spread(d['nll'], '+.4f')}, step time x{ratio:.2f}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="step,bytes,build", help="comma list of step, bytes, build, quality")
    ap.add_argument("--quality", action="store_true", help="add the quality section (minutes)")
    ap.add_argument("--quick", action="store_true", help="smoke run: smaller larger config, 2 reps, no kd-train builds "
                    "in bytes, quality 5 steps and 32 prompts")
    ap.add_argument("--reps", type=int, help="timed rounds of step and build (default 5, --quick 2)")
    ap.add_argument("--steps", type=int, help="quality: train.steps of each student (default the recipe's)")
    ap.add_argument("--method", default="grkd", help="step section's loss (grkd, forward_kl, ...)")
    ap.add_argument("--k", type=int, default=64, help="cache k of step, build and quality")
    ap.add_argument("--seeds", type=int, help="quality: student seeds per row (default 3, --quick 1)")
    ap.add_argument("--work", help="keep caches, shards, logs and runs here (default: a temporary dir, removed)")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s] + (["quality"] if args.quality else [])
    if unknown := set(sections) - {"step", "bytes", "build", "quality"}:
        ap.error(f"unknown sections {sorted(unknown)}")
    args.reps = args.reps or (2 if args.quick else 5)
    args.seeds = args.seeds or (1 if args.quick else 3)
    os.chdir(REPO)                    # the demo recipe's paths are relative to the repository
    work = Path(args.work or tempfile.mkdtemp(prefix="cache-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: python {' '.join(sys.argv)}\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; sections {','.join(sections)}; work dir {work}\n",
          flush=True)
    built: dict = {}
    t0 = time.time()
    for s in sections:
        {"step": step_section, "bytes": lambda a, w: bytes_section(a, w, built), "build": build_section,
         "quality": lambda a, w: quality_section(a, w, built)}[s](args, work)
    if not args.work:                 # kept after a failure: its logs say why
        shutil.rmtree(work, ignore_errors=True)
    print(f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
