"""What a run writes for people and scripts (rank 0 only): metrics.jsonl, TensorBoard events, a
progress bar on a terminal (plain lines otherwise), and report.md with loss-curve plots."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, cfg, enabled: bool, resumed_at: int | None = None):
        self.enabled, self.cfg, self.run_dir = enabled, cfg, Path(run_dir)
        self.start = time.time()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        rows, cut = _records(self.metrics_path)         # every rank: has_eval must agree everywhere
        kept = [r for r in rows if r.get("step", 0) <= (resumed_at or 0)]
        self.evals = [r for r in kept if r.get("kind") == "eval"]
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():
            # drop the steps this run redoes; only a run continuing from its own checkpoint gets
            # here with a metrics file (preflight refuses to start afresh over one)
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.metrics_path)
        self.metrics = open(self.metrics_path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=(resumed_at or 0) + 1)
        except ImportError:
            self.tb = None
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=resumed_at or 0, desc=cfg.run_name,
                            dynamic_ncols=True)
        if cut:
            self.warn(f"{self.metrics_path}: dropped {cut} record(s) cut short (a run killed while writing)")

    def _write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def step(self, step: int, stats: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}}
        self._write(record)
        if self.bar:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}")
        elif step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            elapsed = time.time() - self.start
            self.info(f"step {step}/{self.cfg.train.steps} loss {stats['loss']:.4f} "
                      f"lr {stats['lr']:.2e} tokens/s {stats['tokens_per_s']:.0f} ({elapsed:.0f}s)")

    def has_eval(self, step: int) -> bool:
        """Whether held-out results for ``step`` are logged (the same answer on every rank)."""
        return any(e["step"] == step for e in self.evals)

    def last_eval(self) -> dict:
        return {k: v for k, v in self.evals[-1].items() if k not in ("step", "kind")} if self.evals else {}

    def eval(self, step: int, results: dict) -> None:
        self.evals.append({"step": step, **results})
        if not self.enabled:
            return
        self._write({"step": step, "kind": "eval", **results})
        self.info(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                                        if isinstance(v, float)))

    def info(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(f"[kd-train] {msg}", **({} if self.bar else {"flush": True}))

    def warn(self, msg: str) -> None:
        self.info(f"WARNING: {msg}")

    def close(self, final: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        self.metrics.close()
        if final is not None:
            c = self.cfg
            summary = [f"method `{c.loss.method}`, {c.train.steps} steps, student `{c.model.student}`, teacher "
                       f"`{c.model.teacher}`", "", "| metric | value |", "|---|---|"]
            summary += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
            write_report(self.run_dir, c.run_name, summary, {c.run_name: self.run_dir})


def _records(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics file, and how many lines were cut short (a killed run, a full disk)."""
    if not path.exists():
        return [], 0
    rows, cut = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                cut += 1
    return rows, cut


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows, _ = _records(Path(run_dir) / "metrics.jsonl")
    return [r for r in rows if r.get("kind") != "eval"], [r for r in rows if r.get("kind") == "eval"]


def plot_curves(runs: dict[str, Path], key: str, out: Path, title: str) -> bool:
    """One PNG with ``key`` against step for each run; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run_dir in runs.items():
        train, _ = read_metrics(run_dir)
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: Path, title: str, summary: list[str], runs: dict[str, Path]) -> Path:
    """``out_dir/report.md``: a title, ``summary`` (Markdown lines), a PNG per loss term the runs
    logged (one curve per run), and the held-out student NLL at each evaluation (and, for class KD,
    the classmate's NLL and KL(teacher || classmate))."""
    out_dir = Path(out_dir)
    lines = [f"# {title}", "", *summary, ""]
    logged = {name: read_metrics(d) for name, d in runs.items()}
    for key in ("loss", "soft_target", "group_relative", "ce", "misfeedback", "classmate_loss", "onpolicy_fraction"):
        if any(key in r for train, _ in logged.values() for r in train) and \
                plot_curves(runs, key, out_dir / f"{key}.png", f"{key} (each run's own objective)"):
            lines += [f"![{key}]({key}.png)", ""]
    rows = [(name, e) for name, (_, evals) in logged.items() for e in evals if "eval_student_nll" in e]
    if rows:
        cols = [("eval_student_nll", "NLL")]
        if any("eval_classmate_nll" in e for _, e in rows):
            cols += [("eval_classmate_nll", "classmate NLL"), ("eval_classmate_forward_kl", "KL(teacher || classmate)")]
        lines += ["Held-out student NLL during training:", "", "| run | step | " + " | ".join(c for _, c in cols) + " |",
                  "|---" * (len(cols) + 2) + "|"]
        lines += [f"| {n} | {e['step']} | " + " | ".join(f"{e[k]:.4f}" if k in e else "-" for k, _ in cols) + " |"
                  for n, e in rows]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
