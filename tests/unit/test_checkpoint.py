"""Checkpoint bookkeeping without DeepSpeed: which checkpoint a run resumes from, what pruning keeps,
damaged files, refusing to start over an earlier run, and the atomic swap of the HF export."""
import json
import os

import pytest

from train import checkpoint as C
from train.config import load_config
from train.evaluate import replace_dir


def fake(ckpt_dir, step, complete=True, healthy=True, payload=b"x" * 10):
    d = ckpt_dir / C.tag_for(step)
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(payload)
    if complete:
        (d / C.COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "healthy": healthy,
                                                "files": {"weights.pt": len(payload)}}))
    return d


def test_prune_keeps_the_newest_healthy_checkpoint_through_a_streak_of_bad_steps(tmp_path):
    fake(tmp_path, 1)
    for step in (2, 3, 4):
        fake(tmp_path, step, healthy=False)
    C._prune(tmp_path, 4, keep=1)
    assert C.complete_tags(tmp_path) == [C.tag_for(1), C.tag_for(4)]
    fake(tmp_path, 5)
    C._prune(tmp_path, 5, keep=1)                   # a healthy one again: the old one may go
    assert C.complete_tags(tmp_path) == [C.tag_for(5)]


def test_prune_removes_interrupted_saves_and_an_abandoned_future(tmp_path):
    fake(tmp_path, 2)
    fake(tmp_path, 3, complete=False)               # a killed save of this run
    fake(tmp_path, 9)                               # this run resumed from step 2 and abandoned 9
    fake(tmp_path, 4)
    fake(tmp_path, 7, complete=False)               # killed in the abandoned future
    C._prune(tmp_path, 4, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.tag_for(2), C.tag_for(4)]


def test_auto_resume_skips_a_damaged_checkpoint_and_an_explicit_one_is_refused(tmp_path):
    fake(tmp_path, 3)
    newest = fake(tmp_path, 6)
    (tmp_path / "latest").write_text(C.tag_for(6))
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
