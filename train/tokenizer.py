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
``tokenizer_config.json`` built by hand from the model (no protobuf dependency), so an exported model dir
loads with ``AutoTokenizer.from_pretrained(dir)`` and encodes exactly like SentencePiece. One documented
difference remains, as with every HF tokenizer: the HF side treats the literal strings ``<s>``, ``</s>``,
``<pad>``, ``<unk>`` in text as the special tokens, SentencePiece treats them as plain text (and for unigram
models the literal text ``<0xNN>`` may come out as that byte piece on the HF side).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Protocol, Sequence

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


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes for everything else."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _sentencepiece_specs(model_file: Path) -> dict:
    """The few ModelProto fields the conversion needs, read without protobuf (field numbers from
    sentencepiece_model.proto: ModelProto.trainer_spec=2 / normalizer_spec=3; TrainerSpec.model_type=3;
    NormalizerSpec name=1, precompiled_charsmap=2, add_dummy_prefix=3, remove_extra_whitespaces=4)."""
    spec = {"model_type": 1, "name": "", "charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for field, value in _proto_fields(model_file.read_bytes()):
        if field == 2:
            for f, v in _proto_fields(value):
                if f == 3:
                    spec["model_type"] = v
        elif field == 3:
            for f, v in _proto_fields(value):
                if f == 1:
                    spec["name"] = v.decode("utf-8")
                elif f == 2:
                    spec["charsmap"] = v
                elif f == 3:
                    spec["add_dummy_prefix"] = bool(v)
                elif f == 4:
                    spec["remove_extra_whitespaces"] = bool(v)
    return spec


def sentencepiece_to_hf(model_file: str | os.PathLike):
    """Build a ``PreTrainedTokenizerFast`` equivalent to a BPE or unigram SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFBackend
    from transformers import PreTrainedTokenizerFast

    model_file = Path(model_file)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    spec = _sentencepiece_specs(model_file)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    # Byte and control pieces are only reachable through byte fallback / special-token matching in
    # SentencePiece, never from text; keep them out of merges and out of the unigram lattice's reach.
    unreachable = set(special) | {i for i in range(n) if sp.is_byte(i) or sp.is_unused(i)}
    unk = pieces[sp.unk_id()]

    if spec["model_type"] == 2:  # BPE
        vocab = {p: i for i, p in enumerate(pieces)}
        mergeable = {p: i for i, p in enumerate(pieces) if i not in unreachable}
        # SentencePiece BPE applies the merge whose result scores highest; its pieces are ordered by score,
        # so merges ranked by the resulting piece's id reproduce it.
        ranked = []
        for piece, pid in mergeable.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in mergeable and right in mergeable:
                    ranked.append((pid, mergeable[left], mergeable[right], left, right))
        ranked.sort()
        model = models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in ranked], unk_token=unk,
                           fuse_unk=True, byte_fallback=True)
    elif spec["model_type"] == 1:  # unigram
        vocab = [(p, -1e9 if i in unreachable else sp.get_score(i)) for i, p in enumerate(pieces)]
        model = models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True)
    else:
        raise ValueError(f"{model_file}: only BPE and unigram SentencePiece models can be exported to HF")

    backend = HFBackend(model)
    norm = []
    if spec["charsmap"]:
        norm.append(normalizers.Precompiled(spec["charsmap"]))
    if spec["remove_extra_whitespaces"]:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(norm)
    # SentencePiece splits before every "▁" (a piece never spans a word boundary); prepending is done above
    # because Metaspace's own prepend skips text that already starts with a space, SentencePiece does not.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(dec)
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    bos = sp.bos_id()
    if bos >= 0:  # Llama-like: tokenizer(text) starts with BOS, encode(..., add_special_tokens=False) does not
        backend.post_processor = processors.TemplateProcessing(
            single=f"{pieces[bos]} $A", pair=f"{pieces[bos]} $A {pieces[bos]} $B",
            special_tokens=[(pieces[bos], bos)])

    def piece(i: int) -> str | None:
        return pieces[i] if i >= 0 else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
        unk_token=piece(sp.unk_id()), pad_token=piece(sp.pad_id()),
        clean_up_tokenization_spaces=False,
    )
