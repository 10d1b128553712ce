"""The CPU demo (``make demo``, or ``kd-train`` with no arguments), nothing downloaded:

1. a synthetic instruction task (train/demo_task.py) and a SentencePiece tokenizer trained on it;
2. a teacher (Llama architecture, a few million parameters) trained by SFT through the same stack,
   cached in runs/demo-teacher/ for reuse;
3. two students from the same initialisation, each on 2 ZeRO-3 CPU ranks: SFT only, and GRKD;
4. runs/demo/report.md: exact match, ROUGE-L and held-out NLL of teacher and both students,
   teacher-student OR@k / CR@k, loss curves. The GRKD student is exported to runs/demo/student-hf/.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

RECIPE = "recipes/demo.yaml"
TEACHER_RECIPE = "recipes/demo_teacher.yaml"
DEMO_DATA = Path("runs/demo-data")


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def ensure_prerequisites(cfg) -> None:
    """Make what a recipe points at under runs/ when it is missing: the demo data, a tokenizer
    trained on the recipe's training data, and the SFT teacher (recipes/demo_teacher.yaml)."""
    from .demo_task import demo_texts, make_demo_data
    from .tokenizer import train_sentencepiece

    train_path = Path(cfg.data.train)
    if train_path.parent == DEMO_DATA and not train_path.exists():
        log(f"writing the synthetic task to {DEMO_DATA}/")
        make_demo_data(DEMO_DATA)
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tok and _under_runs(tok) and not tok.exists():
        log(f"training a SentencePiece tokenizer on {train_path} -> {tok}")
        texts = demo_texts(train_path) if train_path.parent == DEMO_DATA else _record_texts(train_path)
        train_sentencepiece(texts, tok, vocab_size=512 if train_path.parent == DEMO_DATA else 2048)
    teacher = Path(cfg.model.teacher) if cfg.model.teacher else None
    if cfg.loss.method != "sft" and teacher and _under_runs(teacher) and not (teacher / "config.json").exists():
        run_name = teacher.parent.name
        log(f"training the teacher first ({TEACHER_RECIPE} -> {teacher}); it is cached for later runs")
        overrides = [f"run_name={run_name}", f"output_dir={teacher.parent.parent}",
                     f"data.train={cfg.data.train}", f"data.max_len={cfg.data.max_len}"]
        overrides += [f"data.eval={cfg.data.eval}"] if cfg.data.eval else []
        overrides += [f"data.tokenizer={cfg.data.tokenizer}"] if cfg.data.tokenizer else []
        _kd_train(TEACHER_RECIPE, overrides)
        if not (teacher / "config.json").exists():
            raise FileNotFoundError(f"the teacher run finished but {teacher} was not written")


def _under_runs(p: Path) -> bool:
    return "runs" in p.parts


def _record_texts(path: Path):
    from .data import iter_records, to_example
    for _, record in iter_records(path):
        ex = to_example(record)
        yield " ".join(text for text, _ in ex.as_segments())


def _kd_train(recipe: str, overrides: list[str]) -> None:
    from .cli import default_nproc, launch
    from .config import load_config
    cfg = load_config(recipe, overrides)
    code = launch(recipe, overrides, cfg.parallel.nproc or default_nproc())
    if code != 0:
        sys.exit(code)


def compare(models: dict[str, Path], eval_path: Path, tokenizer_path: Path, n: int, max_new_tokens: int,
            k: int = 5) -> dict[str, dict]:
    """One process: greedy exact match and ROUGE-L, held-out NLL, and OR@k / CR@k against the
    first model (the teacher), each on the same held-out records."""
    from transformers import AutoModelForCausalLM

    import kd
    from .data import encode_prompt, load_records, shift_labels, to_example, tokenize_example
    from .demo_task import exact_match
    from .evaluate import greedy_answers, rouge_l
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    examples = [to_example(r) for r in load_records(eval_path, limit=n)]
    prompts = [encode_prompt(ex.prompt, tok) for ex in examples]
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
        r = {"exact_match": sum(exact_match(a, ex.response) for a, ex in zip(answers, examples)) / len(examples),
             "rouge_l": sum(rouge_l(a, ex.response) for a, ex in zip(answers, examples)) / len(examples),
             "nll": float(nll)}
        if teacher_logits is None:
            teacher_logits = logits
        else:
            r.update(kd.metrics.alignment(logits, teacher_logits, labels, k=k))
        results[name] = r
    return results


def write_report(out_dir: Path, results: dict, runs: dict[str, Path], timings: dict, n_eval: int) -> Path:
    from .runlog import plot_curves, read_metrics

    lines = ["# Demo: GRKD vs SFT on the synthetic task (CPU, 2 ZeRO-3 ranks)", "",
             f"Held-out: {n_eval} prompts never seen in training. Exact match and ROUGE-L from greedy "
             "decoding; NLL of the reference responses; OR@5 / CR@5 / top-1 agreement with the teacher.",
             "", "| model | exact match | ROUGE-L | NLL | OR@5 | CR@5 | top-1 agr. |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r['exact_match']:.3f}", f"{r['rouge_l']:.3f}", f"{r['nll']:.4f}"]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in ("overlap@5", "consistency@5", "top1_agreement")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), ""]
    if plot_curves(runs, "loss", out_dir / "loss.png", "training loss (each run's own objective)"):
        lines += ["![training loss](loss.png)", ""]
    evals = {name: read_metrics(d)[1] for name, d in runs.items()}
    rows = [(name, e["step"], e.get("eval_student_nll")) for name, es in evals.items() for e in es]
    if rows:
        lines += ["Held-out student NLL during training:", "", "| run | step | NLL |", "|---|---|---|"]
        lines += [f"| {n} | {s} | {v:.4f} |" for n, s, v in rows if v is not None]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "comparison.json").write_text(json.dumps(results, indent=1))
    return path


def main() -> int:
    from .config import load_config

    t0 = time.time()
    cfg = load_config(RECIPE, [])
    ensure_prerequisites(cfg)
    timings = {"data + teacher": time.time() - t0}
    sft_name = f"{cfg.run_name}-sft"
    t1 = time.time()
    log("training the SFT student")
    _kd_train(RECIPE, [f"run_name={sft_name}", "loss.method=sft", "model.teacher=null", "loss.params={}"])
    timings["SFT student"] = time.time() - t1
    t1 = time.time()
    log(f"training the {cfg.loss.method.upper()} student")
    _kd_train(RECIPE, [])
    timings[f"{cfg.loss.method.upper()} student"] = time.time() - t1
    out = cfg.run_dir
    models = {"teacher": Path(cfg.model.teacher), "SFT student": out.parent / sft_name / "student-hf",
              f"{cfg.loss.method.upper()} student": out / "student-hf"}
    log("evaluating teacher and students on held-out prompts")
    results = compare(models, Path(cfg.data.eval), Path(cfg.data.tokenizer), cfg.data.eval_samples,
                      cfg.data.max_new_tokens)
    report = write_report(out, results, {"SFT": out.parent / sft_name, cfg.loss.method.upper(): out},
                          timings, cfg.data.eval_samples)
    for name, r in results.items():
        log(f"{name:14s} exact match {r['exact_match']:.3f}  ROUGE-L {r['rouge_l']:.3f}  NLL {r['nll']:.4f}")
    log(f"report: {report}  |  GRKD student (HF format): {out / 'student-hf'}  |  {time.time() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
