"""Model-family adapters: a table of name rules between an original release format and HF, plus
the few tensor transforms a family needs (tools/adapters/llama.py, tools/adapters/gemma2.py).

Adding a family (Qwen, Mistral...) is one new module: an `Adapter` built from `Rule`s, a source
class reading the original files (`family`, `config`, `tensors()`; see tools/io.write_hf_checkpoint)
and, if wanted, a reverse writer; then one subcommand in tools/convert.py and one line in
tools/verify.detect_format. Validation, sharding, atomic output and verify come for free."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from tools.errors import ConvertError

Tensor = torch.Tensor


@dataclass
class Rule:
    """One original-format tensor <-> one or more HF tensors.

    `src` and `hf` are templates where `{i}` stands for a layer index. Without transforms the
    tensor is copied as-is; `to_hf(t, cfg) -> [t, ...]` and `to_src([t, ...], cfg) -> t` cover
    fused projections (one source tensor, several HF ones) and layout changes such as permutations.
    """

    src: str
    hf: tuple[str, ...]
    to_hf: Callable[[Tensor, object], list[Tensor]] | None = None
    to_src: Callable[[list[Tensor], object], Tensor] | None = None

    def __post_init__(self):
        if isinstance(self.hf, str):
            self.hf = (self.hf,)
        self._src_re = _template_re(self.src)
        self._hf_res = [_template_re(h) for h in self.hf]


def _template_re(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")


@dataclass
class Adapter:
    family: str          # name used on the command line and in messages
    model_type: str      # HF config.model_type it produces
    rules: list[Rule]
    ignored_src: tuple[str, ...] = ()   # regexes of source entries that are not weights (rope caches)
    _ignored: list[re.Pattern] = field(init=False, repr=False)

    def __post_init__(self):
        self._ignored = [re.compile(p) for p in self.ignored_src]

    def _match_src(self, name: str):
        for rule in self.rules:
            m = rule._src_re.match(name)
            if m:
                return rule, m.groupdict()
        return None, None

    def _match_hf(self, name: str):
        for rule in self.rules:
            for pos, pattern in enumerate(rule._hf_res):
                m = pattern.match(name)
                if m:
                    return rule, pos, m.groupdict()
        return None, None, None

    def to_hf(self, names: Iterable[str], get: Callable[[str], Tensor], cfg, origin: Callable[[str], str]
              ) -> Iterator[tuple[str, Tensor, str]]:
        """Source-format names -> (hf_name, tensor, origin) triples; unknown names are errors."""
        for name in names:
            if any(p.match(name) for p in self._ignored):
                continue
            rule, groups = self._match_src(name)
            if rule is None:
                raise ConvertError(f"unknown tensor '{name}' in {origin(name)}: not part of a {self.family} "
                                   "checkpoint (wrong family, or a corrupted/extended file?)")
            tensor = get(name)
            try:
                outs = rule.to_hf(tensor, cfg) if rule.to_hf else [tensor]
            except RuntimeError as e:  # reshape of a wrongly sized tensor
                raise ConvertError(f"shape mismatch for '{name}' in {origin(name)}: {tuple(tensor.shape)} "
                                   f"does not fit the config ({e})") from None
            for template, t in zip(rule.hf, outs):
                yield template.format(**groups), t, origin(name)

    def to_src(self, names: Iterable[str], get: Callable[[str], Tensor], cfg, origin: Callable[[str], str]
               ) -> Iterator[tuple[str, Tensor]]:
        """HF names -> (source_name, tensor); fused tensors are emitted once all parts were seen."""
        waiting: dict[str, tuple[Rule, dict, dict[int, Tensor]]] = {}
        for name in names:
            rule, pos, groups = self._match_hf(name)
            if rule is None:
                raise ConvertError(f"unknown tensor '{name}' in {origin(name)}: no {self.family} equivalent")
            src_name = rule.src.format(**groups)
            _, _, parts = waiting.setdefault(src_name, (rule, groups, {}))
            parts[pos] = get(name)
            if len(parts) == len(rule.hf):
                del waiting[src_name]
                ordered = [parts[k] for k in range(len(rule.hf))]
                yield src_name, rule.to_src(ordered, cfg) if rule.to_src else ordered[0]
        for src_name, (rule, groups, parts) in waiting.items():
            lacking = [h.format(**groups) for k, h in enumerate(rule.hf) if k not in parts]
            raise ConvertError(f"cannot build '{src_name}': missing {', '.join(lacking)}")


def check_model_type(config, expected: str, where) -> None:
    got = getattr(config, "model_type", None)
    if got != expected:
        raise ConvertError(f"{where} holds a '{got}' model, this command expects '{expected}' (wrong family)")


def open_hf_source(src, family: str):
    """An HF model directory to convert from: ``(config, reader, expected shapes)``, after checking
    that it is one and holds the ``family`` this command converts."""
    from pathlib import Path

    from transformers import AutoConfig

    from tools.io import HFReader, expected_hf_shapes

    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConvertError(f"missing {src / 'config.json'}: not an HF model directory")
    config = AutoConfig.from_pretrained(src)
    check_model_type(config, family, src)
    return config, HFReader(src), expected_hf_shapes(config)
