"""Sequence parallelism through the real trainer: ``parallel.sequence=2`` on 2 deepspeed CPU ranks
against ``parallel.sequence=1`` on 1 rank, same global batches: per-step losses, held-out metrics and
first-step gradients agree. The student and teacher have different head sizes (two Ulysses
geometries in one process); the packed case needs the mask rebuilt from the gathered positions."""
import json

import pytest
import torch

from .conftest import kd_train, metrics
from .launch import run_deepspeed

pytestmark = pytest.mark.dist


def train(kd_setup, tmp_path, name, nproc, *overrides):
    grads = tmp_path / f"{name}.pt"
    run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", f"output_dir={tmp_path}", f"run_name={name}",
                  f"parallel.sequence={nproc}", *overrides, nproc=nproc, timeout=400,
                  env={"KD_TEST_GRADS": str(grads)})
    run = tmp_path / name
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    return metrics(run), evals[-1], torch.load(grads)


@pytest.mark.parametrize("pack, checkpointing", [(False, False), (True, False), (True, True)],
                         ids=["padded", "packed", "packed-sp2-activation-checkpointing"])
def test_sp2_equals_sp1(kd_setup, tmp_path, pack, checkpointing):
    """With checkpointing, only the SP=2 run recomputes (attention all-to-alls included) in backward."""
    common = ["train.steps=3", "train.grad_accum=2", "train.eval_every=3", f"data.pack={str(pack).lower()}"]
    _compare(kd_setup, tmp_path, common, [f"model.activation_checkpointing={str(checkpointing).lower()}"])


def test_sp2_equals_sp1_with_replicated_kv_heads(kd_setup, tmp_path):
    """A student with one KV head: at SP=2 Ulysses replicates it on both ranks (the Gemma-2 2B / SP=8 case)."""
    spec = json.loads((kd_setup / "student.json").read_text())
    (tmp_path / "student-kv1.json").write_text(json.dumps(dict(spec, num_key_value_heads=1)))
    common = ["train.steps=3", f"model.student={tmp_path / 'student-kv1.json'}", "train.eval_every=3"]
    _compare(kd_setup, tmp_path, common, [])


def _compare(kd_setup, tmp_path, common, sp2_only):
    rows1, eval1, g1 = train(kd_setup, tmp_path, "sp1", 1, *common)
    rows2, eval2, g2 = train(kd_setup, tmp_path, "sp2", 2, *common, *sp2_only)

    assert [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows1, rows2):
        assert a["tokens"] == b["tokens"] and a["tokens_in"] == b["tokens_in"]
        for key in ("loss", "soft_target", "group_relative"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    for key in ("eval_student_nll", "eval_teacher_nll", "eval_forward_kl", "eval_top1_agreement"):
        assert eval2[key] == pytest.approx(eval1[key], rel=1e-5), key

    assert g1.keys() == g2.keys()
    scale = max(g.abs().max().item() for g in g1.values())
    assert scale > 1e-3, "gradients too small to compare"
    worst = max((g2[n] - g1[n]).abs().max().item() for n in g1)
    assert worst < 1e-4, worst


def test_sequence_parallel_settings_fail_before_launch(kd_setup, tmp_path):
    recipe = kd_setup / "recipe.yaml"
    out = kd_train(recipe, f"output_dir={tmp_path}", "parallel.nproc=3", "parallel.sequence=3", check=False)
    assert out.returncode == 2
    assert "parallel.sequence=3" in out.stderr and "num_attention_heads=4 is not divisible by 3" in out.stderr
    out = kd_train(recipe, f"output_dir={tmp_path}", "parallel.sequence=2", "model.attn_implementation=eager",
                   check=False)
    assert out.returncode == 2 and "model.attn_implementation=eager" in out.stderr
    out = kd_train(recipe, f"output_dir={tmp_path}", "parallel.nproc=3", "parallel.sequence=2", check=False)
    assert out.returncode == 2 and "multiple of parallel.sequence=2" in out.stderr
    out = kd_train(recipe, f"output_dir={tmp_path}", "parallel.nproc=null", "parallel.sequence=4", check=False)
    assert out.returncode == 2 and "parallel.sequence=4 does not divide the 2 ranks" in out.stderr   # CPU default
    assert not (tmp_path / "t").exists()      # nothing launched, nothing written
