"""A run's life through kd-train as users drive it (2 deepspeed CPU ranks): an earlier run is never
overwritten, a resumed run says what changed, a damaged or full-disk checkpoint loses nothing, a run
moves to another world size, Ctrl-C stops cleanly, and bad inputs fail before any rank starts."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import REPO, kd_train, metrics

pytestmark = pytest.mark.dist


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_a_rerun_never_overwrites_and_a_resume_says_what_changed(kd_setup, tmp_path):
    recipe, run = kd_setup / "recipe.yaml", tmp_path / "again"
    common = [f"output_dir={tmp_path}", "run_name=again"]
    kd_train(recipe, *common, "train.steps=2")
    before = (run / "metrics.jsonl").read_bytes()
    tags = sorted(p.name for p in (run / "checkpoints").iterdir())

    out = kd_train(recipe, *common, "train.steps=2", check=False, timeout=60)     # the recipe again
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert all(s in out.stderr for s in ("already holds an earlier run", "resume=auto", "run_name=",
                                         "overwrite=true")), out.stderr
    assert (run / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == tags

    # config.yaml as it is, following its own hint, continues the run: finished, so nothing to redo
    assert (run / "config.yaml").read_text().splitlines()[1] == f"# Continue this run: kd-train {run / 'config.yaml'}"
    out = kd_train(run / "config.yaml", check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r.get("kind") for r in records(run)] == [None, None, "eval"]       # no second eval record
    assert (run / "metrics.jsonl").read_bytes() == before
    out = kd_train(run / "config.yaml", "resume=auto", "train.steps=1", check=False, timeout=60)
    assert out.returncode == 2 and "past train.steps=1" in out.stderr

    out = kd_train(run / "config.yaml", "resume=auto", "train.steps=3", "train.lr=1e-3")
    assert "changed since that checkpoint" in out.stdout and "train.lr 0.003 -> 0.001" in out.stdout, out.stdout
    from train.engines import warmup_cosine
    assert metrics(run)[-1]["lr"] == pytest.approx(1e-3 * warmup_cosine(2, 1, 3, 0.1))
    assert (run / "student-hf" / "kd_export.json").read_text().strip() == '{"step": 3}'

    kd_train(recipe, *common, "train.steps=2", "overwrite=true")
    moved = tmp_path / "again.replaced-1"
    assert [r["step"] for r in metrics(moved)] == [1, 2, 3] and [r["step"] for r in metrics(run)] == [1, 2]
    assert (moved / "checkpoints" / "latest").read_text() == "step_00000003"
    # from another run's checkpoint over this one: this one is moved aside too, not rewritten
    kd_train(recipe, *common, "train.steps=4", f"resume={moved / 'checkpoints'}", "overwrite=true")
    assert [r["step"] for r in metrics(tmp_path / "again.replaced-2")] == [1, 2]
    assert [r["step"] for r in metrics(run)] == [4] and [r["step"] for r in metrics(moved)] == [1, 2, 3]


def test_a_damaged_newest_checkpoint_falls_back_or_is_named(kd_setup, tmp_path):
    recipe, run = kd_setup / "recipe.yaml", tmp_path / "damaged"
    common = [f"output_dir={tmp_path}", "run_name=damaged", "data.eval=null", "train.save_every=2"]
    kd_train(recipe, *common, "train.steps=4")
    state = run / "checkpoints" / "step_00000004" / "trainer_state_rank1.pt"
    state.write_bytes(state.read_bytes()[:20])                      # truncated
    out = kd_train(recipe, *common, "train.steps=6", f"resume={state.parent}", check=False, timeout=60)
    assert out.returncode == 2 and f"{state} has 20 bytes" in out.stderr
    assert f"resume={run / 'checkpoints' / 'step_00000002'}" in out.stderr and "Traceback" not in out.stderr
    out = kd_train(recipe, *common, "train.steps=6", "resume=auto")
    assert "is damaged" in out.stdout and "resuming from" in out.stdout and "step_00000002" in out.stdout
    assert [r["step"] for r in metrics(run)] == list(range(1, 7))


def test_a_full_disk_keeps_the_previous_checkpoint(kd_setup, tmp_path):
    recipe = kd_setup / "recipe.yaml"
    common = ["data.eval=null", "train.save_every=1", "train.keep_checkpoints=1"]
    kd_train(recipe, f"output_dir={tmp_path}", "run_name=probe", "train.steps=1", *common)
    probe = tmp_path / "probe"
    ckpt = sum(f.stat().st_size for f in (probe / "checkpoints" / "step_00000001").rglob("*"))
    rest = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file()) - ckpt
    disk = tmp_path / "small"
    disk.mkdir()
    size = int(rest + 1.5 * ckpt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = kd_train(recipe, f"output_dir={disk}", "run_name=full", "train.steps=3", *common, check=False)
        assert out.returncode != 0
        assert f"no space left on tmpfs (mounted at {disk})" in out.stderr, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        ckpts = disk / "full" / "checkpoints"
        assert (ckpts / "latest").read_text() == "step_00000001" and (ckpts / "step_00000001" / "COMPLETE").is_file()
        assert not (ckpts / "step_00000002").exists()
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("zero, before, after", [(3, (2, 1), (1, 2)), (0, (1, 2), (2, 1))],
                         ids=["zero3-2-to-1-ranks", "stage0-1-to-2-ranks"])
def test_resume_on_another_number_of_ranks(kd_setup, tmp_path, zero, before, after):
    """Ranks x grad_accum kept: the same global batches, so the steps after the resume match the
    run that stayed put (ZeRO-3 through DeepSpeed's universal checkpoint; stage 0 as it is)."""
    recipe = kd_setup / "recipe.yaml"
    common = [f"output_dir={tmp_path}", "data.eval=null", f"parallel.zero_stage={zero}", "train.steps=4"]
    (n0, gas0), (n1, gas1) = before, after
    kd_train(recipe, *common, "run_name=stay", f"parallel.nproc={n0}", f"train.grad_accum={gas0}")
    kd_train(recipe, *common, "run_name=moved", f"parallel.nproc={n0}", f"train.grad_accum={gas0}",
             "train.save_every=2", check=False, env={"KD_FAULT": "kill-during-save:4"})   # stopped after step 2
    assert (tmp_path / "moved" / "checkpoints" / "latest").read_text() == "step_00000002"
    out = kd_train(recipe, *common, "run_name=moved", "resume=auto", f"parallel.nproc={n1}", f"train.grad_accum={gas1}")
    assert f"written by {n0} ranks and this run has {n1}" in out.stdout
    assert ("universal checkpoint" in out.stdout) == (zero > 0)
    stay, moved = metrics(tmp_path / "stay"), metrics(tmp_path / "moved")
    assert [r["step"] for r in moved] == [1, 2, 3, 4]
    for a, b in zip(stay, moved):
        assert b["tokens"] == a["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]


def test_ctrl_c_saves_and_exits_0(kd_setup, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group; kd-train keeps the launcher
    out of it, so only the ranks' own clean stop decides the exit code."""
    run = tmp_path / "ctrl-c"
    proc = subprocess.Popen([sys.executable, "-m", "train", str(kd_setup / "recipe.yaml"), f"output_dir={tmp_path}",
                             "run_name=ctrl-c", "train.steps=400", "data.eval=null"], cwd=REPO,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and metrics(run)):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[-1])
    assert "stop requested" in out and [r["step"] for r in metrics(run)] == list(range(1, saved + 1))


def test_ranks_stop_and_save_when_kd_train_is_killed(kd_setup, tmp_path):
    """kd-train SIGKILLed (no chance to pass anything on): its ranks notice, save and exit."""
    import psutil
    run = tmp_path / "orphan"
    proc = subprocess.Popen([sys.executable, "-m", "train", str(kd_setup / "recipe.yaml"), f"output_dir={tmp_path}",
                             "run_name=orphan", "train.steps=400", "data.eval=null"], cwd=REPO,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and metrics(run)):
        time.sleep(0.5)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=120)
    assert not alive
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[-1])
    assert 0 < saved < 400 and [r["step"] for r in metrics(run)] == list(range(1, saved + 1))


def test_bad_inputs_fail_before_any_rank_starts(kd_setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import tiny_llama

    def refused(*overrides):
        out = kd_train(kd_setup / "recipe.yaml", f"output_dir={tmp_path}", "run_name=bad", *overrides, check=False,
                       timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert not (tmp_path / "bad").exists()
        return out.stderr

    fake = tmp_path / "train.parquet"
    fake.write_text('{"prompt": "a", "response": "b"}\n')
    assert f"{fake}" in refused(f"data.train={fake}")

    wrong = tmp_path / "teacher-wrong-config"
    shutil.copytree(kd_setup / "teacher", wrong)
    conf = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(dict(conf, intermediate_size=80)))
    err = refused(f"model.teacher={wrong}")
    assert "model.teacher=" in err and "config.json implies" in err and "mlp" in err

    small = tmp_path / "teacher-small-vocab"                         # no tokenizer files beside it
    cfg = tiny_llama(48, 2, 300)
    cfg.pop("model_type")
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(small)
    assert "has 300 vocabulary rows" in refused(f"model.teacher={small}")

    assert "resume=" in refused("resume=/no/such/checkpoint")
    for flag in (["--help"], [str(kd_setup / "recipe.yaml"), "--help"]):
        out = subprocess.run([sys.executable, "-m", "train", *flag], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0 and "usage: kd-train" in out.stdout and "train/config.py" in out.stdout


def test_only_the_demo_recipe_builds_its_prerequisites(tmp_path):
    """From another folder, the demo recipe's own inputs are built there; a mistyped path is an
    error, never a freshly built stand-in."""
    demo = REPO / "recipes" / "demo.yaml"

    def kd(*args):
        return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=120)
    out = kd(demo, "data.tokenizer=runs/demo-data/tokenizr", "loss.method=sft", "model.teacher=null",
             "loss.params={}")
    assert out.returncode == 2 and "data.tokenizer=runs/demo-data/tokenizr: no such file" in out.stderr
    assert (tmp_path / "runs" / "demo-data" / "train.jsonl").is_file()          # the demo's own data
    assert not (tmp_path / "runs" / "demo-data" / "tokenizr").exists()
    out = kd(demo, "model.teacher=runs/demo-teachr/student-hf")
    assert out.returncode == 2 and "model.teacher=runs/demo-teachr/student-hf: no such file" in out.stderr
    assert not (tmp_path / "runs" / "demo-teachr").exists() and not (tmp_path / "runs" / "demo-teacher").exists()
    recipe = yaml.safe_load(demo.read_text())
    recipe["data"].update(train=str(tmp_path / "runs" / "demo-data" / "train.jsonl"), eval=None)
    other = tmp_path / "mine.yaml"
    other.write_text(yaml.safe_dump(recipe))
    out = kd(other)                                  # the same paths, but not the demo recipe
    assert out.returncode == 2 and "model.teacher=runs/demo-teacher/student-hf: no such file" in out.stderr
