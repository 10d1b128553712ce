"""`kd-convert vocab-check TEACHER STUDENT [--resize --out DIR]`.

Token-to-token distillation compares the two models' distributions id by id, so it needs the
same token at every id (same vocab, same special tokens, same pre-tokenization) and logits of
the same width. Embedding matrices are often padded past the tokenizer (to a multiple of 64 or
128); those rows are reported, and `--resize` pads or trims the student's embedding (and untied
lm_head) to the teacher's row count. New rows are the mean of the existing ones; trimming only
ever removes padding rows, never a real token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tools.errors import ConvertError
from tools.io import HFReader, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, write_hf_checkpoint

SAMPLES = ["Hello world! The quick brown fox jumps over the lazy dog.",
           "  leading spaces, tabs\tand\nnewlines; digits 1234567 and 3.14159",
           "Ünïcödé façade — naïve café 東京 😀", "def f(x):\n    return x ** 2  # code"]


def _side(path: Path, role: str) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ConvertError(f"{role} {path} is not an HF model directory (no config.json); convert it first")
    config = AutoConfig.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConvertError(f"cannot load the {role} tokenizer from {path}: {e}") from None
    reader = HFReader(path)
    embed = next((n for n in reader.keys() if n.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ConvertError(f"no '*embed_tokens.weight' tensor in the {role} checkpoint {path}")
    rows = reader.shape(embed)[0]
    head = "lm_head.weight" if "lm_head.weight" in reader.files and not config.tie_word_embeddings else None
    if head and reader.shape(head)[0] != rows:
        raise ConvertError(f"{role}: lm_head.weight has {reader.shape(head)[0]} rows but {embed} has {rows}")
    return {"path": path, "config": config, "tok": tok, "reader": reader, "embed": embed, "head": head,
            "rows": rows, "tokens": len(tok)}


def vocab_check(teacher, student) -> dict:
    t, s = _side(Path(teacher), "teacher"), _side(Path(student), "student")
    vt, vs = t["tok"].get_vocab(), s["tok"].get_vocab()
    by_id_t = {i: w for w, i in vt.items()}
    by_id_s = {i: w for w, i in vs.items()}
    differing = [i for i in sorted(set(by_id_t) | set(by_id_s)) if by_id_t.get(i) != by_id_s.get(i)]
    specials = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(t["tok"], name), getattr(s["tok"], name)
        if a != b:
            specials[name] = (a, b)
    encode_diff = [text for text in SAMPLES if t["tok"](text)["input_ids"] != s["tok"](text)["input_ids"]]
    same_tokens = not differing and not encode_diff
    report = {
        "teacher_tokens": t["tokens"], "student_tokens": s["tokens"],
        "teacher_embedding_rows": t["rows"], "student_embedding_rows": s["rows"],
        "teacher_padded_rows": t["rows"] - t["tokens"], "student_padded_rows": s["rows"] - s["tokens"],
        "differing_ids": len(differing),
        "differing_examples": [(i, by_id_t.get(i), by_id_s.get(i)) for i in differing[:5]],
        "special_token_differences": specials, "samples_encoded_differently": len(encode_diff),
        "token_to_token": same_tokens, "same_logit_width": t["rows"] == s["rows"],
    }
    if not same_tokens:
        verdict = ("NOT distillable token-to-token: the tokenizers differ "
                   f"({len(differing)} ids map to different tokens, {len(encode_diff)} sample texts encode "
                   "differently); use a cross-tokenizer objective or the teacher's tokenizer")
    elif t["rows"] != s["rows"]:
        verdict = (f"distillable token-to-token, but logit widths differ ({t['rows']} vs {s['rows']} rows): "
                   "slice both to the tokenizer size in the loss, or run with --resize")
    else:
        verdict = "distillable token-to-token: same tokenizer and same logit width"
    if specials:
        verdict += f"; special token ids differ: {specials}"
    report["verdict"] = verdict
    report["_sides"] = (t, s)
    return report


class _ResizedSource:
    """The student's own tensors with the embedding (and untied head) padded/trimmed to `rows`."""

    def __init__(self, side: dict, rows: int):
        self.side, self.rows = side, rows
        self.config = side["config"]
        self.family = self.config.model_type
        self.config.vocab_size = rows

    def tensors(self, dtype=None, budget_bytes=None):
        reader = self.side["reader"]
        for name in reader.keys():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            t = reader.get(name)
            if name in (self.side["embed"], self.side["head"]):
                t = _resize_rows(t, self.rows)
            yield name, t, str(reader.files[name])

    def generation_config(self):
        from transformers import GenerationConfig

        path = self.side["path"]
        return GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None

    def save_extras(self, out: Path) -> list[str]:
        copied = []
        for f in self.side["path"].iterdir():  # tokenizer and anything else that is not weights
            if f.is_file() and f.name not in ("config.json", "generation_config.json", SAFETENSORS_INDEX,
                                              SAFETENSORS_SINGLE) and not f.name.endswith(".safetensors"):
                shutil.copy2(f, out / f.name)
                copied.append(f.name)
        return copied


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows <= t.shape[0]:
        return t[:rows].clone()
    fill = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
    return torch.cat([t, fill], dim=0)


def resize_student(report: dict, out, rows: int | None = None, overwrite: bool = False) -> dict:
    t, s = report["_sides"]
    rows = rows or t["rows"]
    if rows < s["tokens"]:
        raise ConvertError(f"cannot trim the student embedding to {rows} rows: its tokenizer has {s['tokens']} "
                           "tokens (only padding rows may be removed)")
    if Path(out).resolve() == Path(s["path"]).resolve():
        raise ConvertError("--out must differ from the student directory")
    result = write_hf_checkpoint(_ResizedSource(s, rows), out, max_shard_size=_shard_size(s["path"]),
                                 overwrite=overwrite)
    result.update(resized_from=s["rows"], resized_to=rows)
    return result


def _shard_size(path: Path) -> int:
    index = path / SAFETENSORS_INDEX
    if not index.is_file():
        return 5 * 10**9
    files = set(json.loads(index.read_text())["weight_map"].values())
    return max((path / f).stat().st_size for f in files)
