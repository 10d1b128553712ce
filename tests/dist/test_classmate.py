"""Class KD on 2 real deepspeed CPU ranks (ZeRO-3): the classmate learns only from teacher supervision on
dataset responses, never on student samples (its own are never drawn at all). ``train_step`` is called
directly (tests/dist/classmate_worker.py) with forced per-micro-batch sources; one launch."""
import json

import pytest

from .launch import run_deepspeed

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def findings(kd_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("classmate") / "findings.json"
    run_deepspeed("tests/dist/classmate_worker.py", kd_setup / "recipe.yaml", out,
                  f"output_dir={out.parent}", "data.eval=null", f"model.classmate={kd_setup / 'student.json'}",
                  "onpolicy.mode=gkd", "onpolicy.fraction=0.5", "onpolicy.max_new_tokens=8",
                  "train.micro_batch=2", "train.grad_accum=2", timeout=400)
    result = json.loads(out.read_text())
    assert result["world"] == 2 and len(result["steps"]) == 4
    for row in result["steps"]:
        assert row["used"] == row["sources"]            # the forced decisions reached train_step
        assert row["stats"] is not None                 # no step was skipped
        assert row["steps"]["student"] == 1
        assert row["student_max_change"] > 0            # the student learns on every step
    return result["steps"]


def test_no_learning_on_student_samples(findings):
    """Every micro-batch a student sample, classmate_learns=True: the classmate is bit-identical and was
    not stepped; the student moved away from it (misfeedback logged)."""
    row = findings[0]
    assert row["classmate_identical"], row["classmate_max_change"]
    assert row["steps"]["classmate"] == 0
    stats = row["stats"]
    assert "classmate_loss" not in stats
    assert "misfeedback" in stats and "classmate_kl" in stats
    assert stats["classmate_kl"] > 0 and -1.0 <= stats["misfeedback"] < 0     # -min(KL, kappa=1)
    assert stats["onpolicy_fraction"] == 1.0 and stats["sampled_len"] > 0


def test_mixed_step_learns_on_the_dataset_micro_batch_only(findings):
    """[fresh, dataset] with classmate_learns=True: the classmate steps once, with the gradient of a plain
    forward KL(teacher || classmate) on the dataset micro-batch alone (nothing from the sampled one, nor
    left over from the previous step)."""
    row = findings[1]
    assert not row["classmate_identical"] and row["steps"]["classmate"] == 1
    assert "classmate_loss" in row["stats"] and row["stats"]["classmate_loss"] > 0
    assert "misfeedback" in row["stats"]
    assert row["grad_ref_norm"] > 0
    assert row["grad_rel_err"] < 1e-4, row
    # the check can tell: learning on the sampled micro-batch too would give another gradient
    assert row["grad_rel_err_if_all_batches"] > 1e-2, row


def test_not_its_step(findings):
    """Dataset micro-batches, classmate_learns=False: the classmate neither learns nor steps."""
    row = findings[2]
    assert row["classmate_identical"], row["classmate_max_change"]
    assert row["steps"]["classmate"] == 0
    assert "classmate_loss" not in row["stats"] and "misfeedback" not in row["stats"]


def test_dataset_step_is_a_forward_kl_step(findings):
    """Dataset micro-batches, classmate_learns=True: it learns, with the plain forward-KL gradient."""
    row = findings[3]
    assert not row["classmate_identical"] and row["steps"]["classmate"] == 1
    assert row["stats"]["classmate_loss"] > 0 and "misfeedback" not in row["stats"]
    assert row["grad_rel_err"] < 1e-4, row
