"""The CPU demo (``make demo``, or ``kd-train`` with no arguments), nothing downloaded:

1. a synthetic instruction task (train/demo_task.py) and a SentencePiece tokenizer trained on it;
2. a teacher (Llama architecture, a few million parameters) trained by SFT through the same stack,
   cached in runs/demo-teacher/ for reuse;
3. students from the same initialisation and data order, each on 2 ZeRO-3 CPU ranks: SFT only, GRKD
   (recipes/demo.yaml) and the on-policy methods of the seeds' comparison: GKD, DistiLLM's adaptive
   off-policy schedule and class KD (recipes/demo_gkd.yaml, demo_distillm.yaml, demo_classkd.yaml);
4. runs/demo/report.md: exact match, ROUGE-L and held-out NLL of the teacher and every student,
   teacher-student OR@k / CR@k, loss curves, the class-KD classmate's held-out figures. The GRKD
   student is exported to runs/demo/student-hf/ (each student to its run's student-hf/).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "demo.yaml"
TEACHER_RECIPE = REPO / "recipes" / "demo_teacher.yaml"
# the on-policy students: the demo's data, teacher, student initialisation and schedule
ONPOLICY = {"GKD": REPO / "recipes" / "demo_gkd.yaml", "DistiLLM": REPO / "recipes" / "demo_distillm.yaml",
            "class KD": REPO / "recipes" / "demo_classkd.yaml"}


# The demo's figures do not depend on the CPU it runs on: CPUs of one machine kind differ in their
# vector units (AVX2, AVX-512, AMX), and torch's own kernels, MKL and oneDNN pick their code path by
# them; each path sums in its own order, and over hundreds of steps those last-bit differences become
# different students (measured: AVX2 vs AVX-512 kernels differ from the first step). Every x86-64 CPU
# of this kind has AVX2, so the demo pins that path (MKL's STRICT mode also ignores memory alignment)
# and one thread per process (MKL reproduces bit for bit only at a fixed thread count).
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "OMP_NUM_THREADS": "1"}


def pin_kernels() -> None:
    """For this process (before its first kernel) and the ranks it launches; a variable the user
    set wins. Nothing to pin off x86-64."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    for key, value in PINNED_ENV.items():
        os.environ.setdefault(key, value)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def is_demo_recipe(recipe: str) -> bool:
    """The demo's recipes build the demo's inputs where missing (``ensure_prerequisites``)."""
    return Path(recipe).resolve() in {RECIPE, *ONPOLICY.values()}


def ensure_prerequisites(cfg) -> None:
    """Build what the demo recipe points at, where it is missing: the synthetic data, a tokenizer
    trained on it, the SFT teacher (recipes/demo_teacher.yaml). Only the demo's own paths: a value
    overridden to another path is the user's, and preflight reports it if it does not exist."""
    from .config import load_config
    from .demo_task import demo_texts, make_demo_data
    from .tokenizer import train_sentencepiece

    own = load_config(str(RECIPE), [])
    data_dir = Path(own.data.train).parent
    uses = {key: getattr(cfg.data, key) == getattr(own.data, key) for key in ("train", "eval", "tokenizer")}
    if (uses["train"] or uses["eval"] or uses["tokenizer"] or cfg.model.teacher == own.model.teacher) \
            and not Path(own.data.train).exists():
        log(f"writing the synthetic task to {data_dir}/")
        make_demo_data(data_dir)
    if (uses["tokenizer"] or cfg.model.teacher == own.model.teacher) and not Path(own.data.tokenizer).exists():
        log(f"training a SentencePiece tokenizer on {own.data.train} -> {own.data.tokenizer}")
        train_sentencepiece(demo_texts(Path(own.data.train)), own.data.tokenizer, vocab_size=512)
    teacher = Path(own.model.teacher)
    if cfg.loss.method != "sft" and cfg.model.teacher == own.model.teacher and not (teacher / "config.json").exists():
        log(f"training the teacher first ({TEACHER_RECIPE.relative_to(REPO)} -> {teacher}); it is cached for later runs")
        _kd_train(str(TEACHER_RECIPE), ["resume=auto"])
        if not (teacher / "config.json").exists():
            raise FileNotFoundError(f"the teacher run finished but {teacher} was not written")


def _kd_train(recipe: str, overrides: list[str]) -> None:
    from .launch import start
    code = start(recipe, overrides)
    if code != 0:
        sys.exit(code)


def compare(models: dict, eval_path: Path, tokenizer_path: Path, n: int, max_new_tokens: int,
            k: int = 5, chat_template: str = "auto", correct=None) -> dict[str, dict]:
    """One process: greedy exact match and ROUGE-L, held-out NLL, and OR@k / CR@k against the
    first model (the teacher), each on the same held-out records. ``models``: a name (any key) ->
    HF directory; the results come back under the same keys. ``correct(answer, reference)``: what
    counts as an exact match (default: the same text up to whitespace)."""
    from transformers import AutoModelForCausalLM

    import kd
    from .data import encode_prompt, load_records, shift_labels, to_example, tokenize_example
    from .demo_task import exact_match
    from .evaluate import greedy_answers, rouge_l
    from .tokenizer import load_tokenizer

    correct = correct or exact_match
    tok = load_tokenizer(tokenizer_path)
    examples = [to_example(r, tok, chat_template=chat_template) for r in load_records(eval_path, limit=n)]
    prompts = [encode_prompt(ex, tok) for ex in examples]
    seqs = [tokenize_example(ex, tok, 512) for ex in examples]
    L = max(len(s.input_ids) for s in seqs)
    ids = torch.tensor([s.input_ids + [tok.pad_id] * (L - len(s.input_ids)) for s in seqs])
    mask = (torch.arange(L) < torch.tensor([len(s.input_ids) for s in seqs])[:, None]).long()
    labels = shift_labels(torch.tensor([s.labels + [-100] * (L - len(s.labels)) for s in seqs]))
    results, teacher_logits = {}, None
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        nll, _ = kd.distill_loss(logits, None, labels, method="sft")
        answers = greedy_answers(model, tok, prompts, max_new_tokens)
        r = {"exact_match": sum(correct(a, ex.response) for a, ex in zip(answers, examples)) / len(examples),
             "rouge_l": sum(rouge_l(a, ex.response) for a, ex in zip(answers, examples)) / len(examples),
             "nll": float(nll)}
        if teacher_logits is None:
            teacher_logits = logits
        else:
            r.update(kd.metrics.alignment(logits, teacher_logits, labels, k=k))
        results[name] = r
    return results


def write_report(out_dir: Path, results: dict, runs: dict[str, Path], timings: dict, n_eval: int) -> Path:
    from .runlog import write_report as write

    summary = [f"Held-out: {n_eval} prompts never seen in training. Exact match and ROUGE-L from greedy decoding; NLL "
               "of the reference responses; OR@5 / CR@5 / top-1 agreement with the teacher.", "",
               "| model | exact match | ROUGE-L | NLL | OR@5 | CR@5 | top-1 agr. |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r['exact_match']:.3f}", f"{r['rouge_l']:.3f}", f"{r['nll']:.4f}"]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in ("overlap@5", "consistency@5", "top1_agreement")]
        summary.append(f"| {name} | " + " | ".join(cells) + " |")
    summary += ["", "Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())]
    (out_dir / "comparison.json").write_text(json.dumps(results, indent=1))
    return write(out_dir, "Demo: distillation methods on the synthetic task (CPU, 2 ZeRO-3 ranks)", summary, runs)


def train_students(cfg, seed: int, onpolicy: bool = True) -> tuple[dict[str, Path], dict[str, float]]:
    """The students of one seed (the same initialisation and data order for all): SFT, the demo
    recipe's method and (``onpolicy``) GKD, DistiLLM and class KD; their run directories and wall
    times. ``resume=auto``: a finished run is reused and an interrupted one continued by a second
    ``make demo``."""
    from .config import load_config

    suffix = "" if seed == 0 else f"-seed{seed}"
    method = cfg.loss.method.upper()
    plan = [("SFT", RECIPE, f"{cfg.run_name}-sft", ["loss.method=sft", "model.teacher=null", "loss.params={}"]),
            (method, RECIPE, cfg.run_name, [])]
    if onpolicy:
        plan += [(label, recipe, load_config(str(recipe), []).run_name, []) for label, recipe in ONPOLICY.items()]
    runs, timings = {}, {}
    for label, recipe, name, overrides in plan:
        log(f"training the {label} student (seed {seed})")
        t = time.time()
        _kd_train(str(recipe), [f"run_name={name}{suffix}", *overrides, f"train.seed={seed}", "resume=auto"])
        runs[label], timings[f"{label} student"] = cfg.run_dir.parent / f"{name}{suffix}", time.time() - t
    return runs, timings


def spread(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    """Markdown: mean and standard deviation over seeds of each model's figures, then every seed."""
    import statistics
    keys = ("exact_match", "rouge_l", "nll", "overlap@5", "top1_agreement")
    models = list(next(iter(per_seed.values())))
    lines = [f"Over seeds {', '.join(map(str, per_seed))} (train.seed: student initialisation and data order; "
             "the teacher is the same): mean +- standard deviation.", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in models:
        cells = []
        for k in keys:
            vals = [r[m][k] for r in per_seed.values() if k in r[m]]
            cells.append("-" if not vals else f"{statistics.mean(vals):.3f} +- "
                         f"{statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | model | exact match | ROUGE-L | NLL |", "|---|---|---|---|---|"]
    lines += [f"| {seed} | {m} | {r[m]['exact_match']:.3f} | {r[m]['rouge_l']:.3f} | {r[m]['nll']:.4f} |"
              for seed, r in per_seed.items() for m in models]
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .config import load_config
    ap = argparse.ArgumentParser(prog="python -m train.demo", description="The CPU demo (make demo); with several "
                                 "--seeds also their spread (make demo-spread).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of the students (default 0)")
    ap.add_argument("--offpolicy-only", action="store_true",
                    help="only the SFT and GRKD students (not GKD, DistiLLM and class KD)")
    args = ap.parse_args(argv)

    pin_kernels()
    t0 = time.time()
    cfg = load_config(str(RECIPE), [])
    ensure_prerequisites(cfg)
    timings = {"data + teacher": time.time() - t0}
    out, method = cfg.run_dir, cfg.loss.method.upper()
    runs = {}
    for seed in args.seeds:
        runs[seed], times = train_students(cfg, seed, onpolicy=not args.offpolicy_only)
        timings.update({f"{k} (seed {seed})" if len(args.seeds) > 1 else k: v for k, v in times.items()})
    log("evaluating the teacher and the students on held-out prompts")
    # one call: the teacher is decoded once, and every student is aligned with the same teacher logits
    models = {"teacher": Path(cfg.model.teacher)}
    models.update({(seed, f"{label} student"): r[label] / "student-hf" for seed, r in runs.items() for label in r})
    results = compare(models, Path(cfg.data.eval), Path(cfg.data.tokenizer), cfg.data.eval_samples,
                      cfg.data.max_new_tokens, chat_template=cfg.data.chat_template)
    teacher = results.pop("teacher")
    per_seed = {seed: {"teacher": teacher} for seed in args.seeds}
    for (seed, name), r in results.items():
        per_seed[seed][name] = r
    report = write_report(out, per_seed[args.seeds[0]], runs[args.seeds[0]], timings, cfg.data.eval_samples)
    for name, r in per_seed[args.seeds[0]].items():
        log(f"{name:14s} exact match {r['exact_match']:.3f}  ROUGE-L {r['rouge_l']:.3f}  NLL {r['nll']:.4f}")
    if len(args.seeds) > 1:
        path = out / "spread.md"
        path.write_text("# Demo: spread over seeds\n\n" + "\n".join(spread(per_seed)) + "\n")
        (out / "spread.json").write_text(json.dumps(per_seed, indent=1))
        log(f"spread over seeds: {path}")
    log(f"report: {report}  |  {method} student (HF format): {out / 'student-hf'}  |  {time.time() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    from .launch import exit_process, reporting
    exit_process(reporting(main))
