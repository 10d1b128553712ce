"""Checkpoint bookkeeping without DeepSpeed: which checkpoint a run resumes from, what pruning keeps,
damaged files, refusing to start over an earlier run, and the atomic swap of the HF export."""
import json
import os

import pytest

from train import checkpoint as C
from train.config import load_config
from train.evaluate import replace_dir


def fake(ckpt_dir, step, complete=True, payload=b"x" * 10):
    d = ckpt_dir / C.tag_for(step)
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(payload)
    if complete:
        (d / C.COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "files": {"weights.pt": len(payload)}}))
    return d


def test_prune_keeps_the_newest_checkpoint_a_finite_step_followed(tmp_path):
    """Steps 1-3 finite, then NaN: the checkpoint of step 3 holds the update the NaN came from; the
    one of step 2 is the newest a finite step (3) followed, and survives keep_checkpoints=1."""
    for step in (1, 2, 3, 4, 5):
        fake(tmp_path, step)
        C._prune(tmp_path, step, keep=1, last_finite=min(step, 3))
    assert C.complete_tags(tmp_path) == [C.tag_for(2), C.tag_for(5)]
    assert C.confirmed(tmp_path, 3) == C.tag_for(2)
    fake(tmp_path, 6)
    C._prune(tmp_path, 6, keep=1, last_finite=6)     # finite again: step 5 is confirmed, step 2 may go
    assert C.complete_tags(tmp_path) == [C.tag_for(5), C.tag_for(6)]


def test_prune_removes_interrupted_saves_and_an_abandoned_future(tmp_path):
    fake(tmp_path, 2)
    fake(tmp_path, 3, complete=False)               # a killed save of this run
    fake(tmp_path, 9)                               # this run resumed from step 2 and abandoned 9
    fake(tmp_path, 4)
    fake(tmp_path, 7, complete=False)               # killed in the abandoned future
    C._prune(tmp_path, 4, keep=2, last_finite=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.tag_for(2), C.tag_for(4)]


def test_auto_resume_skips_a_damaged_checkpoint_and_an_explicit_one_is_refused(tmp_path):
    fake(tmp_path, 3)
    newest = fake(tmp_path, 6)
    (tmp_path / "latest").write_text(C.tag_for(3))       # killed between COMPLETE and 'latest'
    assert C.find("auto", tmp_path) == (tmp_path, C.tag_for(6))
    (newest / "weights.pt").write_bytes(b"x" * 4)                  # truncated
    warnings = []
    assert C.find("auto", tmp_path, warn=warnings.append) == (tmp_path, C.tag_for(3))
    assert "weights.pt has 4 bytes, 10 were written" in warnings[0]
    with pytest.raises(C.CheckpointError, match=f"damaged.*resume={tmp_path / C.tag_for(3)}"):
        C.find(str(newest), tmp_path)
    (newest / "weights.pt").unlink()
    with pytest.raises(C.CheckpointError, match="weights.pt is missing"):
        C.find(str(newest), tmp_path)


def test_a_run_directory_with_outputs_is_refused_unless_continued_or_overwritten(tmp_path):
    cfg = load_config(None, ["model.student=demo-student", "loss.method=sft", "data.train=x.jsonl",
                             f"output_dir={tmp_path}", "run_name=r"])
    C.check_fresh_start(cfg, None)                                   # nothing there yet
    fake(tmp_path / "r" / "checkpoints", 2)
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(C.CheckpointError) as e:
        C.check_fresh_start(cfg, None)
    assert all(s in str(e.value) for s in ("resume=auto", "run_name=", "overwrite=true", "metrics.jsonl"))
    C.check_fresh_start(cfg, (tmp_path / "r" / "checkpoints", C.tag_for(2)))   # continuing it is fine
    auto = load_config(None, ["model.student=demo-student", "loss.method=sft", "data.train=x.jsonl",
                              f"output_dir={tmp_path}", "run_name=r", "resume=auto"])
    with pytest.raises(C.CheckpointError, match="resume=auto found no checkpoint to continue .* step_00000002 is "
                                                "damaged.*overwrite=true"):
        C.check_fresh_start(auto, None, ["checkpoint step_00000002 is damaged"])
    other = load_config(None, ["model.student=demo-student", "loss.method=sft", "data.train=x.jsonl",
                               f"output_dir={tmp_path}", "run_name=r", "overwrite=true"])
    C.check_fresh_start(other, None)
    moved = C.move_aside(tmp_path / "r")
    assert moved.name == "r.replaced-1" and (moved / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "r").exists()


def test_replace_dir_swaps_in_one_rename(tmp_path, monkeypatch):
    target, new = tmp_path / "student-hf", tmp_path / ".new"
    for d, text in ((target, "old"), (new, "new")):
        d.mkdir()
        (d / "model.safetensors").write_text(text)
    renames = []
    monkeypatch.setattr(os, "replace", lambda *a: renames.append(a))   # the fallback's two renames
    replace_dir(new, target)
    assert renames == [] and (target / "model.safetensors").read_text() == "new" and not new.exists()


def test_a_failed_write_names_the_rank_the_space_and_what_is_kept(tmp_path, monkeypatch):
    """A write that fails after the space check (another job filled the disk): one paragraph that
    every rank seeing it prints, the previous checkpoint and 'latest' untouched."""
    import errno

    import torch

    class Engine:
        device = "cpu"
        module = torch.nn.Linear(2, 2)

        def save_checkpoint(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    fake(tmp_path, 1)
    (tmp_path / "latest").write_text(C.tag_for(1))
    with pytest.raises(C.CheckpointError) as e:
        C.save({"student": Engine()}, tmp_path, 2, {}, {}, keep=1, config_yaml="", last_finite=2)
    assert e.value.rank_local and "failed on rank 0: [Errno 28] No space left on device" in str(e.value)
    assert "MB are free on" in str(e.value) and "'latest' are intact" in str(e.value)
    assert (tmp_path / "latest").read_text() == C.tag_for(1) and C.complete_tags(tmp_path) == [C.tag_for(1)]


def test_engine_dirs_new_layout_legacy_layout_and_a_missing_engine(tmp_path):
    """Each trained engine in its own folder; a checkpoint written before folders holds the student's
    files in the step directory itself (it still loads); the universal folder is not an engine."""
    new = fake(tmp_path / "new", 3)
    for name in ("student", "classmate"):
        (new / name).mkdir()
        (new / name / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (new / "student" / C.UNIVERSAL).mkdir()
    assert C.engine_dirs(new) == {"classmate": new / "classmate", "student": new / "student"}
    old = fake(tmp_path / "old", 3)
    (old / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (old / C.UNIVERSAL).mkdir()
    (old / C.UNIVERSAL / "mp_rank_00_model_states.pt").write_bytes(b"m")
    assert C.engine_dirs(old) == {"student": old}
    with pytest.raises(C.CheckpointError, match="holds no classmate engine .*it holds: student"):
        C._engine_dir(old, "classmate")
