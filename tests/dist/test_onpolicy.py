"""On-policy modes and class KD through kd-train on 2 real deepspeed CPU ranks (ZeRO-3): each mode logs
its terms and resumes exactly (a run killed during its last save and resumed from the checkpoint
before equals the uninterrupted run, step by step), sequence parallelism equals one rank on the same
samples, and the on-policy inputs users get wrong fail before launch."""
import json

import pytest
import torch

from .conftest import kd_train, metrics

pytestmark = pytest.mark.dist

MODES = {
    "gkd": ["onpolicy.mode=gkd", "onpolicy.fraction=0.5"],
    # a buffer of two micro-batches and a high threshold: fresh, then replayed batches, phi moved by evals
    "distillm": ["onpolicy.mode=distillm", "onpolicy.init_threshold=0.7", "onpolicy.buffer_size=8",
                 "onpolicy.loss_eps=0", "train.eval_every=2"],
    "classkd": ["onpolicy.mode=gkd", "onpolicy.fraction=0.5", "classmate.update_every=1", "train.grad_accum=2",
                "classmate.misfeedback_weight=0.5"],
}
TERMS = {"gkd": {"onpolicy_fraction", "generation_s", "sampled_len"},
         "distillm": {"onpolicy_fraction", "phi", "buffer", "replay_fraction"},
         "classkd": {"onpolicy_fraction", "misfeedback", "classmate_kl", "classmate_loss"}}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_logs_its_terms_and_resumes_exactly(kd_setup, mode):
    recipe, runs = kd_setup / "recipe.yaml", kd_setup / "runs"
    extra = list(MODES[mode]) + ["onpolicy.max_new_tokens=12", "train.steps=6", "train.save_every=3"]
    if mode == "classkd":
        extra.append(f"model.classmate={kd_setup / 'student.json'}")
    kd_train(recipe, f"run_name={mode}-straight", *extra)
    straight = metrics(runs / f"{mode}-straight")
    assert TERMS[mode] <= set().union(*straight), set().union(*straight)
    assert 0 < straight[-1]["onpolicy_fraction"] < 1
    if mode == "distillm":
        assert any(r["replay_fraction"] > 0 for r in straight)     # the buffer was replayed from
    if mode == "classkd":
        evals = [json.loads(x) for x in (runs / f"{mode}-straight" / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in x]
        assert {"eval_classmate_nll", "eval_classmate_forward_kl"} <= set(evals[-1])
        tag = runs / f"{mode}-straight" / "checkpoints" / "step_00000006"
        assert (tag / "student").is_dir() and (tag / "classmate").is_dir()
        assert "KL(teacher || classmate)" in (runs / f"{mode}-straight" / "report.md").read_text()
        # kd-convert finds each engine in its folder; the classmate is another model than the student
        from safetensors.torch import load_file

        from tools.convert import main as kd_convert
        assert kd_convert(["zero-to-hf", str(tag), str(tag.parent.parent / "student")]) == 0
        assert kd_convert(["zero-to-hf", str(tag / "classmate"), str(tag.parent.parent / "classmate")]) == 0
        assert (tag.parent / "hf_meta" / "classmate" / "config.json").is_file()
        student, classmate = (load_file(tag.parent.parent / e / "model.safetensors") for e in ("student", "classmate"))
        exported = load_file(runs / f"{mode}-straight" / "student-hf" / "model.safetensors")
        for k in exported:
            torch.testing.assert_close(student[k], exported[k])
        assert student.keys() == classmate.keys() and not torch.equal(student["lm_head.weight"],
                                                                       classmate["lm_head.weight"])

    killed = kd_train(recipe, f"run_name={mode}-resumed", *extra, check=False, env={"KD_FAULT": "kill-during-save:6"})
    assert killed.returncode != 0
    kd_train(recipe, f"run_name={mode}-resumed", *extra, "resume=auto")
    resumed = metrics(runs / f"{mode}-resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "onpolicy_fraction") + (("misfeedback", "classmate_loss") if mode == "classkd" else ()):
        a, b = [r.get(key) for r in straight], [r.get(key) for r in resumed]
        assert [x is None for x in a] == [x is None for x in b], key
        assert [x for x in b if x is not None] == pytest.approx([x for x in a if x is not None], rel=1e-5), key
    if mode == "distillm":
        assert [r["phi"] for r in resumed] == [r["phi"] for r in straight]


def test_sequence_parallel_onpolicy_equals_one_rank(kd_setup):
    """SP=2 on 2 ranks and one rank: one data-parallel replica each, so the same prompts, the same
    sampling stream and the same samples; the scored batch is sharded after generation."""
    recipe, runs = kd_setup / "recipe.yaml", kd_setup / "runs"
    common = ["onpolicy.mode=always", "onpolicy.max_new_tokens=12", "train.steps=3", "data.eval=null",
              "model.attn_implementation=sdpa"]
    kd_train(recipe, "run_name=op-sp2", "parallel.sequence=2", *common)
    kd_train(recipe, "run_name=op-sp1", "parallel.nproc=1", *common)
    sp2, sp1 = metrics(runs / "op-sp2"), metrics(runs / "op-sp1")
    assert [r["sampled_len"] for r in sp2] == [r["sampled_len"] for r in sp1]
    assert [r["tokens"] for r in sp2] == [r["tokens"] for r in sp1]
    assert [r["loss"] for r in sp2] == pytest.approx([r["loss"] for r in sp1], rel=1e-4)


def test_onpolicy_inputs_fail_before_launch(kd_setup, tmp_path):
    recipe = kd_setup / "recipe.yaml"
    # a record without a prompt: nothing to sample from
    lines = (kd_setup / "data" / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "train.jsonl"
    record = json.loads(lines[0])
    record.update(prompt="")
    bad.write_text("\n".join(lines[:5] + [json.dumps(record)] + lines[5:]) + "\n")
    proc = kd_train(recipe, "onpolicy.mode=gkd", "onpolicy.max_new_tokens=12", f"data.train={bad}", check=False,
                    timeout=60)
    assert proc.returncode == 2 and "has no prompt" in proc.stderr and f"{bad}" in proc.stderr, proc.stderr[-2000:]
    assert "line 6" in proc.stderr or "record 6" in proc.stderr or ":6" in proc.stderr, proc.stderr[-2000:]

    proc = kd_train(recipe, "onpolicy.mode=gkd", "onpolicy.max_new_tokens=48", check=False, timeout=60)
    assert proc.returncode == 2 and "onpolicy.max_new_tokens=48" in proc.stderr and "data.max_len=48" in proc.stderr

    # a classmate with another vocabulary (an HF directory; a config.json takes the tokenizer's)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((kd_setup / "student.json").read_text())
    cfg.pop("model_type")
    LlamaForCausalLM(LlamaConfig(**{**cfg, "vocab_size": cfg["vocab_size"] + 64})).save_pretrained(tmp_path / "cm")
    proc = kd_train(recipe, "onpolicy.mode=gkd", "onpolicy.max_new_tokens=12", f"model.classmate={tmp_path / 'cm'}",
                    check=False, timeout=60)
    assert proc.returncode == 2 and "does not share the student's vocabulary" in proc.stderr, proc.stderr[-2000:]
