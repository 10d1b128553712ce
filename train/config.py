"""The typed run configuration of ``kd-train RECIPE.yaml [key=value ...]``.

A run is a tree of dataclasses (``Config`` with sections ``model``, ``train``, ``loss``, ``data``,
``parallel``) filled from three layers, later ones winning: the defaults below, the recipe YAML,
and dotted ``key=value`` overrides from the command line (``train.steps=8``, ``loss.params.k=16``,
``data.pack=true``, ``train.betas=[0.9,0.99]``, ``run_name=x``). Override values are parsed with
``yaml.safe_load``; a string field takes the override text as written, so ``run_name=2024`` is the
string ``"2024"``.

Every key except the free-form ``loss.params`` is checked: unknown keys get a "did you mean"
suggestion, values are type checked (ints must be integers, numbers accept ints and ``1e-5``-style
strings because YAML 1.1 reads ``1e-5`` as a string, bools must be true/false, optional fields take
null/none), enum-like fields and ranges are checked, and ``loss.params`` is handed to
``kd.build_objective`` once so a typo fails here rather than on 8 GPUs. Every problem is a
``ConfigError`` naming where the value came from.

Paths (data files, model directories, ds_config overrides, ``resume``) are kept exactly as written
and are relative to the directory kd-train runs in, not to the recipe file; existence is checked by
whoever opens them.

The DeepSpeed config of each engine is made from a Config next to the engine builders
(``train.engines.ds_config``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from kd import METHODS, build_objective

__all__ = ["ConfigError", "Config", "ModelConfig", "TrainConfig", "LossConfig", "DataConfig",
           "ParallelConfig", "OnPolicyConfig", "ClassmateConfig", "CacheConfig", "CACHE_PREFIX", "load_config", "config_from_dict", "dump_yaml",
           "resolve_dtype", "torch_dtype"]

_DEFAULT = "the defaults"                        # source of a value nobody set


class ConfigError(ValueError):
    """A bad run configuration; the message names the source, the key, the value and the fix."""


def _opt(default: Any = dataclasses.MISSING, *, factory: Any = None, **checks: Any) -> Any:
    """A dataclass field whose metadata carries its checks: ``choices`` (with ``aliases``),
    ``words`` (case-insensitive keywords of a free string), bounds ``gt``/``ge``/``lt``/``le``, and
    ``expect`` (what error messages say is expected)."""
    if factory is not None:
        return field(default_factory=factory, metadata=checks)
    return field(default=default, metadata=checks)


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  "float": "fp32"}


@dataclass(kw_only=True)
class ModelConfig:
    # HF model dir, a preset name of train.models.PRESETS (demo-student, demo-student-wide, demo-teacher) or a
    # config.json path (random init)
    student: str
    teacher: str | None = None                  # same forms; None only for loss.method == "sft"
    student_init: str | None = None             # HF dir / checkpoint to initialise the student from
    classmate: str | None = None                # class KD: same forms; the student's vocabulary (classmate.*)
    attn_implementation: str = _opt("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    dtype: str = _opt("auto", choices=("auto", "bf16", "fp16", "fp32"), aliases=_DTYPE_ALIASES)
    activation_checkpointing: bool = False
    vocab_size: int | None = _opt(None, gt=0)   # distill over the first N logits (padding rows)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = _opt(100, gt=0)
    seed: int = _opt(0, ge=0)
    micro_batch: int = _opt(8, gt=0)
    grad_accum: int = _opt(1, gt=0)
    lr: float = _opt(3e-4, gt=0)
    warmup_steps: int = _opt(10, ge=0)
    min_lr_ratio: float = _opt(0.1, ge=0, le=1)   # cosine decays to lr * min_lr_ratio
    weight_decay: float = _opt(0.0, ge=0)
    grad_clip: float = _opt(1.0, ge=0)            # 0 disables clipping
    betas: tuple[float, float] = _opt((0.9, 0.95), ge=0, lt=1)
    log_every: int = _opt(1, gt=0)
    eval_every: int = _opt(0, ge=0)               # 0 = only at the end
    save_every: int = _opt(0, ge=0)               # 0 = only at the end
    keep_checkpoints: int = _opt(2, gt=0)
    max_bad_steps: int = _opt(10, ge=0)           # NaN/inf loss steps skipped before stopping


@dataclass(kw_only=True)
class LossConfig:
    method: str = _opt("grkd", choices=METHODS)
    temperature: float = _opt(1.0, gt=0)
    ce_weight: float = _opt(0.0, ge=0)
    chunk_size: int = _opt(1024, gt=0)            # tokens per chunk of the fused loss head
    metrics_k: int = _opt(5, gt=0)
    params: dict = _opt(factory=dict)             # method-specific settings for kd.build_objective

    def objective_kwargs(self) -> dict:
        """Keyword arguments of ``kd.build_objective(method, progress, **kwargs)``."""
        return {"temperature": self.temperature, "ce_weight": self.ce_weight,
                **copy.deepcopy(self.params)}


@dataclass(kw_only=True)
class DataConfig:
    train: str                                    # JSONL path, relative to where kd-train runs
    eval: str | None = None
    tokenizer: str | None = None                  # None: the student's tokenizer
    max_len: int = _opt(512, ge=8)
    pack: bool = False
    eval_samples: int = _opt(200, ge=0)
    max_new_tokens: int = _opt(32, ge=0)
    # render every record through the tokenizer's chat template: auto = when the tokenizer has one
    chat_template: str = _opt("auto", choices=("auto", "true", "false"))


@dataclass(kw_only=True)
class OnPolicyConfig:
    # off | gkd (a fraction lambda of micro-batches on student samples) | distillm (adaptive
    # off-policy: replay buffer, threshold phi driven by the validation loss) | always
    mode: str = _opt("off", choices=("off", "gkd", "distillm", "always"))
    # gkd: the probability that a micro-batch's responses are the student's own samples
    # (lambda_on in methods.md: a key of its own, not loss.params.lambda_* of GRKD)
    fraction: float = _opt(0.5, ge=0, le=1)
    temperature: float = _opt(1.0, gt=0)          # sampling temperature
    top_p: float = _opt(1.0, gt=0, le=1)
    max_new_tokens: int = _opt(64, gt=0)          # per sample; prompt + sample is cut at data.max_len
    # generation under ZeRO-3: gathered (every parameter gathered once per generate call) or
    # layerwise (ZeRO-3's own per-layer gathers, every token: slow, for models that do not fit whole)
    generation: str = _opt("gathered", choices=("gathered", "layerwise"))
    # distillm (DistiLLM's finetune.py defaults)
    buffer_size: int = _opt(1000, gt=0)           # replay buffer capacity, in samples per data-parallel rank
    init_threshold: float = _opt(0.0, ge=0, le=1)
    loss_eps: float = _opt(0.1, ge=0)
    threshold_step: float = _opt(0.1, gt=0, le=1)
    # fresh samples below phi * (1 - progress) | phi * progress | phi / 2; replayed up to phi
    replay_ratio: str = _opt("decreasing", choices=("decreasing", "increasing", "constant"))
    # the held-out loss that drives phi: the student's NLL (DistiLLM's finetune.py), or KL(teacher || student)
    val_metric: str = _opt("eval_student_nll", choices=("eval_student_nll", "eval_forward_kl"))


@dataclass(kw_only=True)
class ClassmateConfig:
    lr_scale: float = _opt(0.5, gt=0)             # the classmate's LR = train.lr * lr_scale (same schedule)
    update_every: int = _opt(2, gt=0)             # it steps every N student steps: it stays weaker
    misfeedback_weight: float = _opt(0.1, ge=0)   # w_mis
    kappa: float = _opt(1.0, gt=0)                # cap of KL(q || c) in the misfeedback term, nats


@dataclass(kw_only=True)
class ParallelConfig:
    nproc: int | None = _opt(None, gt=0)          # None: 2 on CPU, all GPUs otherwise
    sequence: int = _opt(1, ge=1)                 # sequence-parallel degree
    zero_stage: int = _opt(3, choices=(0, 1, 2, 3))   # the student's; the teacher is always ZeRO-3
    offload_teacher: bool = False
    offload_optimizer: bool = False
    ds_config_student: str | None = None          # JSON replacing ds_configs/zero3_student*.json
    ds_config_teacher: str | None = None


@dataclass(kw_only=True)
class CacheConfig:
    # mode=cache-teacher: the teacher's top-k over data.train, written here (None: <output_dir>/<run_name>-teacher-cache,
    # beside the run: overwrite=true on a run never moves the cache it trains from);
    # a run trains from it with model.teacher=cache:<dir> (train/cache/)
    out: str | None = None
    k: int = _opt(64, gt=0)                       # top-k ids and logits kept per counted token
    dtype: str = _opt("fp16", choices=("fp16", "bf16", "fp32"), aliases=_DTYPE_ALIASES)   # of the logits
    # dataset items (examples, or packed rows) per shard file; None: about 2^20 counted tokens per shard
    shard_items: int | None = _opt(None, gt=0)


CACHE_PREFIX = "cache:"                           # model.teacher=cache:DIR


@dataclass(kw_only=True)
class Config:
    run_name: str = "run"                         # the run lives in <output_dir>/<run_name>/
    # train, or cache-teacher: run the teacher once over data.train and write its top-k (cache.*)
    mode: str = _opt("train", choices=("train", "cache-teacher"))
    output_dir: str = "runs"
    resume: str = _opt("none", words=("auto", "none"), expect="'auto', 'none' or a checkpoint path")
    overwrite: bool = False                       # start afresh where a run already wrote outputs
    model: ModelConfig
    train: TrainConfig = _opt(factory=TrainConfig)
    loss: LossConfig = _opt(factory=LossConfig)
    data: DataConfig
    parallel: ParallelConfig = _opt(factory=ParallelConfig)
    onpolicy: OnPolicyConfig = _opt(factory=OnPolicyConfig)
    classmate: ClassmateConfig = _opt(factory=ClassmateConfig)
    cache: CacheConfig = _opt(factory=CacheConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def teacher_cache(self) -> Path | None:
        """The cache a run trains from (``model.teacher=cache:DIR``), else None."""
        t = self.model.teacher
        return Path(t[len(CACHE_PREFIX):]) if t and t.startswith(CACHE_PREFIX) else None

    @property
    def cache_out(self) -> Path:
        """Where ``mode=cache-teacher`` writes."""
        return Path(self.cache.out) if self.cache.out else Path(self.output_dir) / f"{self.run_name}-teacher-cache"

    def to_dict(self) -> dict:
        """Plain nested dict (lists, not tuples) that YAML can dump and ``config_from_dict`` reads."""
        return _plain(dataclasses.asdict(self))

    def validate(self) -> Config:
        """Check a Config built or edited in code as strictly as a loaded one; returns a clean copy."""
        return config_from_dict(self.to_dict(), source="Config object")


# ---------------------------------------------------------------------------------------------
# Schema: every dotted key, its type and its checks, derived from the dataclasses above.

_SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "loss": LossConfig,
                              "data": DataConfig, "parallel": ParallelConfig, "onpolicy": OnPolicyConfig,
                              "classmate": ClassmateConfig, "cache": CacheConfig}
_FREE_FORM = "loss.params"
_REQUIRED = ("model.student", "data.train")


def _schema() -> dict[str, tuple[Any, dict]]:
    leaves: dict[str, tuple[Any, dict]] = {}
    for prefix, cls in [("", Config)] + [(f"{s}.", c) for s, c in _SECTIONS.items()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in _SECTIONS or cls is not Config:
                leaves[prefix + f.name] = (hints[f.name], dict(f.metadata))
    return leaves


_LEAVES = _schema()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], True
    return tp, False


def _expectation(tp: Any, checks: dict) -> str:
    base, optional = _unwrap_optional(tp)
    if "expect" in checks:
        text = checks["expect"]
    elif "choices" in checks:
        text = "one of " + ", ".join(repr(c) for c in checks["choices"])
    elif base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer"
    elif base is float:
        text = "a number"
    elif base is str:
        text = "a non-empty string"
    elif typing.get_origin(base) is tuple:
        text = f"a list of {len(typing.get_args(base))} numbers"
    else:
        text = "a mapping of settings"
    bounds = [f"{op} {checks[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
              if k in checks]
    if bounds:
        text += (" each" if typing.get_origin(base) is tuple else "") + " " + " and ".join(bounds)
    return text + (", or null" if optional else "")


def _bad_value(key: str, value: Any, where: str, tp: Any, checks: dict, hint: str = "") -> ConfigError:
    kind = "null" if value is None else type(value).__name__
    return ConfigError(f"Invalid configuration in {where}: {key} expects {_expectation(tp, checks)}, "
                       f"got {value!r} ({kind}).{hint}")


_NULLS = ("", "none", "null")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Type check ``value`` for the leaf ``key`` and apply its checks; the value to store."""
    tp, checks = _LEAVES[key]
    base, optional = _unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)):
        return None

    def bad(hint: str = "") -> ConfigError:
        return _bad_value(key, value, where, tp, checks, hint)

    if base is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if base is int:
        # bool is an int subclass, and silently truncating 1.5 or parsing "8" hides mistakes
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        out: Any = value
    elif base is float:
        out = _number(value)
        if out is None:
            raise bad(" Write numbers like 1.0e-5 or 0.0003.")
    elif base is str:
        if isinstance(value, bool) and "true" in checks.get("choices", ()):
            value = str(value).lower()               # YAML reads a bare true/false as a bool
        if not isinstance(value, str) or not value.strip():
            quote = value is not None and not isinstance(value, str)
            raise bad(" Quote values that YAML would read as another type." if quote else "")
        # case-insensitive for the fixed words, so "BF16", "bfloat16" and "Auto" work
        low = value.strip().lower()
        words = checks.get("choices", checks.get("words", ()))
        out = checks.get("aliases", {}).get(low, low if low in words else value)
    elif typing.get_origin(base) is tuple:
        n = len(typing.get_args(base))
        items = [_number(v) for v in value] if isinstance(value, (list, tuple)) else []
        if len(items) != n or None in items:
            raise bad()
        out = tuple(items)
    else:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad()
        return copy.deepcopy(value)

    if "choices" in checks and out not in checks["choices"]:
        near = difflib.get_close_matches(str(out), [str(c) for c in checks["choices"]], n=1)
        raise bad(f" Did you mean {near[0]!r}?" if near else "")
    for v in (out if isinstance(out, tuple) else (out,)):
        if (("gt" in checks and not v > checks["gt"]) or ("ge" in checks and not v >= checks["ge"])
                or ("lt" in checks and not v < checks["lt"]) or ("le" in checks and not v <= checks["le"])):
            raise bad()
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _suggest(key: str) -> str | None:
    """The valid dotted key closest to a mistyped one (``train.lrr`` -> ``train.lr``, ``steps`` ->
    ``train.steps``, ``trian`` -> ``train``)."""
    names = list(_LEAVES) + list(_SECTIONS)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [n for n in _LEAVES if n.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if near:
        return near[0]
    by_leaf = {n.rsplit(".", 1)[-1]: n for n in _LEAVES}
    near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[near[0]] if near else None


def _unknown_key(key: str, where: str) -> ConfigError:
    msg = f"Unknown configuration key '{key}' in {where}."
    if key.startswith("loss.") and not key.startswith(_FREE_FORM):
        msg += (f" Method-specific loss settings go under loss.params (e.g. loss.params.{key[5:]});"
                " loss itself takes " + ", ".join(k[5:] for k in _LEAVES if k.startswith("loss.")) + ".")
    else:
        near = _suggest(key)
        if near:
            msg += f" Did you mean '{near}'?"
    return ConfigError(msg + " Keys are dotted paths such as train.steps or loss.params.k; the full"
                             " list is in train/config.py.")


# ---------------------------------------------------------------------------------------------
# Loading: flatten every layer into {dotted key: value} with a source per key, then check.

def _is_param(key: str) -> bool:
    return key == _FREE_FORM or key.startswith(_FREE_FORM + ".")


class _Layers:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def set(self, key: str, value: Any, where_of: Callable[[str], str]) -> None:
        """Store ``value`` under dotted ``key``; ``where_of(key)`` describes its source in errors."""
        where = where_of(key)
        if _is_param(key):
            self._set_param(key, value, where)
        elif key in _SECTIONS:
            if value is None:            # an empty section, e.g. "train:" with nothing under it
                return
            if not isinstance(value, dict):
                raise ConfigError(f"Invalid configuration in {where}: '{key}' is a section and expects a "
                                  f"mapping of its settings (e.g. {key}: {{...}}), got {value!r}.")
            for k, v in value.items():
                self.set(f"{key}.{_key_of(k, where)}", v, where_of)
        elif key in _LEAVES:
            self.values[key] = _coerce(key, value, where)
            self.sources[key] = where
        else:
            raise _unknown_key(key, where)

    def _set_param(self, key: str, value: Any, where: str) -> None:
        if key == _FREE_FORM:            # a whole mapping replaces the params set so far
            self.values[key] = _coerce(key, {} if value is None else value, where)
            self.sources[key] = where
            return
        params = self.values.setdefault(_FREE_FORM, {})
        *parents, last = key[len(_FREE_FORM) + 1:].split(".")
        for p in parents:
            params = params.setdefault(p, {})
            if not isinstance(params, dict):
                raise ConfigError(f"Invalid configuration in {where}: {key} nests under a loss "
                                  f"parameter that is not a mapping.")
        params[last] = value
        self.sources[_FREE_FORM] = where

    def where(self, key: str) -> str:
        return self.sources.get(key, _DEFAULT)


def _key_of(k: Any, where: str) -> str:
    if not isinstance(k, str) or not k:
        raise ConfigError(f"Invalid configuration in {where}: keys must be non-empty strings, got {k!r}.")
    return k


def _add_tree(layers: _Layers, tree: Any, source: str) -> None:
    if tree is None:
        return
    if not isinstance(tree, dict):
        raise ConfigError(f"Invalid configuration in {source}: expected a mapping of settings at the top "
                          f"level (run_name:, model:, train:, ...), got {type(tree).__name__}.")
    for k, v in tree.items():
        layers.set(_key_of(k, source), v, lambda key: f"{source}, key '{key}'")


def _add_override(layers: _Layers, text: str) -> None:
    where = f"command-line override '{text}'"
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"Invalid {where}: overrides are dotted.key=value, e.g. train.steps=8 or "
                          "loss.params.k=16.")
    try:
        value = yaml.safe_load(raw)
        parse_error = None
    except yaml.YAMLError as e:
        value, parse_error = raw, e
    if not (key in _LEAVES or key in _SECTIONS or _is_param(key)):
        raise _unknown_key(key, where)
    base, _ = _unwrap_optional(_LEAVES[key][0]) if key in _LEAVES else (None, False)
    if base is str and value is not None and not isinstance(value, str):
        value = raw                      # the shell already split words: take the text as written
    elif parse_error is not None and base is not str:
        raise ConfigError(f"Invalid {where}: the value {raw!r} is not valid YAML "
                          f"({str(parse_error).splitlines()[0]}).")
    layers.set(key, value, lambda _: where)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"Recipe file '{path}' not found (relative paths are taken from the directory "
                          f"kd-train runs in, {Path.cwd()}).") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Recipe file '{path}' is not valid YAML: {' '.join(str(e).split())}") from None


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The Config of recipe ``path`` (or defaults only when None) with ``overrides`` applied."""
    layers = _Layers()
    if path is not None:
        _add_tree(layers, _read_yaml(path), f"recipe '{path}'")
    for text in overrides:
        _add_override(layers, text)
    return _build(layers, "the command line" if path is None else f"recipe '{path}'")


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = (),
                     source: str = "config dict") -> Config:
    """Like ``load_config`` from an in-memory nested dict (as ``Config.to_dict`` returns)."""
    layers = _Layers()
    _add_tree(layers, tree, source)
    for text in overrides:
        _add_override(layers, text)
    return _build(layers, source)


def _build(layers: _Layers, origin: str) -> Config:
    for key in _REQUIRED:
        if key not in layers.values:
            what = ("an HF model directory, a preset (demo-student, demo-student-wide, demo-teacher) or a config.json path"
                    if key == "model.student" else "the path of the training JSONL file")
            raise ConfigError(f"Missing required setting {key}: {origin} has no value for it and there is "
                              f"no default. Expected {what}; set it in the recipe or pass {key}=... on the "
                              "command line.")
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    top: dict[str, Any] = {}
    for key, value in layers.values.items():
        section, _, name = key.partition(".")
        if name:
            sections[section][name] = value
        else:
            top[key] = value
    config = Config(**top, **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()})
    _cross_check(config, layers)
    return config


def _cross_check(c: Config, layers: _Layers) -> None:
    if c.model.teacher is None and c.loss.method != "sft":
        raise ConfigError(
            f"Missing model.teacher: loss.method is {c.loss.method!r} (from {layers.where('loss.method')}), "
            "which distills from a teacher. Set model.teacher to an HF model directory, a preset or a "
            "config.json path, or use loss.method=sft to fine-tune the student without a teacher.")
    p = c.parallel
    if p.nproc is not None and p.nproc % p.sequence:
        raise ConfigError(
            f"Invalid configuration in {layers.where('parallel.nproc')}: parallel.nproc={p.nproc} is not a "
            f"multiple of parallel.sequence={p.sequence} ({layers.where('parallel.sequence')}); each "
            "sequence-parallel group needs parallel.sequence ranks.")
    if p.sequence > 1 and c.model.attn_implementation == "eager":
        raise ConfigError(
            f"Invalid configuration in {layers.where('model.attn_implementation')}: model.attn_implementation=eager "
            f"cannot run sequence-parallel (parallel.sequence={p.sequence}, {layers.where('parallel.sequence')}): "
            "Ulysses drops the [T, T] mask eager attention needs. Use sdpa, flash_attention_2 (GPU) or auto.")
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError(
            f"Invalid configuration in {layers.where('parallel.offload_optimizer')}: "
            "parallel.offload_optimizer=true needs parallel.zero_stage 1, 2 or 3, got 0.")
    _check_cache(c, layers)
    _check_onpolicy(c, layers)
    clash = sorted({"temperature", "ce_weight"} & set(c.loss.params))
    if clash:
        raise ConfigError(
            f"Invalid configuration in {layers.where(_FREE_FORM)}: loss.params.{clash[0]} duplicates "
            f"loss.{clash[0]}; set loss.{clash[0]} instead.")
    try:
        build_objective(c.loss.method, 0.0, **c.loss.objective_kwargs())
    except (ValueError, TypeError) as e:
        reason = str(e).rstrip(".")
        raise ConfigError(
            f"Invalid loss settings in {layers.where(_FREE_FORM)} for loss.method {c.loss.method!r} "
            f"(from {layers.where('loss.method')}): {reason}. Method-specific settings go under loss.params."
        ) from None


def _check_cache(c: Config, layers: _Layers) -> None:
    """A cached teacher scores only the dataset's own responses, and writing one needs a real teacher."""
    w = layers.where
    if c.mode == "cache-teacher" and (c.model.teacher is None or c.teacher_cache is not None):
        raise ConfigError(
            f"Invalid configuration: mode=cache-teacher ({w('mode')}) runs model.teacher over data.train, and "
            f"model.teacher={c.model.teacher} ({w('model.teacher')}) is not a model. Set model.teacher to the teacher's "
            "HF directory (or a preset / config.json).")
    if c.mode != "train" or c.teacher_cache is None:
        return
    if c.onpolicy.mode != "off":
        raise ConfigError(
            f"Invalid configuration: model.teacher={c.model.teacher} ({w('model.teacher')}) is a cached teacher, which "
            f"holds the teacher's view of data.train's own responses, and onpolicy.mode={c.onpolicy.mode} "
            f"({w('onpolicy.mode')}) trains on the student's samples, which only a live teacher can score. Use "
            "onpolicy.mode=off with a cache, or the teacher's model directory.")
    if c.model.classmate is not None:
        raise ConfigError(
            f"Invalid configuration: model.classmate ({w('model.classmate')}) with a cached teacher "
            f"(model.teacher={c.model.teacher}): class KD trains on student samples and its classmate learns from the "
            "teacher's hidden states; use the teacher's model directory.")


def _check_onpolicy(c: Config, layers: _Layers) -> None:
    """On-policy and class-KD settings that cannot work together, named with their sources."""
    o, w = c.onpolicy, layers.where
    if o.mode != "off" and c.data.pack:
        raise ConfigError(
            f"Invalid configuration: onpolicy.mode={o.mode} ({w('onpolicy.mode')}) with data.pack=true "
            f"({w('data.pack')}): student samples replace the responses of whole examples, which packed rows "
            "merge. Use data.pack=false for on-policy training.")
    if o.mode != "off" and o.max_new_tokens >= c.data.max_len:
        raise ConfigError(
            f"Invalid configuration: onpolicy.max_new_tokens={o.max_new_tokens} ({w('onpolicy.max_new_tokens')}) "
            f"is not below data.max_len={c.data.max_len} ({w('data.max_len')}): prompt + sample must fit in "
            "data.max_len tokens, and a sample longer than that would be cut. Lower onpolicy.max_new_tokens or "
            "raise data.max_len.")
    if o.mode != "off" and (c.model.teacher is None or c.loss.method == "sft"):
        raise ConfigError(
            f"Invalid configuration: onpolicy.mode={o.mode} ({w('onpolicy.mode')}) with loss.method={c.loss.method} "
            f"({w('loss.method')}) and model.teacher={c.model.teacher}: on-policy training needs a teacher to score "
            "the student's samples (SFT on its own samples teaches it nothing). Set model.teacher and a distillation "
            "loss.method (grkd, forward_kl, jsd, ...), or onpolicy.mode=off.")
    if o.mode == "distillm" and not (c.data.eval and c.train.eval_every):
        raise ConfigError(
            f"Invalid configuration: onpolicy.mode=distillm ({w('onpolicy.mode')}) raises its threshold phi from "
            f"the validation loss ({o.val_metric}) at each evaluation, and data.eval={c.data.eval} "
            f"({w('data.eval')}), train.eval_every={c.train.eval_every} ({w('train.eval_every')}): without evaluations "
            "during training phi never moves and the run is plain off-policy. Set data.eval and train.eval_every > 0.")
    if c.model.classmate is not None:
        if o.mode == "off":
            raise ConfigError(
                f"Invalid configuration: model.classmate is set ({w('model.classmate')}) but onpolicy.mode=off: "
                "the classmate's misfeedback applies to student-generated samples only. Use onpolicy.mode=gkd "
                "(class KD) or distillm, or remove model.classmate.")
        if o.mode == "always":
            raise ConfigError(
                f"Invalid configuration: model.classmate with onpolicy.mode=always ({w('onpolicy.mode')}): the "
                "classmate learns only from the teacher on dataset responses, and in this mode no micro-batch "
                "holds them. Use onpolicy.mode=gkd with onpolicy.fraction < 1.")
        if o.mode == "gkd" and o.fraction >= 1:
            raise ConfigError(
                f"Invalid configuration: model.classmate with onpolicy.fraction={o.fraction} "
                f"({w('onpolicy.fraction')}): every micro-batch would be a student sample and the classmate, "
                "which learns only on dataset responses, would never train. Use a fraction below 1.")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def dump_yaml(config: Config, path: str | Path) -> Path:
    """Write the resolved config (e.g. to runs/<run>/config.yaml); ``load_config`` reads it back equal,
    except the two actions of the start that a rerun must not repeat: ``resume`` is written ``auto``
    (rerunning the file continues this run from its newest checkpoint, never rewinds it to a named
    one) and ``overwrite`` false."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = config.to_dict()
    tree.update(resume="auto", overwrite=False)
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)
    path.write_text("# Resolved kd-train configuration: defaults, recipe and overrides, as this run used them.\n"
                    f"# Continue this run: kd-train {path}\n"
                    f"# A new run with these settings: kd-train {path} run_name=NEW_NAME\n" + text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs

def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """``auto`` is bf16 on an accelerator and fp32 on CPU; explicit choices pass through.

    Without ``device``: bf16 where CUDA supports it. The one rule for both the dtype the weights are
    loaded in (``torch_dtype``) and the DeepSpeed precision (``ds_config``), so they always agree.
    """
    if dtype != "auto":
        return dtype
    if device is None:
        import torch
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "fp32" if device == "cpu" else "bf16"


def torch_dtype(dtype: str):
    """The torch dtype of ``model.dtype`` (after ``resolve_dtype``)."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolve_dtype(dtype)]
