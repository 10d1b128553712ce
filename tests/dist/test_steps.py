"""The optimizer step through the real trainer on 2 deepspeed CPU ranks: gradient accumulation
against one bigger micro-batch (with and without a non-finite micro-batch), the student's train
mode and activation checkpointing, DeepSpeed's backward hooks on the engine's output, and ZeRO-3
variants (every parameter partitioned, overlapping communication, CPU-offloaded optimizer) against
stage 0."""
import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import metrics
from .launch import run_deepspeed

pytestmark = pytest.mark.dist


def train(kd_setup, tmp_path, name, *overrides, env=None):
    run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", f"output_dir={tmp_path}",
                  f"run_name={name}", "data.eval=null", *overrides, env=env, timeout=400)
    return metrics(tmp_path / name), load_file(tmp_path / name / "student-hf" / "model.safetensors")


def assert_same(a, b):
    (rows_a, w_a), (rows_b, w_b) = a, b
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        assert x["tokens"] == y["tokens"] and x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-4, atol=1e-5)


def test_grad_accum_equals_one_micro_batch_twice_the_size(kd_setup, tmp_path):
    """Rank r gets the same examples either way: the first step's gradients (a scale error shows
    here, where Adam and clipping would hide it in the weights), losses and weights agree."""
    one = ["train.micro_batch=4", "train.grad_accum=1", "train.steps=2"]
    two = ["train.micro_batch=2", "train.grad_accum=2", "train.steps=2"]
    g1, g2 = tmp_path / "g1.pt", tmp_path / "g2.pt"
    assert_same(train(kd_setup, tmp_path, "mb4", *one, env={"KD_TEST_GRADS": str(g1)}),
                train(kd_setup, tmp_path, "mb2x2", *two, env={"KD_TEST_GRADS": str(g2)}))
    g1, g2 = torch.load(g1), torch.load(g2)
    scale = max(g.abs().max().item() for g in g1.values())
    assert scale > 1e-3 and max((g2[n] - g1[n]).abs().max().item() for n in g1) < 1e-5 * scale


@pytest.mark.parametrize("zero", ["3", "2", "2-offload", "1", "0"])
def test_a_non_finite_micro_batch_skips_the_whole_step(kd_setup, tmp_path, zero):
    """A non-finite micro-batch makes the bigger batch non-finite too: the step is skipped (the
    gradients the step's first micro-batch left behind are dropped, at every ZeRO stage), and the
    next step, LR included, equals the run with one micro-batch whose first step was skipped."""
    init = f"model.student={kd_setup / 'student-init'}"      # the same weights at every stage
    skipped = train(kd_setup, tmp_path, "mb4-nan", init, "train.micro_batch=4", "train.grad_accum=1", "train.steps=2",
                    env={"KD_TEST_NAN": "1"})
    assert [r["step"] for r in skipped[0]] == [2]
    stage = ["parallel.zero_stage=" + zero[0]] + (["parallel.offload_optimizer=true"] if "offload" in zero else [])
    two = [init, "train.micro_batch=2", "train.grad_accum=2", "train.steps=2", *stage]
    assert_same(skipped, train(kd_setup, tmp_path, "mb2x2-nan2", *two, env={"KD_TEST_NAN": "2"}))
    if zero == "3":                     # the step's first micro-batch: nothing accumulated yet
        assert_same(skipped, train(kd_setup, tmp_path, "mb2x2-nan1", *two, env={"KD_TEST_NAN": "1"}))


def counts(kd_setup, tmp_path, name, *overrides):
    path = tmp_path / f"{name}.json"
    train(kd_setup, tmp_path, name, "train.steps=2", "train.grad_accum=2", "train.micro_batch=2", *overrides,
          env={"KD_TEST_COUNTS": str(path)})
    return json.loads(path.read_text())


def test_student_trains_in_train_mode_and_deepspeed_sees_the_loss(kd_setup, tmp_path):
    """A student loaded from an HF directory comes back from from_pretrained in eval mode: it must
    still recompute its layers (activation checkpointing only acts in train mode) from the first
    step, like the config-built student; and every backward goes through DeepSpeed's prologue on
    the engine's output (one per micro-batch)."""
    hf = counts(kd_setup, tmp_path, "hf", f"model.student={kd_setup / 'student-init'}",
                "model.activation_checkpointing=true")
    built = counts(kd_setup, tmp_path, "built", "model.activation_checkpointing=true")
    plain = counts(kd_setup, tmp_path, "plain", f"model.student={kd_setup / 'student-init'}")
    # 2 micro-batches x 2 layers x (forward + recompute)
    assert hf["mlp_forwards"] == built["mlp_forwards"] == [8, 8]
    assert plain["mlp_forwards"] == [4, 4]
    assert hf["backward_prologues"] == plain["backward_prologues"] == [2, 2]


def test_zero3_variants_equal_stage0(kd_setup, tmp_path):
    """Every parameter partitioned (no persistence threshold), communication overlapped, and the
    optimizer offloaded to the CPU: the same losses and weights as stage 0 after 3 steps."""
    from train.engines import DS_CONFIG_DIR
    partitioned = tmp_path / "zero3_partitioned.json"
    conf = json.loads((DS_CONFIG_DIR / "zero3_student.json").read_text())
    conf["zero_optimization"].update(stage3_param_persistence_threshold=0, overlap_comm=True)
    partitioned.write_text(json.dumps(conf))
    common = ["train.steps=3", f"model.student={kd_setup / 'student-init'}"]
    stage0 = train(kd_setup, tmp_path, "stage0", *common, "parallel.zero_stage=0")
    assert stage0[0][-1]["loss"] < stage0[0][0]["loss"]
    assert_same(stage0, train(kd_setup, tmp_path, "zero3", *common, f"parallel.ds_config_student={partitioned}"))
    offload = tmp_path / "zero3_offload.json"
    conf["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    offload.write_text(json.dumps(conf))
    assert_same(stage0, train(kd_setup, tmp_path, "zero3-offload", *common, "parallel.offload_optimizer=true",
                              f"parallel.ds_config_student={offload}"))


def test_a_resumed_run_uses_its_own_optimizer_settings(kd_setup, tmp_path):
    """A checkpoint's optimizer state carries the old run's lr, betas and weight decay; the resumed
    run's settings are what the optimizer applies (read off its param groups at each step)."""
    run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", f"output_dir={tmp_path}",
                  "run_name=opt", "data.eval=null", "train.steps=2")
    path = tmp_path / "opt.json"
    run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", f"output_dir={tmp_path}",
                  "run_name=opt", "data.eval=null", "train.steps=3", "resume=auto", "train.lr=1e-3",
                  "train.betas=[0.8,0.9]", "train.weight_decay=0.1", env={"KD_TEST_COUNTS": str(path)})
    from train.engines import warmup_cosine
    (decay, no_decay), = json.loads(path.read_text())["optimizer"]        # step 3 only
    assert decay[0] == no_decay[0] == pytest.approx(1e-3 * warmup_cosine(2, 1, 3, 0.1))
    assert decay[1] == no_decay[1] == pytest.approx([0.8, 0.9])
    assert (decay[2], no_decay[2]) == (0.1, 0.0)


def test_a_streak_of_non_finite_steps_keeps_the_last_checkpoint_a_finite_step_followed(kd_setup, tmp_path):
    """Steps 1-2 finite, 3-5 not (keep_checkpoints=1, a save every step): the checkpoint of step 2
    holds the update the NaNs came from; step 1's, followed by finite step 2, is kept and named."""
    out = run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", f"output_dir={tmp_path}",
                        "run_name=streak", "data.eval=null", "train.steps=8", "train.save_every=1",
                        "train.keep_checkpoints=1", "train.max_bad_steps=3", env={"KD_TEST_NAN": "3,4,5"},
                        check=False)
    ckpts = tmp_path / "streak" / "checkpoints"
    assert out.returncode != 0 and f"resume={ckpts / 'step_00000001'}" in out.stderr, out.stderr[-3000:]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000004"]
