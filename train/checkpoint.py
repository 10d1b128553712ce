"""Save and resume everything that moves: engine weights and optimizer (DeepSpeed), loader position
and RNG (per rank), step counters and the run's settings. A checkpoint is complete or absent.

Layout under ``runs/<run>/checkpoints/``::

    step_00000040/     trainer_state_rank{r}.pt + config.yaml + COMPLETE, and per trained engine:
      student/           its DeepSpeed files (weights, optimizer); the trainer state rides in its client state
      classmate/         (class KD) the classmate's
    latest             the tag of the newest complete checkpoint, replaced atomically
    hf_meta/           config.json, generation_config.json, tokenizer files (for kd-convert)

Checkpoints written before engines had sub-directories (the student's DeepSpeed files directly in the
step directory) still load.

``COMPLETE`` is written by rank 0 after every rank has written its files; it holds a manifest (every
file's size and the world size), so a truncated file is found before DeepSpeed reads it. ``latest``
moves only after that, so a run killed mid-save resumes from the previous checkpoint. Pruning
(``train.keep_checkpoints``) never removes the newest *confirmed* checkpoint (one a finite step
followed: the weights of the checkpoint right before a NaN loss are those that produced it), and
removes the directories of interrupted saves.

Another world size: under ZeRO 1-3, DeepSpeed's universal checkpoint (``ds_to_universal``) is made
from each engine's directory once, into ``<tag>/<engine>/universal``, and the engine loads it (stage 0 keeps whole states and
loads as it is); the loader continues from the same global sample; per-rank RNG streams cannot be
mapped and restart from the seed.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kd.reduce import all_reduce_values

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"


class CheckpointError(RuntimeError):
    """A checkpoint problem; ``rank_local`` when only this rank saw it (every rank then prints it)."""

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _group():
    return dist.group.WORLD if dist.is_initialized() else None


def write_atomic(path: Path, data: bytes) -> None:
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


# ---------------------------------------------------------------------------------------------
# What is on disk

def manifest(tag_dir: Path) -> dict | None:
    """The COMPLETE marker's contents; None when the save was interrupted."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return None
    text = marker.read_text()
    return json.loads(text) if text.strip() else {"files": {}}


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


def damage(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (missing or another size than written)."""
    for name, size in (manifest(tag_dir) or {}).get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def world_size_of(tag_dir: Path) -> int:
    return len(list(tag_dir.glob("trainer_state_rank*.pt")))


def _previous(ckpt_dir: Path, tag: str) -> str | None:
    older = [t for t in complete_tags(ckpt_dir) if t < tag and damage(ckpt_dir / t) is None]
    return older[-1] if older else None


def find(resume: str, ckpt_dir: Path, warn=print) -> tuple[Path, str] | None:
    """Where to resume from: ``auto`` (the newest undamaged complete checkpoint of this run, or
    None), ``none``, or a path to a checkpoints directory or one tag directory inside it. A damaged
    checkpoint is skipped by ``auto`` (``warn`` says so) and refused when named explicitly."""
    if resume == "none":
        return None
    if resume == "auto":
        # the newest complete one, whatever 'latest' says (a run killed between writing COMPLETE and
        # moving 'latest' has a newer complete checkpoint than 'latest' names)
        for tag in reversed(complete_tags(ckpt_dir)):
            why = damage(ckpt_dir / tag)
            if why is None:
                return ckpt_dir, tag
            warn(f"checkpoint {ckpt_dir / tag} is damaged ({why}); trying the one before it")
        return None
    p = Path(resume)
    if p.is_dir() and not (p / COMPLETE).is_file() and complete_tags(p):
        found = find("auto", p, warn)
        if found:
            return found
    if (p / COMPLETE).is_file():
        why = damage(p)
        if why is None:
            return p.parent, p.name
        prev = _previous(p.parent, p.name)
        raise CheckpointError(
            f"resume={resume}: this checkpoint is damaged ({why}). "
            + (f"Resume from the previous complete one instead: resume={p.parent / prev}." if prev else
               "There is no earlier complete checkpoint beside it; start afresh with resume=none and a new run_name."))
    raise CheckpointError(
        f"resume={resume!r}: no complete checkpoint there (a complete one is a directory holding a "
        f"{COMPLETE} marker, e.g. {ckpt_dir / tag_for(100)}). Use resume=auto to continue this run "
        "from its newest checkpoint, or resume=none to start fresh.")


def run_outputs(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` that a fresh run would overwrite."""
    names = ["checkpoints", "metrics.jsonl", "student-hf"]
    return [n for n in names if (run_dir / n).exists() and not (n == "checkpoints" and not _has_steps(run_dir / n))]


def _has_steps(ckpt_dir: Path) -> bool:
    return any(p.name.startswith("step_") for p in ckpt_dir.iterdir())


def continues(cfg, found) -> bool:
    """Whether ``found`` (from ``find``) is a checkpoint of this run's own directory."""
    return found is not None and Path(found[0]).resolve() == (cfg.run_dir / "checkpoints").resolve()


def check_fresh_start(cfg, found, warnings: list[str] = ()) -> None:
    """A run that does not continue from its own checkpoints must not write over an earlier run's
    outputs: refuse, naming the ways forward. ``overwrite=true`` moves the earlier run aside (rank
    0 only; nothing is deleted). ``warnings``: why ``resume=auto`` found no checkpoint to use."""
    outputs = run_outputs(cfg.run_dir)
    if continues(cfg, found) or not outputs or cfg.overwrite:
        return
    if cfg.resume == "auto":
        why = " ".join(warnings) or "none was complete (the run stopped before its first save)"
        raise CheckpointError(
            f"resume=auto found no checkpoint to continue {cfg.run_dir} from: {why}. Its outputs "
            f"({', '.join(outputs)}) would be overwritten. Start afresh with overwrite=true (the earlier run is "
            "moved aside to a sibling directory, not deleted), or pick another run_name=....")
    raise CheckpointError(
        f"{cfg.run_dir} already holds an earlier run ({', '.join(outputs)}), and this run would overwrite its "
        "metrics and prune its checkpoints. Continue it with resume=auto, pick another run_name=..., or pass "
        "overwrite=true to start afresh (the earlier run is then moved aside to a sibling directory, not deleted).")


def move_aside(run_dir: Path) -> Path:
    """``overwrite=true``: the earlier run's directory goes to ``<run_dir>.replaced-N`` (rank 0)."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.replaced-{n}").exists():
        n += 1
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{n}")
    os.replace(run_dir, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Saving

def _where(path: Path) -> str:
    """``the filesystem at MOUNT (DEVICE)`` holding ``path``, for messages about space."""
    path = path.resolve()
    best = ("/", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount = line.split()[:2]
            if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[0]):
                best = (mount, device)
    except OSError:
        pass
    return f"{best[1]} (mounted at {best[0]})"


def _check_space(ckpt_dir: Path, need: int, device) -> None:
    """Collective: refuse to start a save that cannot fit on any rank's filesystem."""
    free = shutil.disk_usage(ckpt_dir).free
    short, = all_reduce_values([float(max(0, need - free))], _group(), "max", device)
    if short > 0:
        raise CheckpointError(
            f"no space left on {_where(ckpt_dir)} at {ckpt_dir}: the next checkpoint needs about "
            f"{need / 1e6:,.0f} MB and {free / 1e6:,.0f} MB are free (on the fullest rank {short / 1e6:,.0f} MB are "
            "missing). Nothing was written: the previous checkpoint and 'latest' are intact. Free space, lower "
            "train.keep_checkpoints, or resume with output_dir on a larger filesystem.")


def save(engines: dict, ckpt_dir: Path, step: int, trainer_state: dict, rank_state: dict, keep: int,
         config_yaml: str, last_finite: int) -> str:
    """Collective: every rank calls it. ``engines``: name -> DeepSpeed engine, the first the student
    (its client state holds ``trainer_state``). Returns the tag written. ``last_finite``: the newest
    step whose loss was finite (pruning keeps the newest checkpoint before it)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = complete_tags(ckpt_dir)
    # the previous checkpoint's size, or for the first one fp32 weights + Adam's two moments + a
    # 16-bit copy of every parameter (ranks write their shares to one shared filesystem)
    need = sum((manifest(ckpt_dir / previous[-1]) or {}).get("files", {}).values()) if previous else 16 * sum(
        getattr(p, "ds_numel", p.numel()) for e in engines.values() for p in e.module.parameters())
    device = next(iter(engines.values())).device
    _check_space(ckpt_dir, int(need * 1.05), device)
    if _rank() == 0 and tag_dir.exists():
        # an interrupted save of this step, or one from an abandoned longer run: never mix files
        (tag_dir / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    _barrier()
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, engine) in enumerate(engines.items()):
            engine.save_checkpoint(str(tag_dir), tag=name, client_state={"trainer": trainer_state} if i == 0 else {},
                                   save_latest=False)
        write_atomic(tag_dir / f"trainer_state_rank{_rank()}.pt", _serialize({**rank_state, "rng": rng_state()}))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"saving checkpoint {tag_dir} failed on rank {_rank()}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            f"{shutil.disk_usage(ckpt_dir).free / 1e6:,.0f} MB are free on {_where(ckpt_dir)}. The previous checkpoint "
            f"and 'latest' are intact ({ckpt_dir / 'latest'}); {tag_dir} is incomplete and is never resumed from.",
            rank_local=True) from None
    if os.environ.get("KD_FAULT") == f"kill-during-save:{step}" and _rank() == 0:
        os.kill(os.getpid(), 9)   # fault injection for tests: die with files written, not yet COMPLETE
    _barrier()
    if _rank() == 0:
        (tag_dir / "config.yaml").write_text(config_yaml)
        files = {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*")) if f.is_file()}
        info = {"step": step, "world_size": _world(), "files": files}
        write_atomic(tag_dir / COMPLETE, json.dumps(info, indent=1).encode())
        write_atomic(ckpt_dir / "latest", tag.encode())
        _prune(ckpt_dir, step, keep, last_finite)
    _barrier()
    return tag


def confirmed(ckpt_dir: Path, last_finite: int) -> str | None:
    """The newest complete checkpoint a finite step followed (its step is before ``last_finite``)."""
    good = [t for t in complete_tags(ckpt_dir) if step_of(t) < last_finite]
    return good[-1] if good else None


def _prune(ckpt_dir: Path, step: int, keep: int, last_finite: int) -> None:
    """Rank 0, after ``step`` was saved: drop complete checkpoints beyond the newest ``keep`` (never
    the newest confirmed one), those of an abandoned future (steps past ``step``: this run resumed
    from an earlier one), and interrupted saves (saves are collective and in order: none is in
    progress)."""
    tags = complete_tags(ckpt_dir)
    older = [t for t in tags if step_of(t) <= step]
    kept = set(older[-keep:]) | {confirmed(ckpt_dir, last_finite)}
    doomed = [t for t in tags if step_of(t) > step or t not in kept]
    doomed += [p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_") and p.is_dir() and p.name not in tags]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _serialize(obj) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


# ---------------------------------------------------------------------------------------------
# Loading

def engine_dirs(tag_dir: Path) -> dict[str, Path]:
    """Each engine's DeepSpeed directory in a checkpoint: its sub-directory, or (checkpoints written
    before sub-directories) the step directory itself for the student."""
    subs = {p.name: p for p in sorted(tag_dir.iterdir())
            if p.is_dir() and p.name != UNIVERSAL and any(p.glob("*model_states.pt"))}
    if not subs and any(tag_dir.glob("*model_states.pt")):
        subs = {"student": tag_dir}
    return subs


def _engine_dir(tag_dir: Path, name: str) -> Path:
    found = engine_dirs(tag_dir)
    if name not in found:
        raise CheckpointError(
            f"checkpoint {tag_dir} holds no {name} engine (it holds: {', '.join(found) or 'none'}). A run with a "
            f"{name} resumes only from checkpoints of a run that had one; start this run with resume=none.")
    return found[name]


def make_universal(ckpt_dir: Path, tag: str) -> None:
    """DeepSpeed's universal form of every engine of ``tag``, in ``<engine dir>/universal``, made once
    with DeepSpeed's own converter (one process: kd-train's self-launch parent, or rank 0 under another
    launcher). A failure leaves a FAILED file holding the reason for the waiting ranks."""
    for name, src in engine_dirs(ckpt_dir / tag).items():
        out = src / UNIVERSAL
        if (out / COMPLETE).is_file():
            continue
        shutil.rmtree(out, ignore_errors=True)
        workers = str(max(1, min(8, os.cpu_count() or 1)))
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(src), "--output_folder", str(out), "--num_extract_workers", workers,
                               "--num_merge_workers", workers], capture_output=True, text=True)
        if proc.returncode != 0:
            why = (f"DeepSpeed could not convert the {name} engine of {ckpt_dir / tag} to a universal checkpoint for "
                   f"another world size:\n{proc.stderr[-2000:]}\nResume with the number of ranks that wrote it "
                   f"({world_size_of(ckpt_dir / tag)}).")
            out.mkdir(parents=True, exist_ok=True)
            (out / "FAILED").write_text(why)
            raise CheckpointError(why)
        write_atomic(out / COMPLETE, b"")


def wait_universal(ckpt_dir: Path, tag: str, poll_s: float = 5.0) -> None:
    """In the ranks: rank 0 makes the universal checkpoints where the self-launch has not; the other
    ranks wait for their markers on the filesystem (a conversion can outlast a collective's timeout)."""
    if _rank() == 0:
        make_universal(ckpt_dir, tag)
        return
    for src in engine_dirs(ckpt_dir / tag).values():
        while not (src / UNIVERSAL / COMPLETE).is_file():
            if (src / UNIVERSAL / "FAILED").is_file():
                raise CheckpointError((src / UNIVERSAL / "FAILED").read_text())
            time.sleep(poll_s)


def load(engines: dict, ckpt_dir: Path, tag: str, universal: bool, same_world: bool) -> tuple[dict, dict | None]:
    """Restore every engine (name -> DeepSpeed engine, the student first) in place; returns
    (trainer_state, this rank's state, None at another world size) and restores this rank's RNG where
    it has one."""
    tag_dir = ckpt_dir / tag
    if universal:
        wait_universal(ckpt_dir, tag)
    sources = {name: _engine_dir(tag_dir, name) for name in engines}
    try:
        clients = []
        for name, engine in engines.items():
            src = sources[name]
            load_dir, load_tag = (src, UNIVERSAL) if universal else (src.parent, src.name)
            _, client = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
            clients.append(client)
        rank_state = torch.load(tag_dir / f"trainer_state_rank{_rank()}.pt", weights_only=False) if same_world else None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        prev = _previous(ckpt_dir, tag)
        raise CheckpointError(
            f"rank {_rank()} cannot read checkpoint {tag_dir} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). "
            + (f"Resume from the previous complete checkpoint with resume={ckpt_dir / prev}." if prev else
               "There is no earlier complete checkpoint; start afresh with a new run_name."), rank_local=True) from None
    if any(c is None for c in clients):
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {tag_dir}", rank_local=True)
    if rank_state is not None:
        set_rng_state(rank_state.pop("rng"))
    return clients[0]["trainer"], rank_state
