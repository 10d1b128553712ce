"""kd-train end to end on 2 real deepspeed CPU ranks: learning, outputs, exact resume, interrupted
saves, ZeRO-3 against stage 0, and the errors users meet first."""
import json

import pytest
import torch

from .conftest import kd_train, metrics

pytestmark = pytest.mark.dist


def test_grkd_run_learns_and_writes_its_outputs(kd_setup):
    run = kd_setup / "runs" / "learn"
    kd_train(kd_setup / "recipe.yaml", "run_name=learn", "train.steps=40", "train.eval_every=20",
             "train.log_every=10")
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    def mean(key, part):
        return sum(r[key] for r in part) / len(part)
    # the total rises with lambda by design; each term and the alignment must improve
    assert mean("soft_target", rows[-5:]) < 0.7 * mean("soft_target", rows[:5])
    assert mean("group_relative", rows[-5:]) < 0.9 * mean("group_relative", rows[:5])
    assert mean("overlap@5", rows[-5:]) > mean("overlap@5", rows[:5]) + 0.2
    assert {"soft_target", "group_relative", "lambda", "lr", "tokens_per_s", "overlap@5"} <= set(rows[-1])
    assert rows[0]["lambda"] == 0.0 and rows[-1]["lambda"] == pytest.approx(0.5)
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [20, 40]
    assert evals[-1]["eval_forward_kl"] < evals[0]["eval_forward_kl"]
    assert (run / "report.md").is_file() and (run / "loss.png").is_file()
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "latest").read_text() == "step_00000040"

    # the checkpoint holds the model's own parameter names: kd-convert gives the export's weights
    from safetensors.torch import load_file

    from tools.convert import main as kd_convert
    assert kd_convert(["zero-to-hf", str(run / "checkpoints"), str(run / "converted")]) == 0
    exported, converted = (load_file(run / d / "model.safetensors") for d in ("student-hf", "converted"))
    assert exported.keys() == converted.keys()
    for k in exported:
        torch.testing.assert_close(converted[k], exported[k])

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "student-hf")
    tok = AutoTokenizer.from_pretrained(run / "student-hf")
    ids = tok("Reverse: a b c\nAnswer:", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_resume_is_exact_and_a_killed_save_keeps_the_previous_checkpoint(kd_setup):
    recipe, runs = kd_setup / "recipe.yaml", kd_setup / "runs"
    kd_train(recipe, "run_name=straight", "train.save_every=3")
    straight = [r["loss"] for r in metrics(runs / "straight")]

    killed = kd_train(recipe, "run_name=killed", "train.save_every=3", check=False,
                      env={"KD_FAULT": "kill-during-save:6"})
    assert killed.returncode != 0
    ckpts = runs / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()

    kd_train(recipe, "run_name=killed", "train.save_every=3", "resume=auto")
    resumed = metrics(runs / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == pytest.approx(straight, rel=1e-6)
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert (ckpts / "step_00000006" / "COMPLETE").exists()


@pytest.mark.parametrize("student", ["student-init", "gemma2-init"])
def test_zero3_step_equals_stage0_step(kd_setup, student):
    """Same initial weights, 3 steps: the gathered lm head (tied to the embedding and softcapped for
    Gemma-2) gives ZeRO-3 the losses and weights of stage 0."""
    recipe, runs = kd_setup / "recipe.yaml", kd_setup / "runs"
    for stage in (0, 3):
        kd_train(recipe, f"run_name={student}-stage{stage}", f"parallel.zero_stage={stage}", "train.steps=3",
                 "data.eval=null", f"model.student={kd_setup / student}", "model.attn_implementation=eager")
    l0, l3 = ([r["loss"] for r in metrics(runs / f"{student}-stage{s}")] for s in (0, 3))
    assert l3 == pytest.approx(l0, rel=1e-5)
    assert l3[-1] < l3[0]
    from safetensors.torch import load_file
    w0 = load_file(runs / f"{student}-stage0" / "student-hf" / "model.safetensors")
    w3 = load_file(runs / f"{student}-stage3" / "student-hf" / "model.safetensors")
    init = load_file(kd_setup / student / "model.safetensors")
    assert w0.keys() == w3.keys()
    for k in w0:
        torch.testing.assert_close(w3[k], w0[k], rtol=1e-4, atol=1e-6)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(w3[emb], init[emb])     # the (tied) embedding was trained


def test_bad_record_names_file_and_line(kd_setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (kd_setup / "data" / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:10] + ['{"prompt": "x", "response": '] + good[10:40]) + "\n")
    proc = kd_train(kd_setup / "recipe.yaml", "run_name=bad", f"data.train={bad}", check=False)
    assert proc.returncode != 0
    assert f"{bad}" in proc.stderr and "line 11" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_teacher_with_another_tokenizer_is_refused(kd_setup, tmp_path):
    from train.demo_task import demo_texts
    from train.tokenizer import train_sentencepiece
    other = tmp_path / "other-tok"
    train_sentencepiece(demo_texts(kd_setup / "data" / "train.jsonl"), other, vocab_size=380, model_type="unigram")
    proc = kd_train(kd_setup / "recipe.yaml", "run_name=mismatch", f"data.tokenizer={other}", check=False)
    assert proc.returncode != 0
    assert "teacher tokenizer" in proc.stderr and "vocab-check" in proc.stderr, proc.stderr[-3000:]


def test_nan_losses_are_skipped_then_stop_with_checkpoint_intact(kd_setup):
    """Step 1 is finite and its update explodes the weights: no checkpoint is ever followed by a
    finite step, and the message says so instead of offering one (test_steps: one that is)."""
    run = kd_setup / "runs" / "nan"
    proc = kd_train(kd_setup / "recipe.yaml", "run_name=nan", "train.steps=12", "train.save_every=1",
                    "train.lr=1e12", "train.grad_clip=0", "train.max_bad_steps=3", "train.warmup_steps=0",
                    "train.keep_checkpoints=1", check=False)
    assert proc.returncode != 0
    assert "NaN/inf loss" in proc.stderr and "train.max_bad_steps" in proc.stderr, proc.stderr[-3000:]
    assert "No checkpoint was followed by a finite step" in proc.stderr
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003" and (ckpts / "step_00000003" / "COMPLETE").exists()


def test_config_typo_fails_before_launch_with_a_suggestion(kd_setup):
    proc = kd_train(kd_setup / "recipe.yaml", "train.stpes=3", check=False, timeout=60)
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_saves_and_resume_finishes_the_run(kd_setup):
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO
    run = kd_setup / "runs" / "sigterm"
    proc = subprocess.Popen([sys.executable, "-m", "train", str(kd_setup / "recipe.yaml"), "run_name=sigterm",
                             "train.steps=400"], cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and metrics(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stop requested" in out, out[-3000:]
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[-1])
    assert 0 < saved < 400 and [r["step"] for r in metrics(run)] == list(range(1, saved + 1))
    kd_train(kd_setup / "recipe.yaml", "run_name=sigterm", f"train.steps={saved + 2}", "resume=auto",
             "data.eval=null")
    assert [r["step"] for r in metrics(run)] == list(range(1, saved + 3))


def test_missing_input_fails_before_launch(kd_setup):
    proc = kd_train(kd_setup / "recipe.yaml", "data.eval=/no/such/eval.jsonl", check=False, timeout=60)
    assert proc.returncode == 2
    assert "data.eval=/no/such/eval.jsonl: no such file" in proc.stderr and "Traceback" not in proc.stderr
