"""Tokenizers: train a small SentencePiece model, load SentencePiece or HF tokenizers behind one interface.

The data code only needs a handful of things from a tokenizer, so both kinds are wrapped in classes with the
same small interface (``Tokenizer`` below):

- ``encode(text) -> list[int]`` without special tokens, ``decode(ids) -> str`` skipping special tokens
- ``bos_id`` / ``eos_id`` / ``pad_id`` (``bos_id`` may be None for HF tokenizers that have no BOS),
  ``vocab_size``, ``name``
- ``apply_chat_template(messages, add_generation_prompt=False) -> str | None`` (None: no chat template)
- ``pieces() -> list[str]`` (id -> piece, used by ``tokenizers_match``) and ``save(dir)``

SentencePiece models trained here use the Llama conventions: pad=0, unk=1, bos=2, eos=3, byte fallback,
identity normalisation (so newlines and runs of spaces survive a round trip), digits split one per token,
and a dummy prefix (``encode("42")`` gives ``▁4 2``, so a response encoded on its own reads as " 42").

``save(dir)`` of a SentencePiece tokenizer writes ``tokenizer.model`` plus ``tokenizer.json`` and
``tokenizer_config.json`` converted by ``sentencepiece_to_hf`` (which kd-convert uses for Gemma too), so an
exported model dir loads with ``AutoTokenizer.from_pretrained(dir)`` and encodes exactly like SentencePiece.
Documented differences remain, as with every HF tokenizer: the HF side treats the literal strings ``<s>``,
``</s>``, ``<pad>``, ``<unk>`` in text as the special tokens, SentencePiece treats them as plain text (and for
unigram models the literal text ``<0xNN>`` may come out as that byte piece on the HF side); with a dummy
prefix, text right after a user-defined symbol gets a dummy prefix of its own on the HF side.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Collection, Iterable, Protocol, Sequence

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SP_MODEL_FILE = "tokenizer.model"
_HF_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer(Protocol):
    name: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str | None: ...
    def pieces(self) -> list[str]: ...
    def save(self, out_dir: str | os.PathLike) -> Path: ...


# --------------------------------------------------------------------------------------------------------------
# Training


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    model_type: str = "bpe",
    *,
    character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = (),
    max_sentence_length: int = 16384,
) -> Path:
    """Train a SentencePiece model on ``texts`` and write ``out_dir/tokenizer.model``; return its path.

    Deterministic: one thread, no sentence sampling or shuffling, so the same texts give a byte-identical
    model. ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus may yield fewer
    pieces instead of an error; 260 ids are always taken by the 4 specials and the 256 byte-fallback pieces.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size <= 260 + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room: 260 ids are taken by specials and bytes")
    sentences = [t for t in texts if t]  # SentencePiece rejects empty sentences
    if not sentences:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        byte_fallback=True,
        split_digits=True,
        # identity + keep whitespace: prompts rely on "\n" and spacing surviving encode/decode
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=list(user_defined_symbols),
        # determinism: use every sentence, in order, on one thread
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )
    path = out / SP_MODEL_FILE
    path.write_bytes(buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str | os.PathLike) -> "SentencePieceTokenizer | HFTokenizer":
    """Load a tokenizer from a SentencePiece ``.model`` file, a dir holding only ``tokenizer.model``, or an HF
    tokenizer dir (local files only). A dir with HF files (``tokenizer.json`` / ``tokenizer_config.json``) is
    loaded through HF even if it also has ``tokenizer.model``: HF files carry added tokens and chat templates."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".model":
            return SentencePieceTokenizer(p)
        raise ValueError(f"{p}: not a SentencePiece .model file; pass the file or the tokenizer directory")
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    if any((p / f).exists() for f in _HF_FILES):
        return HFTokenizer(p)
    if (p / SP_MODEL_FILE).exists():
        return SentencePieceTokenizer(p / SP_MODEL_FILE)
    raise FileNotFoundError(f"{p}: no tokenizer.model, tokenizer.json or tokenizer_config.json in this directory")


def _vocab_hash(pieces: list[str]) -> str:
    return hashlib.sha256("\x00".join(pieces).encode("utf-8")).hexdigest()[:16]


class SentencePieceTokenizer:
    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.name = f"sentencepiece:{self.model_file}"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])  # control ids (bos/eos/pad) decode to ""

    has_chat_template = False

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
        return None

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def vocab_hash(self) -> str:
        return _vocab_hash(self.pieces())

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``tokenizer.model`` and the HF files (``tokenizer.json``, ``tokenizer_config.json``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (out / SP_MODEL_FILE).resolve():
            shutil.copyfile(self.model_file, out / SP_MODEL_FILE)
        self.to_hf().save_pretrained(str(out))
        return out

    def to_hf(self):
        """An HF fast tokenizer that encodes/decodes exactly like this model (bos added by default, Llama-like)."""
        return sentencepiece_to_hf(self.model_file)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file}, vocab_size={self.vocab_size})"


class HFTokenizer:
    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.name = str(getattr(self.tok, "name_or_path", "") or self.path)
        self.vocab_size = len(self.tok)  # includes added tokens, which the embedding must cover
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        # Padded positions are masked out everywhere, so any valid id works when the tokenizer has no pad.
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.tok.bos_token

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
        if not self.has_chat_template:
            return None
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def pieces(self) -> list[str]:
        return [str(p) for p in self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))]

    def vocab_hash(self) -> str:
        return _vocab_hash(self.pieces())

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(out))
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name}, vocab_size={self.vocab_size})"


def tokenizers_match(a, b) -> tuple[bool, str]:
    """Whether two tokenizers (objects or paths) map every id to the same piece; the reason says why not.

    Teacher and student logits are compared id by id, so anything but an identical vocabulary is refused."""
    ta = a if hasattr(a, "pieces") else load_tokenizer(a)
    tb = b if hasattr(b, "pieces") else load_tokenizer(b)
    pa, pb = ta.pieces(), tb.pieces()
    if len(pa) != len(pb):
        return False, (f"vocabulary sizes differ: {ta.name} has {len(pa)} ids, {tb.name} has {len(pb)}; "
                       "teacher and student must share one tokenizer")
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x != y:
            return False, (f"id {i} is {x!r} in {ta.name} but {y!r} in {tb.name}; "
                           "teacher and student must share one tokenizer")
    return True, f"identical vocabularies ({len(pa)} ids, hash {_vocab_hash(pa)})"


# --------------------------------------------------------------------------------------------------------------
# SentencePiece -> HF conversion


def sentencepiece_to_hf(model_file: str | os.PathLike, *, special_symbols: Collection[str] = ()):
    """A ``PreTrainedTokenizerFast`` that encodes and decodes like the BPE or unigram SentencePiece model
    ``model_file``; the one conversion, used by ``SentencePieceTokenizer.save`` and kd-convert (Gemma).

    Everything comes from the model's own proto (``sentencepiece_model_pb2``): pieces, scores and types, the
    special ids, and the normalizer settings (charsmap, dummy prefix, extra-whitespace removal). transformers'
    per-model converters hard-code those settings (Llama's, Gemma's), so the ``tokenizers`` pipeline is put
    together here and only the BPE merge ranking is taken from transformers. Control and unknown pieces become
    special tokens, user-defined symbols added tokens, special (skipped by decode) only when named in
    ``special_symbols`` (Gemma's turn markers). Raises ``ValueError`` for a file that is not such a model."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    model_file = Path(model_file)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except DecodeError:
        proto.Clear()
    if not proto.pieces:  # protobuf parses many non-model files without complaint, but finds no pieces
        raise ValueError(f"{model_file} is not a SentencePiece model (no pieces in it); pass the tokenizer.model "
                         "written by SentencePiece training")
    spec, norm_spec, Piece = proto.trainer_spec, proto.normalizer_spec, pb.ModelProto.SentencePiece
    if spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM) or spec.treat_whitespace_as_suffix:
        raise ValueError(f"{model_file}: only BPE and unigram SentencePiece models with the whitespace marker as "
                         "a prefix can be exported to HF")
    pieces = [p.piece for p in proto.pieces]
    special = [i for i, p in enumerate(proto.pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN)]
    user = [i for i, p in enumerate(proto.pieces) if p.type == Piece.USER_DEFINED]
    # Only normal pieces are reached from text by the model: control and user-defined pieces are matched as
    # added tokens, byte pieces only through byte fallback. Keep the rest out of merges and of the lattice.
    normal = {i for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}

    if spec.model_type == pb.TrainerSpec.BPE:
        vocab = {p: i for i, p in enumerate(pieces)}
        # SentencePiece applies the merge whose result scores highest: rank merges by the result's score
        merges = generate_merges(vocab, [(pieces[i], proto.pieces[i].score) for i in sorted(normal)],
                                 skip_tokens=[p for i, p in enumerate(pieces) if i not in normal])
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[spec.unk_id], fuse_unk=True,
                           byte_fallback=spec.byte_fallback)
    else:
        vocab = [(p.piece, p.score if i in normal else -1e9) for i, p in enumerate(proto.pieces)]
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)

    # SentencePiece encodes the whole normalized text without splitting it first, so no pre-tokenizer: no
    # piece spans a "▁" it was not trained across. The dummy prefix is a normalizer, not Metaspace's prepend,
    # because Metaspace skips text that already starts with a space and SentencePiece does not.
    backend = Backend(model)
    norm = []
    if norm_spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(norm_spec.precompiled_charsmap))
    if norm_spec.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm_spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    if norm_spec.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm_spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(dec)
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    backend.add_tokens([AddedToken(pieces[i], special=pieces[i] in special_symbols, normalized=False) for i in user])

    def piece(i: int) -> str | None:
        return pieces[i] if 0 <= i < len(pieces) else None

    bos = piece(spec.bos_id)
    if bos is not None:  # Llama/Gemma-like: tokenizer(text) starts with bos, add_special_tokens=False does not
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=piece(spec.eos_id), unk_token=piece(spec.unk_id),
        pad_token=piece(spec.pad_id), clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------------------------
# Command line: a tokenizer for a dataset of your own (the demo trains its own; kd-train never does)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from .data import DataError, iter_records, to_example

    ap = argparse.ArgumentParser(prog="python -m train.tokenizer",
                                 description="Train a SentencePiece tokenizer on the texts of a dataset kd-train reads "
                                             "(any record format) and save it with its HF files, for data.tokenizer.")
    ap.add_argument("data", help="JSONL / JSON / parquet file or saved HF datasets dir")
    ap.add_argument("out_dir")
    ap.add_argument("--vocab-size", type=int, default=2048, help="upper bound on the pieces (default 2048)")
    ap.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    args = ap.parse_args(argv)
    if Path(args.out_dir).exists() and any(Path(args.out_dir).iterdir()):
        print(f"error: {args.out_dir} is not empty; pick a new directory", file=sys.stderr)
        return 2
    try:
        texts = (" ".join(text for text, _ in to_example(r, where=w).as_segments()) for w, r in iter_records(args.data))
        path = train_sentencepiece(texts, args.out_dir, args.vocab_size, args.model_type)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(path)
    tok.save(args.out_dir)
    print(f"{tok.vocab_size} pieces -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
