"""DeepSpeed ZeRO-3 checkpoint of a student -> HF model directory, streamed shard by shard.

ZeRO-3 layout (what DeepSpeed's `zero_to_fp32` reconstructs, read here without gathering):
  * rank 0's `*_model_states.pt` holds `param_shapes` (per param group: name -> full shape, in
    the exact order the optimizer flattened them), `shared_params` (alias -> owner, e.g. a tied
    lm_head), `buffer_names` + `module` (buffers), and `frozen_param_shapes`.
  * each rank r's `*_optim_states.pt` holds `optimizer_state_dict.fp32_flat_groups`: flat fp32
    tensors (one per sub-group). Read end to end they are one virtual array in which every
    trainable param owns `ceil(numel / world)` consecutive elements at the same offset on every
    rank; rank r holds elements [r*p, (r+1)*p) of the flattened param (the tail is padding).
  * frozen params (requires_grad=False, e.g. a teacher) are not in the optimizer; each rank's
    model-states file holds its partition in `frozen_param_fragments`.

Streaming: output tensors are planned into shards of at most --max-shard-size bytes (in the
output dtype). For each shard, ranks are visited one at a time; each rank file is memory-mapped
and only the slices of that shard's params are read and copied straight into the (already
output-dtype) result. Peak memory is one output shard plus the pages of one rank file being
read, never the whole model.

What gets exported: exactly the weights an HF model of the run's config has. Checkpoint names
may carry a wrapper prefix (e.g. `student.`), detected automatically (or --prefix). Frozen
params that are not student weights (a teacher, frozen adapters) are left out; a *trainable*
param with no HF place is an error unless matched by --drop REGEX, so nothing is lost silently.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.errors import ConvertError
from tools.io import copy_tokenizer_files, expected_hf_shapes, torch_load

# deepspeed.checkpoint.constants; spelled out so that planning does not import deepspeed itself
OPTIM, FLAT, STAGE, PARTITIONS = "optimizer_state_dict", "fp32_flat_groups", "zero_stage", "partition_count"
COMPLETE = "COMPLETE"  # train/checkpoint.py's marker of a finished save (not imported: tools do not need train)
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt\Z")


@dataclass
class Entry:
    hf_name: str
    ckpt_name: str
    shape: tuple[int, ...]
    kind: str          # "flat" (optimizer partition), "frozen" (model-states fragment) or "buffer"
    offset: int = 0    # start of this param's slice in each rank's virtual flat array
    part: int = 0      # elements per rank

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def resolve_checkpoint(ckpt_dir: str | Path, tag: str | None) -> tuple[Path, Path]:
    """(run checkpoint dir, tag dir). CKPT_DIR may also be the tag dir itself."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise ConvertError(f"checkpoint directory {root} does not exist")
    if any(root.glob("*_model_states.pt")) and tag is None:
        root, tag_dir = root.parent, root
        if _is_step_dir(root):                                                    # <tag>/<engine>/ given
            root, tag_dir = root.parent, root
    elif tag is None and any(root.glob("*/*_model_states.pt")) and not (root / "latest").is_file():
        root, tag_dir = root.parent, root                                          # a tag dir holding engines
    else:
        if tag is None:
            latest = root / "latest"
            if not latest.is_file():
                tags = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*_model_states.pt")))
                raise ConvertError(f"no 'latest' file in {root}; pass --tag (available: {', '.join(tags) or 'none'})")
            tag = latest.read_text().strip()
        tag_dir = root / tag
        if not tag_dir.is_dir():
            raise ConvertError(f"checkpoint tag directory {tag_dir} does not exist")
    _require_complete(root, tag_dir)
    return root, tag_dir


def _require_complete(root: Path, tag_dir: Path) -> None:
    """Refuse a save of the training stack that never got its COMPLETE marker (written only after
    every rank finished its files, train/checkpoint.py). A tag dir is the stack's when a sibling
    has the marker or it holds the stack's per-rank trainer_state files; plain DeepSpeed
    checkpoints have neither and are taken as they are."""
    if (tag_dir / COMPLETE).is_file():
        return
    complete = sorted(p.name for p in root.iterdir() if _marked(p))
    if not complete and not any(tag_dir.glob("trainer_state_rank*.pt")):
        return
    earlier = [t for t in complete if t < tag_dir.name]  # the stack's tags (step_00000040) sort by step
    if earlier:
        hint = f"convert the previous complete checkpoint instead: {root / earlier[-1]}"
    elif complete:
        hint = f"complete checkpoints of this run: {', '.join(complete)}"
    else:
        hint = f"{root} holds no complete checkpoint yet: let the run finish a save (or rerun it) and convert that"
    raise ConvertError(f"checkpoint {tag_dir} has no {COMPLETE} marker: the training stack writes it only after "
                       f"every rank finished saving, so this save was interrupted and its files may be partial; "
                       f"{hint}")


def _marked(path: Path) -> bool:
    try:
        return (path / COMPLETE).is_file()
    except OSError:  # an unreadable neighbour: a tag dir given directly may sit in any directory (/tmp)
        return False


def find_config_dir(root: Path, tag_dir: Path, config_dir: str | Path | None) -> Path:
    candidates = [Path(config_dir)] if config_dir else [root, root / "hf_meta", tag_dir, tag_dir / "hf_meta"]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise ConvertError(f"no HF config.json found in {', '.join(map(str, candidates))}; the training run saves it "
                       "in <checkpoints>/hf_meta/, or pass --config-dir")


def _rank_files(tag_dir: Path, kind: str) -> dict[int, Path]:
    files = {}
    for p in tag_dir.iterdir():
        m = _RANK_RE.search(p.name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                raise ConvertError(f"{p}: tensor/pipeline-parallel ZeRO checkpoints (mp_rank > 0) are not supported")
            files[int(m.group(1))] = p
    return files


def _read_range(flat_groups: list[torch.Tensor], group_starts: list[int], start: int, length: int):
    """Pieces of the virtual concatenation of `flat_groups` covering [start, start+length)."""
    pieces, end = [], start + length
    for g, t in enumerate(flat_groups):
        lo, hi = group_starts[g], group_starts[g] + t.numel()
        if hi <= start or lo >= end:
            continue
        pieces.append(t[max(start, lo) - lo:min(end, hi) - lo])
    return pieces


def engine_files(tag_dir: Path, engine: str) -> Path:
    """Where the DeepSpeed files of ``engine`` are: ``<tag>/<engine>/`` (the training stack keeps each
    trained engine in its own sub-directory), else the tag dir itself (a plain DeepSpeed checkpoint, or
    the stack's checkpoints written before sub-directories, which held only the student)."""
    sub = tag_dir / engine
    if any(sub.glob("*_model_states.pt")):
        return sub
    if any(tag_dir.glob("*_model_states.pt")) and engine == "student":
        return tag_dir
    held = sorted(p.name for p in tag_dir.iterdir() if p.is_dir() and any(p.glob("*_model_states.pt")))
    raise ConvertError(f"{tag_dir} holds no '{engine}' engine (engines there: {', '.join(held) or 'none'}); "
                       "pass --engine with one of them")


def _given_engine(path: Path) -> str | None:
    """The engine named by a path to ``<tag>/<engine>/`` itself (a folder of DeepSpeed files whose parent is
    one of the stack's step directories)."""
    return path.name if any(path.glob("*_model_states.pt")) and _is_step_dir(path.parent) else None


def _is_step_dir(path: Path) -> bool:
    """A step directory of the training stack: its COMPLETE marker or its per-rank trainer states."""
    return (path / COMPLETE).is_file() or any(path.glob("trainer_state_rank*.pt"))


class ZeroSource:
    def __init__(self, ckpt_dir, tag=None, config_dir=None, prefix: str | None = None, drop=(),
                 engine: str | None = None):
        from transformers import AutoConfig

        given = _given_engine(Path(ckpt_dir)) if tag is None else None
        if given and engine and engine != given:
            raise ConvertError(f"{ckpt_dir} holds the {given} engine's files but --engine {engine} was asked for; "
                               f"pass the step directory ({Path(ckpt_dir).parent}) with --engine {engine}")
        engine = engine or given or "student"
        self.root, self.tag_dir = resolve_checkpoint(ckpt_dir, tag)
        # a classmate's config (class KD) is saved beside the student's, in hf_meta/<engine>/
        self.config_dir = find_config_dir(self.root, self.tag_dir, config_dir or (
            self.root / "hf_meta" / engine if engine != "student" and (self.root / "hf_meta" / engine).is_dir() else None))
        self.config = AutoConfig.from_pretrained(self.config_dir)
        self.family = self.config.model_type
        self.tag_dir = engine_files(self.tag_dir, engine)
        self.model_files = _rank_files(self.tag_dir, "model")
        self.optim_files = _rank_files(self.tag_dir, "optim")
        if 0 not in self.model_files or 0 not in self.optim_files:
            raise ConvertError(f"{self.tag_dir} has no zero_pp_rank_0_mp_rank_00_{{model,optim}}_states.pt: not a "
                               "ZeRO checkpoint (or an incomplete one)")
        meta = torch_load(self.model_files[0], weights_only=False)
        osd = torch_load(self.optim_files[0], weights_only=False)[OPTIM]
        stage = int(osd.get(STAGE, -1))
        if stage != 3:
            raise ConvertError(f"{self.optim_files[0]} is a ZeRO stage {stage} checkpoint; zero-to-hf reads stage 3 "
                               "(for stage 1/2 run DeepSpeed's zero_to_fp32.py)")
        world = osd[PARTITIONS]
        self.world = max(world) if isinstance(world, list) else int(world)
        for r in range(self.world):
            for kind, files in (("optim", self.optim_files), ("model", self.model_files)):
                if r not in files:
                    name = files[0].name.replace("zero_pp_rank_0_", f"zero_pp_rank_{r}_")
                    raise ConvertError(f"missing shard {self.tag_dir / name}: the checkpoint was saved by "
                                       f"{self.world} ranks")
        group_sizes = [t.numel() for t in osd[FLAT]]
        self.group_starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
        del osd
        self.origin = str(self.model_files[0])
        self._plan(meta, sum(group_sizes), prefix, [re.compile(d) for d in drop])

    def _plan(self, meta, flat_numel: int, prefix, drop):
        expected = expected_hf_shapes(self.config)
        trainable = {}
        for group in meta["param_shapes"]:
            trainable.update(group)
        frozen = meta.get("frozen_param_shapes") or {}
        buffers = [n for n in meta.get("buffer_names", []) if n in meta["module"]]
        self.buffers = {n: meta["module"][n] for n in buffers}
        if prefix is None:  # trainable names decide: a frozen teacher may share the student's naming
            prefix = _detect_prefix(list(trainable), expected) if trainable else _detect_prefix(list(frozen), expected)
        self.prefix = prefix

        def hf_name(name):
            if name.startswith(prefix) and name[len(prefix):] in expected:
                return name[len(prefix):]
            return None

        entries: dict[str, Entry] = {}
        offset = 0
        dropped = []
        for name, shape in trainable.items():
            part = math.ceil(math.prod(shape) / self.world)
            target = hf_name(name)
            if target is not None:
                entries[target] = Entry(target, name, tuple(shape), "flat", offset, part)
            elif any(d.search(name) for d in drop):
                dropped.append(name)
            else:
                raise ConvertError(
                    f"trainable tensor '{name}' in {self.origin} has no place in an HF {self.family} model "
                    f"(prefix '{prefix}'): the student engine should hold only the student; pass --drop REGEX to "
                    "leave such tensors out deliberately")
            offset += part
        if offset != flat_numel:
            raise ConvertError(f"{self.optim_files[0]}: flat fp32 partitions hold {flat_numel} elements per rank, "
                               f"param_shapes in {self.origin} need {offset}: files from different saves?")
        excluded = []
        for name, shape in frozen.items():
            target = hf_name(name)
            if target is not None and target not in entries:
                entries[target] = Entry(target, name, tuple(shape), "frozen")
            else:
                excluded.append(name)
        for name, t in self.buffers.items():
            target = hf_name(name)
            if target is not None and target not in entries:
                entries[target] = Entry(target, name, tuple(t.shape), "buffer")
        for alias, owner in (meta.get("shared_params") or {}).items():
            target, owner_hf = hf_name(alias), hf_name(owner)
            if target is not None and target not in entries and owner_hf in entries:
                entries[target] = Entry(target, **{k: getattr(entries[owner_hf], k) for k in
                                                   ("ckpt_name", "shape", "kind", "offset", "part")})
        missing = [n for n in expected if n not in entries]
        if missing:
            raise ConvertError(f"ZeRO checkpoint {self.tag_dir} lacks '{missing[0]}'"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} for an HF "
                               f"{self.family} model with prefix '{prefix}' (wrong config or --prefix?)")
        for n, e in entries.items():
            if n in expected and e.shape != expected[n]:
                raise ConvertError(f"shape mismatch for '{e.ckpt_name}' in {self.origin}: {e.shape}, the config in "
                                   f"{self.config_dir} implies {expected[n]}")
        self.entries = [entries[n] for n in expected]  # HF module order
        self.report = {"ranks": self.world, "prefix": prefix, "excluded_frozen": len(excluded),
                       "dropped_trainable": len(dropped), "excluded_examples": excluded[:3]}

    def plan_shards(self, dtype: torch.dtype, budget_bytes: int | None) -> list[list[Entry]]:
        """Greedy packing, the same rule the writer uses, so each group is exactly one output shard."""
        size = torch.empty((), dtype=dtype).element_size()
        groups, current, used = [], [], 0
        for e in self.entries:
            nbytes = e.numel * size
            if current and budget_bytes is not None and used + nbytes > budget_bytes:
                groups.append(current)
                current, used = [], 0
            current.append(e)
            used += nbytes
        if current:
            groups.append(current)
        return groups

    def tensors(self, dtype: torch.dtype | None = None, budget_bytes: int | None = None):
        dtype = dtype or torch.float32
        self.rank_file_loads = 0
        self.peak_group_bytes = 0
        for group in self.plan_shards(dtype, budget_bytes):
            out = {e.hf_name: torch.empty(e.numel, dtype=dtype) for e in group}
            self.peak_group_bytes = max(self.peak_group_bytes, sum(t.numel() * t.element_size() for t in out.values()))
            for r in range(self.world):
                # no_grad: the saved flat partitions have requires_grad=True; copying them under
                # autograd would chain the outputs to the mapped files and keep those alive.
                with torch.no_grad():
                    self._copy_rank(r, group, out)
            for e in group:
                yield e.hf_name, out.pop(e.hf_name).view(e.shape), self.origin
        self.report.update(peak_gathered_bytes=self.peak_group_bytes, rank_file_loads=self.rank_file_loads)

    def _copy_rank(self, r: int, group: list[Entry], out: dict[str, torch.Tensor]) -> None:
        """Copy rank r's slices of `group`'s params into `out` (a function, so that no local keeps
        a view of the memory-mapped file alive afterwards)."""
        kinds = {e.kind for e in group}
        flat = frozen = None
        if "flat" in kinds:
            flat = torch_load(self.optim_files[r], weights_only=False)[OPTIM][FLAT]
            self.rank_file_loads += 1
        if "frozen" in kinds:
            frozen = torch_load(self.model_files[r], weights_only=False)["frozen_param_fragments"]
            self.rank_file_loads += 1
        for e in group:
            dst = out[e.hf_name]
            if e.kind == "flat":
                pos = r * e.part
                length = max(0, min(e.part, e.numel - pos))  # the last rank's slice ends in padding
                for piece in _read_range(flat, self.group_starts, e.offset, length):
                    dst[pos:pos + piece.numel()].copy_(piece)
                    pos += piece.numel()
            elif e.kind == "frozen":
                frag = frozen[e.ckpt_name].reshape(-1)
                if frag.numel() == e.numel:  # not partitioned: every rank holds it whole
                    if r == 0:
                        dst.copy_(frag)
                else:
                    lo = r * frag.numel()
                    n = max(0, min(frag.numel(), e.numel - lo))
                    dst[lo:lo + n].copy_(frag[:n])
            elif r == 0:
                dst.copy_(self.buffers[e.ckpt_name].reshape(-1))

    def generation_config(self):
        from transformers import GenerationConfig

        if (self.config_dir / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.config_dir)
        return None

    def save_extras(self, out: Path) -> list[str]:
        return copy_tokenizer_files(self.config_dir, out)


def _detect_prefix(names: list[str], expected: dict) -> str:
    """The wrapper prefix ('' or e.g. 'student.') under which most checkpoint names are HF names."""
    votes = Counter()
    for name in names:
        parts = name.split(".")
        for k in range(len(parts)):
            if ".".join(parts[k:]) in expected:
                votes[".".join(parts[:k]) + ("." if k else "")] += 1
                break
    if not votes:
        raise ConvertError("no checkpoint tensor name matches the HF model of the given config (wrong family "
                           "or config?)")
    best = max(votes.values())
    return min((p for p, v in votes.items() if v == best), key=len)
