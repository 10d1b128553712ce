"""The distillation leaderboard (``make leaderboard``): every method of the stack distilled from the
same teacher into the same student initialisation, with the same data order and step budget, over
several seeds, and the seeds' claims tested against the numbers.

Tasks (``--task``):

- ``demo``: the synthetic task of ``make demo`` and its teacher, with the wider student preset
  ``demo-student-wide`` (0.9M parameters instead of 0.3M; the demo's own student reaches a tenth of
  the teacher's exact match, and its methods differ by less than seed noise), 300 steps, evaluated on
  all 350 held-out prompts.
- ``gsm8k``: the GSM8K files in ``../shared/data/gsm8k/`` (``--gsm8k DIR``): a SentencePiece tokenizer
  (2048 pieces) and a teacher (the demo-teacher preset, 300 steps of 16 packed 256-token rows) trained
  on the train split by the stack, then students (the demo's student preset, 200 steps) on the train
  split with SFT, forward KL, GRKD, RLKD and the best on-policy method of the demo board; held-out NLL,
  OR@k, CR@k and answer accuracy (the number after ``####``) on 200 test questions. Every row live.

Each (method, seed) is one ``kd-train`` run (2 ZeRO-3 CPU ranks, the demo's pinned kernels), its
``train.seed`` fixing the student initialisation and the data order, the same for every method. The
off-policy rows read the teacher from a k = V fp32 cache written once (``mode=cache-teacher``; exact,
so they see the live teacher's numbers); RLKD and logit standardisation need every logit of the live
teacher, the on-policy rows score the student's own samples, and a live forward-KL row is both a
control of the cache and the time baseline of those rows. Then one process decodes the teacher and
every student greedily on the same held-out prompts (``train.demo.compare``).

Per method: exact match (answer accuracy on GSM8K), ROUGE-L, held-out NLL, OR@5 / CR@5 against the
teacher (mean +- standard deviation over seeds), the training step time relative to forward KL with
the same teacher source, and the difference from forward KL with a paired t-test over seeds. Written to
``--out`` (default ``benchmarks/leaderboard/<task>/``): report.md, results.json, bar.png, curves.png;
the full study also replaces its section of benchmarks/RESULTS.md. Runs are kept under ``--runs``
(default ``runs/leaderboard/<task>``) and reused (``resume=auto``): an interrupted study continues.

    python benchmarks/quality.py                        # demo task, 18 methods x 3 seeds (~55 min, 2 cores)
    python benchmarks/quality.py --task gsm8k           # the GSM8K study (~35 min)
    python benchmarks/quality.py --quick --out DIR      # 1 seed, 20 steps, SFT and forward KL (the test suite)
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = REPO / "recipes"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
BASELINE, LIVE_BASELINE = "forward KL", "forward KL (live teacher)"
K = 5                                   # OR@k / CR@k
TORCH_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
SPEC = "leaderboard-run.json"           # beside each run: the recipe and overrides it was trained with


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...]
    teacher: str                        # "cache", "live" or "none"
    recipe: str | None = None           # an on-policy recipe of the demo; None: the task's base recipe


def _loss(method: str, params: str = "{}") -> tuple[str, ...]:
    return (f"loss.method={method}", f"loss.params={params}")


GRKD = "{{k: 16, lambda_end: 0.5, transition: {}}}"
METHODS = {
    "SFT": Method(_loss("sft") + ("model.teacher=null",), "none"),
    BASELINE: Method(_loss("forward_kl"), "cache"),
    LIVE_BASELINE: Method(_loss("forward_kl"), "live"),
    "reverse KL": Method(_loss("reverse_kl"), "cache"),
    "JSD(0.5)": Method(_loss("jsd", "{beta: 0.5}"), "cache"),
    "skew KL(0.1)": Method(_loss("skew_forward_kl", "{alpha: 0.1}"), "cache"),
    "skew reverse KL(0.1)": Method(_loss("skew_reverse_kl", "{alpha: 0.1}"), "cache"),
    "TVD": Method(_loss("tvd"), "cache"),
    "GRKD t=0.25": Method(_loss("grkd", GRKD.format(0.25)), "cache"),
    "GRKD t=0.5": Method(_loss("grkd", GRKD.format(0.5)), "cache"),
    "GRKD t=0.75": Method(_loss("grkd", GRKD.format(0.75)), "cache"),
    "group relative alone": Method(_loss("group_relative", "{k: 16}"), "cache"),
    "RLKD": Method(_loss("rlkd"), "live"),
    "forward KL + standardize": Method(_loss("forward_kl", "{standardize: true}"), "live"),
    "GKD": Method((), "live", "demo_gkd.yaml"),
    # MiniLLM's objective (reverse KL on the student's own samples) without its policy gradient
    "on-policy reverse KL": Method(_loss("reverse_kl") + ("onpolicy.fraction=1.0",), "live", "demo_gkd.yaml"),
    "DistiLLM": Method(("train.eval_every=20",), "live", "demo_distillm.yaml"),   # its phi moves at evaluations
    "class KD": Method((), "live", "demo_classkd.yaml"),
}
ONPOLICY = [m for m, spec in METHODS.items() if spec.recipe]
QUICK_METHODS = ["SFT", BASELINE]
GSM8K_METHODS = ["SFT", BASELINE, "GRKD t=0.5", "RLKD"]      # every row live there: one forward KL


@dataclass
class Task:
    name: str
    base: Path                          # the off-policy recipe
    common: list[str]                   # overrides of every run
    onpolicy: list[str]                 # and of the on-policy rows
    methods: list[str]
    correct: object = None              # answer checker for compare(); None: exact text
    cache: bool = True                  # off-policy rows from a k = V cache; False: every row live

    def source(self, method: str) -> str:
        teacher = METHODS[method].teacher
        return "live" if teacher == "cache" and not self.cache else teacher


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kd_train(recipe: Path, overrides: list[str], log_path: Path) -> None:
    """``kd-train RECIPE overrides`` (2 ranks) with the demo's pinned kernels, output to ``log_path``."""
    from train.demo import PINNED_ENV
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"kd-train {recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe} {' '.join(overrides)}")
    # the study launches its own ranks: a rank's variables left in this process's environment (torch's names)
    # would make kd-train join a process group that does not exist
    env = {**PINNED_ENV, "DS_ACCELERATOR": "cpu", **{k: v for k, v in os.environ.items() if k not in TORCH_RANK_VARS}}
    with open(log_path, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "train", str(recipe), *overrides], cwd=REPO, env=env,
                            stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        sys.exit(f"kd-train failed (exit {rc}); the end of {log_path}:\n{tail}")


def final_number(text: str) -> float | None:
    """GSM8K's answer: the number after the first ``####``, else the last number; commas dropped."""
    text = text.replace(",", "")
    if "####" in text:
        nums = re.findall(r"-?\d+(?:\.\d+)?", text.split("####")[1])[:1]    # the first: a student may run on
    else:
        nums = re.findall(r"-?\d+(?:\.\d+)?", text)[-1:]
    return float(nums[0]) if nums else None


def gsm8k_correct(answer: str, reference: str) -> bool:
    """Answer accuracy: the final numbers are equal (``18`` and ``18.00`` too)."""
    got = final_number(answer)
    return got is not None and got == final_number(reference)


def make_task(args, runs: Path) -> Task:
    """The task's base recipe and overrides; builds its inputs (data, tokenizer, teacher) where missing."""
    from train.config import load_config
    if args.recipe:                     # any off-policy recipe (the test suite's tiny setup)
        if bad := [m for m in args.methods if m in ONPOLICY]:
            sys.exit(f"--recipe: the on-policy rows {bad} use the demo's on-policy recipes; leave them out "
                     "(--methods) or use --task demo")
        return Task("recipe", Path(args.recipe).resolve(), [], [], args.methods)
    if args.task == "demo":
        from train.demo import ensure_prerequisites
        common = ["model.student=demo-student-wide", "data.eval_samples=350", "train.eval_every=50"]
        ensure_prerequisites(load_config(str(RECIPES / "demo.yaml"), common))
        return Task("demo", RECIPES / "demo.yaml", common, [], args.methods)
    # gsm8k: tokenizer and teacher trained here by the stack, on the train split
    src = Path(args.gsm8k).resolve()
    if not (src / "train.jsonl").is_file() or not (src / "test.jsonl").is_file():
        sys.exit(f"--gsm8k {src}: train.jsonl and test.jsonl not found there (GSM8K's files, MIT licence: "
                 "github.com/openai/grade-school-math)")
    tok, teacher = runs / "tokenizer", runs / "teacher"
    data = [f"data.train={src / 'train.jsonl'}", f"data.eval={src / 'test.jsonl'}", f"data.tokenizer={tok}",
            "data.max_len=256", "data.eval_samples=200", "data.max_new_tokens=192"]
    if not (tok / "tokenizer.model").exists():
        log(f"training a SentencePiece tokenizer (2048 pieces) on {src / 'train.jsonl'}")
        subprocess.run([sys.executable, "-m", "train.tokenizer", str(src / "train.jsonl"), str(tok), "--vocab-size",
                        "2048"], cwd=REPO, check=True)
    # the budget fits 2 CPU cores (GSM8K's rows are ~4x the demo's): the teacher sees ~1.2M tokens (0.8 epoch),
    # each student (the demo's 0.3M preset) 200 steps of 16 unpacked records
    recipe = RECIPES / "demo_teacher.yaml"
    spec = [*data, f"run_name={teacher.name}", f"output_dir={runs}", "train.steps=300", "train.micro_batch=8"]
    if not same_run(teacher, {"recipe": str(recipe), "overrides": spec}):
        kd_train(recipe, [*spec, resume_or_restart(teacher)], runs / "logs" / "teacher.log")
        record(teacher, {"recipe": str(recipe), "overrides": spec})
    common = [*data, f"model.teacher={teacher / 'student-hf'}", "model.student=demo-student", "train.micro_batch=8",
              "train.steps=200", "train.eval_every=50"]
    # live teacher: a k = V fp32 cache of GSM8K's 1.5M tokens would take ~16 GB, and a k = 64 one is lossy
    return Task("gsm8k", RECIPES / "demo.yaml", common, ["onpolicy.max_new_tokens=160"], args.methods,
                gsm8k_correct, cache=False)


def build_cache(task: Task, runs: Path, extra: list[str]) -> Path:
    """A k = V fp32 cache of the teacher over the task's training data: exact for every divergence and
    GRKD. kd-train leaves a complete cache alone and finishes an incomplete one."""
    from train.config import load_config
    from train.models import model_config
    cfg = load_config(str(task.base), [*task.common, *extra])
    vocab = model_config(cfg.model.teacher).vocab_size
    out = runs / "teacher-cache"
    kd_train(task.base, [*task.common, *extra, "mode=cache-teacher", f"cache.out={out}", f"cache.k={vocab}",
                         "cache.dtype=fp32"], runs / "logs" / "cache.log")
    return out


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def check_teacher(runs: Path, teacher: str | None) -> None:
    """The runs in ``runs`` were all taught by one teacher: a teacher retrained at the same path since
    (its weights' digest differs) stops the study instead of mixing old runs with the new teacher."""
    from train.cache.fingerprint import model_digest
    if teacher is None:
        return
    f, digest = runs / "teacher-digest.json", model_digest(teacher)
    if f.exists() and json.loads(f.read_text())["digest"] != digest:
        sys.exit(f"the teacher {teacher} changed since the runs in {runs} were made ({f}); move that folder aside "
                 "or give another --runs folder")
    runs.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"teacher": teacher, "digest": digest}))


def row(task: Task, method: str, student: str, cache: Path | None, extra: list[str]) -> tuple[Path, list[str]]:
    """The recipe and overrides of one method's runs (the seed and run name come on top)."""
    from train.config import load_config
    spec = METHODS[method]
    recipe = RECIPES / spec.recipe if spec.recipe else task.base
    teacher = [f"model.teacher=cache:{cache}"] if task.source(method) == "cache" else []
    # class KD's classmate has the student's architecture (the recipe names the demo's student)
    classmate = [f"model.classmate={student}"] if load_config(str(recipe), []).model.classmate else []
    return recipe, [*task.common, *(task.onpolicy if spec.recipe else []), *spec.overrides, *classmate, *teacher,
                    *extra]


def train_all(task: Task, seeds: list[int], runs: Path, extra: list[str]) -> dict:
    """(method, seed) -> run directory; each run once (resume=auto reuses a finished one)."""
    from train.config import load_config
    cache = build_cache(task, runs, extra) if any(task.source(m) == "cache" for m in task.methods) else None
    cfg = load_config(str(task.base), [*task.common, *extra])
    student = cfg.model.student
    check_teacher(runs, cfg.model.teacher)
    out = {}
    for seed in seeds:
        for m in task.methods:
            name = f"{slug(m)}-s{seed}"
            recipe, overrides = row(task, m, student, cache, extra)
            overrides += [f"run_name={name}", f"output_dir={runs}", f"train.seed={seed}"]
            spec = {"recipe": str(recipe), "overrides": overrides}
            if same_run(runs / name, spec):
                log(f"{name}: finished earlier with these settings, reused")
            else:
                kd_train(recipe, [*overrides, resume_or_restart(runs / name)], runs / "logs" / f"{name}.log")
                record(runs / name, spec)
            out[(m, seed)] = runs / name
    return out


def resume_or_restart(run: Path) -> str:
    """An interrupted run continues from its newest usable checkpoint; one stopped before its first
    (or with only damaged ones) starts again, kd-train moving its outputs aside (kept, not deleted)."""
    from train import checkpoint
    if checkpoint.run_outputs(run) and checkpoint.find("auto", run / "checkpoints", warn=lambda *_: None) is None:
        log(f"{run.name}: no usable checkpoint; started again (its outputs are moved aside)")
        return "overwrite=true"
    return "resume=auto"


def same_run(run: Path, spec: dict) -> bool:
    """Whether ``run`` already finished with these settings (recipe and every override, recorded beside
    it); an interrupted one is continued (resume=auto). A run made with other settings, or one with
    outputs and no record, stops the study rather than being reused or overwritten."""
    import yaml

    from train import checkpoint
    from train.evaluate import exported_step
    f = run / SPEC
    trained = bool(checkpoint.run_outputs(run))
    if trained and (not f.exists() or json.loads(f.read_text()) != spec):
        sys.exit(f"{run} was trained with other settings than this study's, or by something else ({f} "
                 f"{'differs' if f.exists() else 'missing'}); move or delete it, or give another --runs folder")
    record(run, spec)
    return (run / "config.yaml").exists() and \
        exported_step(run / "student-hf") == yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"]


def record(run: Path, spec: dict) -> None:
    """The settings beside the run (again after kd-train: overwrite=true moves the folder's files aside)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / SPEC).write_text(json.dumps(spec, indent=1))


def run_figures(run: Path) -> dict:
    """From a run's metrics.jsonl: mean step time (step 1, the warm-up, left out; on-policy steps
    include their sampling), counted tokens, and the held-out curves."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "kind" not in r]
    timed = steps[1:] or steps
    evals = [r for r in rows if r.get("kind") == "eval"]
    return {"step_s": statistics.mean(r["tokens_in"] / r["tokens_per_s"] for r in timed),
            "tokens": sum(r["tokens"] for r in steps), "steps": len(steps),
            "phi": max((r.get("phi", 0.0) for r in steps), default=0.0),
            "curve": [(r["step"], r["eval_student_nll"], r.get(f"eval_overlap@{K}")) for r in evals]}


def evaluate(task: Task, runs: dict, cfg, n_eval: int) -> tuple[dict, dict]:
    """Teacher and students on the same held-out prompts; each student's figures are kept beside its
    run (``leaderboard-eval.json``, keyed by the export's step and the prompts) and reused."""
    from transformers.utils.logging import disable_progress_bar

    from train.cache.fingerprint import model_digest
    from train.demo import compare
    from train.demo_task import exact_match
    from train.evaluate import exported_step
    disable_progress_bar()
    key = {"n_eval": n_eval, "eval": str(cfg.data.eval), "teacher": str(cfg.model.teacher), "k": K,
           "tokenizer": str(cfg.data.tokenizer), "max_new_tokens": cfg.data.max_new_tokens,
           "chat_template": cfg.data.chat_template, "teacher_digest": model_digest(str(cfg.model.teacher)),
           "correct": hashlib.sha256(inspect.getsource(task.correct or exact_match).encode()).hexdigest()}

    def run_key(run: Path) -> dict:
        return {**key, "step": exported_step(run / "student-hf"), "run": json.loads((run / SPEC).read_text())}
    done, todo = {}, {}
    for rk, run in runs.items():
        f = run / "leaderboard-eval.json"
        saved = json.loads(f.read_text()) if f.exists() else {}
        if saved.get("key") == run_key(run):
            done[rk] = saved["figures"]
        else:
            todo[rk] = run
    tfile = runs[next(iter(runs))].parent / "teacher-eval.json"
    saved = json.loads(tfile.read_text()) if tfile.exists() else {}
    teacher = saved.get("figures") if saved.get("key") == key else None
    if todo or teacher is None:
        log(f"evaluating the teacher and {len(todo)} students on {n_eval} held-out prompts")
        res = compare({"teacher": Path(cfg.model.teacher), **{rk: r / "student-hf" for rk, r in todo.items()}},
                      Path(cfg.data.eval), Path(cfg.data.tokenizer), n_eval, cfg.data.max_new_tokens, k=K,
                      chat_template=cfg.data.chat_template, correct=task.correct)
        teacher = res.pop("teacher")
        tfile.write_text(json.dumps({"key": key, "figures": teacher}))
        for rk, figs in res.items():
            (runs[rk] / "leaderboard-eval.json").write_text(json.dumps({"key": run_key(runs[rk]), "figures": figs}))
            done[rk] = figs
    return teacher, done


METRICS = {"exact_match": "exact match", "rouge_l": "ROUGE-L", "nll": "held-out NLL",
           f"overlap@{K}": f"OR@{K}", f"consistency@{K}": f"CR@{K}"}


def paired(a: list[float], b: list[float]) -> tuple[float, float, float | None]:
    """Mean and standard deviation of a - b over seeds, and the two-sided paired t-test's p (None for
    fewer than 2 seeds or when every seed gives the same difference: no spread, no test)."""
    from scipy.stats import ttest_rel
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return d[0], 0.0, None
    sd = statistics.stdev(d)
    if sd == 0:
        return statistics.mean(d), 0.0, None
    return statistics.mean(d), sd, float(ttest_rel(a, b).pvalue)


def summarise(task: Task, seeds: list[int], runs: dict, figures: dict) -> dict:
    """Per method: every metric over seeds, step time relative to forward KL (same teacher source),
    and the paired difference from forward KL."""
    table = {}
    for m in task.methods:
        per_seed = [{**figures[(m, s)], **run_figures(runs[(m, s)])} for s in seeds]
        row = {"teacher": task.source(m), "seeds": {s: r for s, r in zip(seeds, per_seed)}}
        for key in (*METRICS, "step_s", "tokens"):
            vals = [r[key] for r in per_seed if r.get(key) is not None]
            row[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        table[m] = row
    same_source = {table[b]["teacher"]: b for b in (BASELINE, LIVE_BASELINE) if b in table}
    for m, row in table.items():
        # against forward KL taught the same way (SFT: against the live teacher's, what KD adds to SFT)
        base = same_source.get("live" if row["teacher"] == "none" else row["teacher"])
        if base:
            row["time_vs"] = base
            row["time_ratio"] = statistics.median(row["seeds"][s]["step_s"] / table[base]["seeds"][s]["step_s"]
                                                  for s in seeds)
        if BASELINE in table:
            row["vs_fkl"] = {key: paired([row["seeds"][s][key] for s in seeds],
                                         [table[BASELINE]["seeds"][s][key] for s in seeds])
                             for key in METRICS if row["seeds"][seeds[0]].get(key) is not None}
    return table


def fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v[0]:.{digits}f} +- {v[1]:.{digits}f}"


def fmt_diff(d, digits=3) -> str:
    if d is None:
        return "-"
    mean, sd, p = d
    if p is None:
        return f"{mean:+.{digits}f}"
    shown = "p < 0.001" if p < 0.001 else f"p {p:.3f}"
    return f"{mean:+.{digits}f} +- {sd:.{digits}f} ({shown}{'' if p < 0.05 else ', noise'})"


def board(table: dict, teacher: dict, correct: str = "exact match") -> list[str]:
    lines = [f"| method | teacher | {correct} | ROUGE-L | held-out NLL | OR@5 | CR@5 | step | time vs FKL "
             f"| {correct} - FKL (paired) | NLL - FKL (paired) |", "|---" * 11 + "|",
             f"| teacher | - | {teacher['exact_match']:.3f} | {teacher['rouge_l']:.3f} | {teacher['nll']:.3f} "
             "| - | - | - | - | - | - |"]
    for m, r in table.items():
        vs = r.get("vs_fkl", {})
        ratio = f"{r['time_ratio']:.2f}" if "time_ratio" in r else "-"
        lines.append(f"| {m} | {r['teacher']} | {fmt(r['exact_match'])} | {fmt(r['rouge_l'])} | {fmt(r['nll'])} "
                     f"| {fmt(r[f'overlap@{K}'])} | {fmt(r[f'consistency@{K}'])} | {r['step_s'][0] * 1e3:.0f} ms "
                     f"| {ratio} "
                     f"| {'-' if m == BASELINE else fmt_diff(vs.get('exact_match'))} "
                     f"| {'-' if m == BASELINE else fmt_diff(vs.get('nll'))} |")
    return lines


def rel(table: dict, a: str, b: str, key: str) -> float:
    """a's mean relative to b's (nan when b's is 0: no relative figure)."""
    return table[a][key][0] / table[b][key][0] - 1 if table[b][key][0] else math.nan


def pct(x: float) -> str:
    return f"{x:+.0%}" if math.isfinite(x) else "n/a"


def claims(table: dict, seeds: list[int], accuracy_ok: bool = True) -> list[str]:
    """The seeds' claims, each with its numbers and a verdict (the paired test over seeds decides
    "within noise"). ``accuracy_ok`` False (no model answers): the accuracy claims are untestable, and
    their rows are compared on held-out NLL and OR@k instead."""
    def has(*ms):
        return all(m in table for m in ms)

    def test(a, b, key):
        return paired([table[a]["seeds"][s][key] for s in seeds], [table[b]["seeds"][s][key] for s in seeds])

    def verdict(gain: float, p: float | None, want: float = 0.0) -> str:
        if p is None:
            return "untested (one seed, or no spread)"
        if not math.isfinite(gain):
            return "no relative figure (the baseline is 0)"
        if p >= 0.05:
            return "within noise: not shown"
        return "holds" if gain >= want else "does not hold (the difference goes the other way)" if gain < 0 else \
            "direction holds, smaller than claimed"

    def instead(a: str, b: str) -> str:
        return (f"untestable on answer accuracy here (the teacher answers under 5%); on held-out NLL {a} - {b} = "
                f"{fmt_diff(test(a, b, 'nll'))}, on OR@{K} {fmt_diff(test(a, b, f'overlap@{K}'))}")
    out = []
    grkd = "GRKD t=0.5"
    if not accuracy_ok and has(grkd, BASELINE):
        out.append(f"- **GRKD beats standard and preference-based distillation (~+9%)**: {instead(grkd, BASELINE)}.")
    others = [m for m in ("forward KL", "reverse KL", "JSD(0.5)", "skew KL(0.1)", "skew reverse KL(0.1)", "TVD",
                          "group relative alone", "RLKD") if m in table]
    if accuracy_ok and has(grkd) and others:
        gains = {m: rel(table, grkd, m, "exact_match") for m in others}
        best = max(others, key=lambda m: table[m]["exact_match"][0])
        d = test(grkd, best, "exact_match")
        over_best = rel(table, grkd, best, "exact_match")
        out.append(f"- **GRKD beats standard and preference-based distillation (~+9%)**: GRKD (t = 0.5) exact match "
                   f"{fmt(table[grkd]['exact_match'])}; relative to " + ", ".join(f"{m} {pct(g)}" for m, g in gains.items())
                   + f" (mean {pct(statistics.mean(gains.values()))}). Against the best of them ({best}): "
                   f"{fmt_diff(d)} ({pct(over_best)}). Verdict: {verdict(over_best, d[2], 0.09)}.")
    ts = [f"GRKD t={t}" for t in (0.25, 0.5, 0.75)]
    if accuracy_ok and has(*ts):
        best = max(ts, key=lambda m: table[m]["exact_match"][0])
        ds = {m: test(m, best, "exact_match") for m in ts if m != best}
        out.append("- **Transition point (the seed calls 0.5 arbitrary)**: exact match " + ", ".join(
            f"{m[5:]} {fmt(table[m]['exact_match'])}" for m in ts) + f"; best {best[5:]}, the others against it: "
            + ", ".join(f"{m[5:]} {fmt_diff(d)}" for m, d in ds.items()) + ". Verdict: " +
            ("the transition point matters here" if any(d[2] is not None and d[2] < 0.05 for d in ds.values())
             else "no transition point is distinguished from the others at this scale (nor shown equal)") + ".")
    if has("RLKD", BASELINE):
        base = table["RLKD"].get("time_vs", BASELINE)             # forward KL with the live teacher, as RLKD's
        cr, orr = (rel(table, "RLKD", base, f"{x}@{K}") for x in ("consistency", "overlap"))
        dcr, dor = test("RLKD", base, f"consistency@{K}"), test("RLKD", base, f"overlap@{K}")
        t = table["RLKD"].get("time_ratio")
        out.append(f"- **RLKD raises CR@k by 30-95% and OR@k by 50-120% for ~1% more time**: CR@5 "
                   f"{fmt(table['RLKD'][f'consistency@{K}'])} vs {base} {fmt(table[base][f'consistency@{K}'])} "
                   f"({pct(cr)}, {fmt_diff(dcr)}); OR@5 {fmt(table['RLKD'][f'overlap@{K}'])} vs "
                   f"{fmt(table[base][f'overlap@{K}'])} ({pct(orr)}, {fmt_diff(dor)}); step time "
                   f"{'-' if t is None else f'{t:.2f}x'} {table['RLKD'].get('time_vs', '')}. Verdict: CR@5 "
                   f"{verdict(cr, dcr[2], 0.30)}; OR@5 {verdict(orr, dor[2], 0.50)}; time "
                   f"{'-' if t is None else 'holds' if t <= 1.05 else f'does not hold ({t - 1:+.0%})'}.")
    rivals = [m for m in ("DistiLLM", "GKD", "on-policy reverse KL") if m in table]
    if not accuracy_ok and "class KD" in table and rivals:
        out.append("- **Class KD edges out DistiLLM, GKD and MiniLLM**: " + "; ".join(
            f"vs {m}: {instead('class KD', m)}" for m in rivals) + ".")
    elif "class KD" in table and rivals:
        ds = {m: test("class KD", m, "exact_match") for m in rivals}
        out.append(f"- **Class KD edges out DistiLLM, GKD and MiniLLM**: class KD exact match "
                   f"{fmt(table['class KD']['exact_match'])}; " + "; ".join(
                       f"vs {m} ({fmt(table[m]['exact_match'])}): {fmt_diff(d)}, {verdict(d[0], d[2])}"
                       for m, d in ds.items()) + ". MiniLLM's row is its objective, reverse KL on the student's own "
                   "samples, without its policy gradient.")
    return out


def plots(task: Task, table: dict, teacher: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.32 * len(names) + 2), sharey=True)
    for ax, key in zip(axes, ("exact_match", "nll", f"overlap@{K}")):
        means = [table[m][key][0] for m in names]
        ax.barh(names, means, xerr=[table[m][key][1] for m in names], color="tab:blue", alpha=0.75, capsize=3)
        if key in teacher:
            ax.axvline(teacher[key], color="k", ls="--", lw=1, label="teacher")
            ax.legend(loc="lower right")
        label = "answer accuracy" if key == "exact_match" and task.correct is gsm8k_correct else METRICS[key]
        ax.set_title(label + " (mean +- sd over seeds)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(f"Leaderboard, {task.name} task")
    fig.tight_layout()
    fig.savefig(out / "bar.png", dpi=90)
    plt.close(fig)
    # held-out NLL only: a run taught from the cache loads no teacher, so its evaluations have no OR@k
    fig, ax = plt.subplots(figsize=(11, 6.5))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(names):
        by_step: dict[int, list[float]] = {}
        for r in table[m]["seeds"].values():
            for step, nll, _ in r["curve"]:
                by_step.setdefault(step, []).append(nll)
        n = len(table[m]["seeds"])
        points = sorted((step, statistics.mean(v)) for step, v in by_step.items() if len(v) == n)
        if points:
            ax.plot(*zip(*points), label=m, color=cmap(i % 20), ls="-" if i < 10 else "--", marker=".")
    ax.set_ylabel("held-out NLL of the references (log scale)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Learning curves (mean over seeds), {task.name} task")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


def write(task: Task, args, table: dict, teacher: dict, out: Path, n_eval: int, wall: float) -> list[str]:
    seeds = args.seeds
    trained = sum(r["step_s"][0] * r["seeds"][s]["steps"] for r in table.values() for s in seeds)
    command = " ".join(["python benchmarks/quality.py", *args.argv])
    head = [f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} CPUs; the runs' training steps took {trained / 60:.0f} min in all, plus ~15 s to start "
            f"each run; this invocation {wall / 60:.0f} min, finished runs reused). Seeds {', '.join(map(str, seeds))} (train.seed: student "
            f"initialisation and data order, the same for every method); {n_eval} held-out prompts; "
            f"{'answer accuracy (the number after ####)' if task.name == 'gsm8k' else 'exact match'} and ROUGE-L "
            f"from greedy decoding, NLL of the held-out references, OR@{K} / CR@{K} with the teacher on them. "
            "Mean +- standard deviation over seeds. Step: mean training step (on-policy rows: with their sampling); "
            "time vs FKL: against forward KL with the same teacher source (cache or live; SFT: the live one). "
            "The last two columns: "
            "the paired difference from forward KL over seeds and the paired t-test's p (noise: p >= 0.05). "
            f"With {len(seeds)} seeds the test has {len(seeds) - 1} degrees of freedom and little power, and the p "
            "values are not corrected for the number of rows compared: a p just under 0.05 is weak evidence, and "
            "\"noise\" means not shown, not shown equal. Off-policy rows train on the same tokens (per-seed table); "
            "on-policy rows on the same number of sequences, partly their own samples.", ""]
    if "DistiLLM" in table:         # its schedule reads the NLL of the same held-out prompts the board scores
        phi = max(r["phi"] for r in table["DistiLLM"]["seeds"].values())
        head += [f"DistiLLM's threshold phi follows the NLL on the held-out prompts this board scores (its recipe's "
                 f"val_metric); it reached at most {phi:.1f} here" + (" (it never left the dataset's responses)."
                                                                    if phi == 0 else "."), ""]
    accuracy_ok = not (task.correct is gsm8k_correct and teacher["exact_match"] < 0.05)
    if not accuracy_ok:
        head += [f"**The teacher answers {teacher['exact_match']:.1%} of the test questions**: at this scale answer "
                 "accuracy separates nothing; read the NLL and alignment columns.", ""]
    found = claims(table, seeds, accuracy_ok) or ["- (none of the claims' rows were run)"]
    lines = head + board(table, teacher, "answer accuracy" if task.correct is gsm8k_correct else "exact match") + ["", "Claims of the seeds, tested:", ""] + found
    per_seed = ["| method | seed | exact match | ROUGE-L | NLL | OR@5 | CR@5 | tokens |", "|---" * 8 + "|"]
    for m, r in table.items():
        for s, f in r["seeds"].items():
            per_seed.append(f"| {m} | {s} | {f['exact_match']:.3f} | {f['rouge_l']:.3f} | {f['nll']:.4f} "
                            f"| {f.get(f'overlap@{K}', 0):.3f} | {f.get(f'consistency@{K}', 0):.4f} | {f['tokens']} |")
    out.mkdir(parents=True, exist_ok=True)
    plots(task, table, teacher, out)
    (out / "report.md").write_text(f"# Distillation leaderboard: {task.name} task\n\n" + "\n".join(
        lines + ["", "![bar](bar.png)", "", "![curves](curves.png)", "", "Every seed:", ""] + per_seed) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"teacher": teacher, "methods": {m: {**{k: v for k, v in r.items() if k != "seeds"},
                                             "seeds": {str(s): {k: v for k, v in f.items()}
                                                       for s, f in r["seeds"].items()}}
                                         for m, r in table.items()}}, indent=1, default=str))
    return lines


def publish(task: str, lines: list[str], out: Path) -> None:
    """Replace this task's section of benchmarks/RESULTS.md (appended the first time)."""
    start, end = f"<!-- leaderboard:{task} -->", f"<!-- /leaderboard:{task} -->"
    link = os.path.relpath(out / "report.md", RESULTS_MD.parent)
    body = "\n".join([start, f"## Leaderboard: {task} task", "", *lines, "",
                      f"Report page with the plots and every seed: [{link}]({link})", end])
    text = RESULTS_MD.read_text()
    n_start, n_end = text.count(start), text.count(end)
    if (n_start, n_end) == (0, 0):
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    elif (n_start, n_end) == (1, 1) and text.index(start) < text.index(end):
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:                               # edited by hand: never guess what to replace
        sys.exit(f"{RESULTS_MD}: expected the markers {start} ... {end} once each, in that order (found "
                 f"{n_start} and {n_end}); fix them by hand, the report is in {out}")
    RESULTS_MD.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("demo", "gsm8k"), default="demo")
    ap.add_argument("--gsm8k", default=str(GSM8K), help="folder with GSM8K's train.jsonl and test.jsonl")
    ap.add_argument("--recipe", help="another off-policy base recipe (its data, teacher, student)")
    ap.add_argument("--methods", help=f"comma list of methods (default: every one; gsm8k: {', '.join(GSM8K_METHODS)} "
                    f"and the best on-policy method of the demo board); one of: {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, nargs="+", help="train.seed values (default 0 1 2)")
    ap.add_argument("--steps", type=int, help="train.steps of every student (default the recipe's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides of every run")
    ap.add_argument("--quick", action="store_true", help="one seed, 20 steps, SFT and forward KL, 16 prompts")
    ap.add_argument("--out", help="report folder (default benchmarks/leaderboard/<task>)")
    ap.add_argument("--runs", help="run folder (default runs/leaderboard/<task>; a study that is not published: "
                    "<--out>/runs)")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    name = "recipe" if args.recipe else args.task
    args.methods_given, args.seeds_given = bool(args.methods), bool(args.seeds)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.methods:
        args.methods = [m.strip() for m in args.methods.split(",")]
    elif args.quick:
        args.methods = QUICK_METHODS
    elif args.task == "gsm8k":
        args.methods = GSM8K_METHODS + [best_onpolicy()]
    else:
        args.methods = list(METHODS)
    if unknown := [m for m in args.methods if m not in METHODS]:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    extra = list(args.set)
    if args.quick:
        extra += [f"train.steps={args.steps or 20}", "train.eval_every=10", "data.eval_samples=16"]
    elif args.steps:
        extra.append(f"train.steps={args.steps}")
    # only the full study with its defaults is published (report folder and RESULTS.md); any other goes to --out
    args.publish = not (args.quick or args.recipe or args.methods_given or args.seeds_given or args.steps or args.set)
    if not args.publish and not args.out:
        ap.error("a study other than the default full one (--methods, --seeds, --steps, --set, --recipe) is not "
                 "published: give its report folder with --out DIR")
    out = Path(args.out or REPO / "benchmarks" / "leaderboard" / name).resolve()
    # an unpublished study keeps its runs beside its report: they never block the published one's
    runs_dir = Path(args.runs or (REPO / "runs" / "leaderboard" / name if args.publish else out / "runs")).resolve()
    os.chdir(REPO)                      # the demo recipes' paths are relative to the repository
    from train.demo import pin_kernels
    pin_kernels()
    t0 = time.time()
    task = make_task(args, runs_dir)
    runs = train_all(task, args.seeds, runs_dir, extra)
    from train.config import load_config
    cfg = load_config(str(task.base), [*task.common, *extra])
    n_eval = cfg.data.eval_samples
    teacher, figures = evaluate(task, runs, cfg, n_eval)
    table = summarise(task, args.seeds, runs, figures)
    lines = write(task, args, table, teacher, out, n_eval, time.time() - t0)
    print("\n".join(lines))
    if args.publish:
        publish(name, lines, out)
        log(f"benchmarks/RESULTS.md: section leaderboard:{name} written")
    log(f"report: {out / 'report.md'}")
    return 0


def best_onpolicy() -> str:
    """The on-policy method with the best exact match on the published demo board (GKD without one)."""
    f = REPO / "benchmarks" / "leaderboard" / "demo" / "results.json"
    if not f.exists():
        return "GKD"
    methods = json.loads(f.read_text())["methods"]
    return max((m for m in ONPOLICY if m in methods), key=lambda m: methods[m]["exact_match"][0], default="GKD")


if __name__ == "__main__":
    sys.exit(main())
