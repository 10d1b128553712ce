"""benchmarks/quality.py --quick (the leaderboard's smoke run) on the tiny test setup: SFT and forward
KL from a k = V teacher cache, one seed, 20 steps, evaluated and reported."""
import json
import subprocess
import sys

from .conftest import REPO


def quality(kd_setup, out, runs, *more):
    return subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--recipe", str(kd_setup / "recipe.yaml"),
                           "--out", str(out), "--runs", str(runs), *more], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def test_quick_leaderboard(kd_setup, tmp_path):
    out, runs = tmp_path / "report", tmp_path / "runs"
    proc = quality(kd_setup, out, runs)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["SFT", "forward KL"]
    sft, fkl = res["methods"]["SFT"], res["methods"]["forward KL"]
    # the forward-KL student was taught by the cache, not the live teacher, and both saw the same tokens
    assert "model.teacher=cache:" in (runs / "logs" / "forward-kl-s0.log").read_text()
    assert (runs / "teacher-cache" / "manifest.json").exists()
    assert sft["seeds"]["0"]["tokens"] == fkl["seeds"]["0"]["tokens"] > 0
    assert sft["seeds"]["0"]["steps"] == fkl["seeds"]["0"]["steps"] == 20
    for row in (sft, fkl):
        assert 0 <= row["exact_match"][0] <= 1 and 0 <= row["overlap@5"][0] <= 1 and row["nll"][0] > 0
    # step times against forward KL taught the same way: none for SFT without a live forward-KL row
    assert "time_ratio" not in sft
    # distillation pulls the student's top-5 towards the teacher's more than SFT does (20 steps suffice here)
    assert fkl["overlap@5"][0] > sft["overlap@5"][0]
    report = (out / "report.md").read_text()
    assert "| SFT | none |" in report and "| forward KL | cache |" in report
    for png in ("bar.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # a second study reuses the finished runs and their evaluations: same figures, no training
    stamp = (runs / "sft-s0" / "metrics.jsonl").stat().st_mtime_ns
    again = quality(kd_setup, out, runs)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("finished earlier with these settings, reused") == 2
    assert "evaluating" not in again.stdout and (runs / "sft-s0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["methods"]["forward KL"]["nll"] == fkl["nll"]
    # one with other settings stops before touching them
    other = quality(kd_setup, tmp_path / "other", runs, "--set", "train.lr=1e-3")
    assert other.returncode != 0 and "trained with other settings" in other.stderr
    assert (runs / "sft-s0" / "metrics.jsonl").stat().st_mtime_ns == stamp
