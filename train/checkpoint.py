"""Save and resume everything that moves: engine weights, optimizer and LR schedule (DeepSpeed),
loader position and RNG (per rank), step counters. A checkpoint is complete or absent.

Layout under ``runs/<run>/checkpoints/``::

    step_00000040/     DeepSpeed files + trainer_state_rank{r}.pt + COMPLETE
    latest             the tag of the newest complete checkpoint, replaced atomically
    hf_meta/           config.json, generation_config.json, tokenizer files (for kd-convert)

``latest`` moves only after every rank has written its files and rank 0 has marked the directory
``COMPLETE``, so a run killed mid-save resumes from the previous checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if (p / COMPLETE).is_file())


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, rank_state: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if _rank() == 0 and tag_dir.exists():
        # an interrupted save of this step, or one from an abandoned longer run: never mix files
        (tag_dir / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
    buf = _serialize({**rank_state, "rng": rng_state()})
    _write_atomic(tag_dir / f"trainer_state_rank{_rank()}.pt", buf)
    if os.environ.get("KD_FAULT") == f"kill-during-save:{step}" and _rank() == 0:
        os.kill(os.getpid(), 9)   # fault injection for tests: die with files written, not yet COMPLETE
    _barrier()
    if _rank() == 0:
        _write_atomic(tag_dir / COMPLETE, b"")
        _write_atomic(ckpt_dir / "latest", tag.encode())
        tags = complete_tags(ckpt_dir)
        stale = [t for t in tags if _step_of(t) > step]          # a future this run abandoned
        older = [t for t in tags if _step_of(t) <= step]
        for old in stale + older[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()
    return tag


def _serialize(obj) -> bytes:
    import io
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def find(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``auto`` (newest complete checkpoint of this run, or None), ``none``,
    or a path to a checkpoints directory or one tag directory inside it."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (ckpt_dir / tag / COMPLETE).is_file():
                return ckpt_dir, tag
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1]) if tags else None
    p = Path(resume)
    if (p / COMPLETE).is_file():
        return p.parent, p.name
    if p.is_dir() and complete_tags(p):
        return find("auto", p)
    raise CheckpointError(
        f"resume={resume!r}: no complete checkpoint there (a complete one is a directory holding a "
        f"{COMPLETE} marker, e.g. {ckpt_dir / tag_for(100)}). Use resume=auto to continue this run "
        "from its newest checkpoint, or resume=none to start fresh.")


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict, dict]:
    """Restore the engine in place; returns (trainer_state, this rank's state) and restores RNG."""
    rank_file = ckpt_dir / tag / f"trainer_state_rank{_rank()}.pt"
    missing = torch.tensor(float(not rank_file.is_file()), device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(missing)    # every rank raises together, rank 0 included (it prints)
    if missing.item():
        raise CheckpointError(f"{ckpt_dir / tag} has no trainer state for some ranks: it was written by a "
                              "run with a different number of ranks; resume with the same parallel.nproc")
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client["trainer"], rank_state
