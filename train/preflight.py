"""What can be checked before any rank starts (kd-train's self-launch), or before any rank writes
(under an external launcher, every rank runs it; the ranks then agree on the ``Plan``).

Inputs: every path exists; every record of ``data.train`` / ``data.eval`` is readable and of a known
format (and, on-policy, has a prompt to sample from); each model directory's ``config.json`` matches
its weights; the vocabularies of tokenizer, student, teacher and classmate line up; the sequence-parallel split fits the ranks and the models. The run:
the checkpoint to resume from is complete and undamaged, and is not past ``train.steps``; an earlier
run in the run directory is never overwritten unless ``overwrite=true`` says so. What a resumed run
takes from its checkpoint, and which settings changed since, become ``Plan.notes`` for the log.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import checkpoint, data
from .config import ConfigError, Config, config_from_dict
from .models import PRESETS, model_config, resolve_attention

# Set by kd-train's self-launch for its ranks: the parent already ran the slow input checks.
CHECKED_ENV = "KD_TRAIN_CHECKED"


class ModelError(ValueError):
    """A model directory that cannot be used as the config says; the message names the file."""


@dataclass
class Plan:
    resume: tuple[Path, str] | None = None   # (checkpoints dir, tag)
    resume_world: int | None = None           # the world size that wrote it
    universal: bool = False                   # it loads through DeepSpeed's universal checkpoint
    replaces: bool = False                    # overwrite=true over an earlier run
    notes: list[str] = field(default_factory=list)


def check(cfg: Config, nproc: int) -> Plan:
    """Raise a user error (one paragraph) on the first problem; the plan of the run otherwise
    (``mode=cache-teacher``: an empty plan, once ``cache.out`` is known to take this cache)."""
    writing_cache = cfg.mode == "cache-teacher"
    if not os.environ.get(CHECKED_ENV):
        _paths(cfg)
        for key, limit in (("data.train", None), ("data.eval", cfg.data.eval_samples)):
            path = getattr(cfg.data, key.split(".")[1])
            if path and not (writing_cache and key == "data.eval"):       # a cache is of data.train only
                _records(path, limit, need_prompt=key == "data.train" and cfg.onpolicy.mode != "off")
        _models(cfg)
    _parallel(cfg, nproc)
    return Plan() if writing_cache else _run_plan(cfg, nproc)


def _paths(cfg: Config) -> None:
    paths = {"data.train": cfg.data.train, "data.eval": cfg.data.eval, "data.tokenizer": cfg.data.tokenizer,
             "model.student_init": cfg.model.student_init}
    paths.update({f"model.{k}": v for k, v in (("student", cfg.model.student), ("teacher", cfg.model.teacher),
                                                ("classmate", cfg.model.classmate)) if v not in PRESETS})
    if cfg.loss.method == "sft" and cfg.mode == "train":
        paths.pop("model.teacher", None)
    if cfg.teacher_cache is not None:
        paths.pop("model.teacher", None)
        if not cfg.teacher_cache.is_dir():
            raise FileNotFoundError(f"model.teacher={cfg.model.teacher}: no such directory (paths are relative to "
                                    f"{Path.cwd()}, where kd-train runs); write the cache first: kd-train RECIPE "
                                    f"mode=cache-teacher cache.out={cfg.teacher_cache}")
    for key, value in paths.items():
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{key}={value}: no such file or directory (paths are relative to "
                                    f"{Path.cwd()}, where kd-train runs)")


def _records(path: str, limit: int | None, need_prompt: bool = False) -> None:
    """Every record parses and has a known format (tokenisation happens in the ranks); with
    ``need_prompt`` (on-policy training samples from prompts) every record has a prompt."""
    n = 0
    for where, record in data.iter_records(path, limit):
        ex = data.to_example(record, None, where=where)
        if need_prompt and not ex.prompt.strip():
            raise data.DataError(
                f"{where}: this record has no prompt, and on-policy training (onpolicy.mode) replaces each response "
                "with the student's own continuation of its prompt. Give every record a prompt (prompt/response, "
                "chat with a user turn, ...), or train off-policy with onpolicy.mode=off.")
        n += 1
    if not n:
        raise data.DataError(f"{path}: the dataset is empty; point the config at a file with at least one record")


def _weights_match(key: str, spec: str, config) -> None:
    """An HF directory's safetensors headers against the shapes its config.json implies."""
    from tools.errors import ConvertError
    from tools.io import HFReader, expected_hf_shapes

    try:
        reader = HFReader(spec)
    except ConvertError:
        return                                   # *.bin weights: transformers reports what it finds
    expected = expected_hf_shapes(config)
    for name, shape in expected.items():
        if name in reader.files and tuple(reader.shape(name)) != shape:
            raise ModelError(f"{key}={spec}: {reader.files[name].name} holds {name} with shape "
                             f"{list(reader.shape(name))}, but {Path(spec) / 'config.json'} implies {list(shape)}. "
                             "The config does not describe these weights: use the config.json saved with them.")
    missing = [n for n in expected if n not in reader.files]
    if missing:
        raise ModelError(f"{key}={spec}: the weights lack {missing[0]}"
                         f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, which "
                         f"{Path(spec) / 'config.json'} ({config.model_type}) requires: a different architecture?")


def vocab_rows(key: str, spec: str, vocab: int) -> int:
    """Logit rows of a model spec: its config's vocab_size for a directory, else the tokenizer's."""
    if not Path(spec).is_dir():
        return vocab
    try:
        config = model_config(spec)
    except (OSError, ValueError, KeyError) as e:     # missing, not JSON, no or an unknown model_type
        raise ModelError(f"{key}={spec}: cannot read {Path(spec) / 'config.json'}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _weights_match(key, spec, config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.vocab_size


def _models(cfg: Config) -> None:
    from .tokenizer import load_tokenizer, tokenizers_match

    tok_key = "data.tokenizer" if cfg.data.tokenizer else "model.student"
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.student)
    data.uses_chat_template(tokenizer, cfg.data.chat_template)       # true without a template fails here
    vocab = tokenizer.vocab_size
    s_key = "model.student_init" if cfg.model.student_init else "model.student"
    s_rows = vocab_rows(s_key, cfg.model.student_init or cfg.model.student, vocab)
    if s_rows < vocab:
        raise ModelError(f"{s_key}: the student has {s_rows} vocabulary rows but the tokenizer ({tok_key}) makes "
                         f"ids up to {vocab - 1}. Use the student's own tokenizer, or resize the student "
                         "(kd-convert vocab-check --resize).")
    if cfg.model.classmate:
        c_rows = vocab_rows("model.classmate", cfg.model.classmate, vocab)
        classmate = Path(cfg.model.classmate)
        why = None
        if classmate.is_dir() and any(classmate.glob("tokenizer*")):
            ok, why = tokenizers_match(load_tokenizer(classmate), tokenizer)
            why = None if ok else why
        if why or c_rows != s_rows:
            raise ModelError(
                f"model.classmate={cfg.model.classmate} does not share the student's vocabulary ("
                + (f"its tokenizer differs: {why}" if why else f"{c_rows} vocabulary rows, the student {s_rows}")
                + "). The misfeedback term compares student and classmate token by token: use a classmate of the "
                "student's architecture and tokenizer (e.g. model.classmate=<the student's config or preset>).")
    if cfg.teacher_cache is not None and cfg.loss.method != "sft":
        from .cache import TeacherCache
        TeacherCache(cfg.teacher_cache).check(cfg, tokenizer, s_rows)
        return
    if cfg.loss.method == "sft" and cfg.mode == "train":
        return
    t_rows = vocab_rows("model.teacher", cfg.model.teacher, vocab)
    teacher = Path(cfg.model.teacher)
    if teacher.is_dir() and any(teacher.glob("tokenizer*")):
        ok, why = tokenizers_match(load_tokenizer(teacher), tokenizer)
        if not ok:
            raise ModelError(
                f"teacher tokenizer ({teacher}) and training tokenizer ({tok_key}={cfg.data.tokenizer or cfg.model.student}) "
                f"differ: {why}. Token-level distillation compares the two models position by position over one "
                "vocabulary; use the teacher's tokenizer for the student (data.tokenizer=...), or check with "
                "`kd-convert vocab-check`.")
    if t_rows < vocab:
        raise ModelError(f"model.teacher={cfg.model.teacher} has {t_rows} vocabulary rows but the tokenizer "
                         f"({tok_key}) makes ids up to {vocab - 1}: the teacher was trained with another vocabulary. "
                         "Distil with the teacher's own tokenizer (data.tokenizer=<teacher dir>).")
    if s_rows != t_rows and cfg.model.vocab_size is None:
        raise ModelError(f"the student has {s_rows} vocabulary rows and the teacher {t_rows}, for a tokenizer of "
                         f"{vocab} ids. If the extra rows are padding of the same tokenizer, set "
                         f"model.vocab_size={min(s_rows, t_rows)} to distil over the shared rows; check the "
                         "tokenizers with `kd-convert vocab-check TEACHER STUDENT`.")
    if cfg.mode == "cache-teacher":             # read-only: the ranks write nothing over another setup's cache
        from .cache import check_out, distill_vocab, fingerprint
        check_out(cfg.cache_out, fingerprint(cfg, tokenizer, distill_vocab(cfg, tokenizer)), cfg.cache.shard_items)


def _parallel(cfg: Config, nproc: int) -> None:
    sp = cfg.parallel.sequence
    if sp == 1:
        return
    from .parallel import check_model, check_world
    check_world(sp, nproc)
    models = {"student_init" if cfg.model.student_init else "student": cfg.model.student_init or cfg.model.student}
    if (cfg.loss.method != "sft" or cfg.mode == "cache-teacher") and cfg.teacher_cache is None:
        models["teacher"] = cfg.model.teacher
    if cfg.model.classmate:
        models["classmate"] = cfg.model.classmate
    for role, spec in models.items():
        conf = model_config(spec)
        check_model(conf, f"model.{role}={spec}", sp, resolve_attention(cfg.model.attn_implementation, conf))


# Settings a resumed run may change without meaning something else; every change is reported.
_NOT_SETTINGS = ("resume", "overwrite")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "params":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _run_plan(cfg: Config, nproc: int) -> Plan:
    plan, damaged = Plan(), []
    ckpt_dir = cfg.run_dir / "checkpoints"
    plan.resume = checkpoint.find(cfg.resume, ckpt_dir, warn=damaged.append)
    plan.notes += [f"WARNING: {w}" for w in damaged]
    checkpoint.check_fresh_start(cfg, plan.resume, damaged)
    own = checkpoint.continues(cfg, plan.resume)
    plan.replaces = cfg.overwrite and not own and bool(checkpoint.run_outputs(cfg.run_dir))
    if plan.resume is None:
        return plan
    tag_dir = Path(plan.resume[0]) / plan.resume[1]
    step = checkpoint.step_of(plan.resume[1])
    if step > cfg.train.steps:
        raise checkpoint.CheckpointError(
            f"the checkpoint to resume from, {tag_dir}, is at step {step}, past train.steps={cfg.train.steps}. Raise "
            f"train.steps above {step} to train further, or export that checkpoint with `kd-convert zero-to-hf "
            f"{tag_dir} OUT_DIR`.")
    plan.resume_world = (checkpoint.manifest(tag_dir) or {}).get("world_size") or checkpoint.world_size_of(tag_dir)
    held = checkpoint.engine_dirs(tag_dir)
    for name in ("student", "classmate") if cfg.model.classmate else ("student",):
        if name not in held:
            raise checkpoint.CheckpointError(
                f"the checkpoint to resume from, {tag_dir}, holds no {name} engine (it holds: "
                f"{', '.join(held) or 'none'}): it was written by a run without model.{name}. Resume it without "
                f"model.{name}, or start this run afresh (resume=none, a new run_name).")
    plan.notes.append(f"resuming from {tag_dir} (step {step}): weights, optimizer moments, data position, step "
                      "counters and RNG come from the checkpoint; every setting comes from this run's config")
    later = [t for t in checkpoint.complete_tags(ckpt_dir) if checkpoint.step_of(t) > step] if own else []
    if later:
        plan.notes.append(f"WARNING: this run goes back to step {step}: its later checkpoints ({', '.join(later)}) "
                          f"are replaced at the next save, and its metrics after step {step} are dropped")
    saved = _saved_config(tag_dir)
    if saved is not None:
        now, before = _flat(cfg.to_dict()), _flat(saved.to_dict())
        changed = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in now
                   if k not in _NOT_SETTINGS and before.get(k) != now[k]]
        if changed:
            plan.notes.append("changed since that checkpoint, in effect from now on: " + "; ".join(changed))
        if saved.parallel.zero_stage != cfg.parallel.zero_stage:
            raise checkpoint.CheckpointError(
                f"{tag_dir} was written with parallel.zero_stage={saved.parallel.zero_stage}; DeepSpeed cannot load "
                f"it at zero_stage={cfg.parallel.zero_stage}. Resume with parallel.zero_stage={saved.parallel.zero_stage}.")
    if plan.resume_world != nproc:
        plan.universal = cfg.parallel.zero_stage > 0
        how = ("the trained engines resume from DeepSpeed's universal checkpoint (made once, in a 'universal' folder "
               "beside each engine's files)" if plan.universal else
               "the trained engines load it as it is (ZeRO stage 0 keeps whole states)")
        if cfg.onpolicy.mode != "off":
            how += "; the replay buffer starts empty and the sampling streams restart from train.seed"
        plan.notes.append(f"the checkpoint was written by {plan.resume_world} ranks and this run has {nproc}: {how}, the "
                          "data continues from the same global sample, and per-rank random streams restart from train.seed")
    return plan


def _saved_config(tag_dir: Path) -> Config | None:
    path = tag_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text()), source=str(path))
    except ConfigError:
        return None
