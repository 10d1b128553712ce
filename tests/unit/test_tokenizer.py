"""train.tokenizer: deterministic SentencePiece training, the uniform interface, HF export and loading."""
import json
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from train.demo_task import make_demo_records
from train.tokenizer import (HFTokenizer, SentencePieceTokenizer, load_tokenizer, sentencepiece_to_hf,
                             tokenizers_match, train_sentencepiece)

CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")
EDGE = ["Reverse: d a c b\nAnswer: b c a d", "  two leading", "trailing  ", "a\n\nb", "x  y   z", "\ttab",
        "ünïcödé 日本 🙂", "", " ", "Answer:", "1234567890", "<0x41> is text"]


@pytest.fixture(scope="module")
def corpus():
    train, _ = make_demo_records(n_train=700, n_eval=0, seed=0)
    return [f"{r['prompt']} {r['response']}" for r in train] + ["The quick brown fox jumps over the lazy dog."] * 5


@pytest.fixture(scope="module")
def sp_path(corpus, tmp_path_factory):
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp"), vocab_size=400)


def test_training_is_deterministic(corpus, tmp_path):
    a = train_sentencepiece(corpus, tmp_path / "a", vocab_size=400)
    b = train_sentencepiece(corpus, tmp_path / "b", vocab_size=400)
    assert a.name == "tokenizer.model"
    assert a.read_bytes() == b.read_bytes()
    assert load_tokenizer(a).pieces() == load_tokenizer(b).pieces()
    c = train_sentencepiece(corpus[::-1][:300], tmp_path / "c", vocab_size=400)
    assert load_tokenizer(c).pieces() != load_tokenizer(a).pieces()


def test_special_ids_and_interface(sp_path):
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.pieces()[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert 260 < tok.vocab_size <= 400
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) is None
    ids = tok.encode("Add: 12 + 7\nAnswer:")
    assert ids and not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip(corpus, tmp_path, model_type):
    tok = load_tokenizer(train_sentencepiece(corpus, tmp_path, vocab_size=400, model_type=model_type))
    for s in EDGE + corpus[:50]:
        assert tok.decode(tok.encode(s)) == s, s
    # specials in ids are dropped on decode, so generated text can be decoded directly
    assert tok.decode([tok.bos_id] + tok.encode("a b") + [tok.eos_id]) == "a b"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_hf_export_encodes_like_sentencepiece(corpus, tmp_path, model_type):
    sp = load_tokenizer(train_sentencepiece(corpus, tmp_path / "sp", vocab_size=400, model_type=model_type))
    out = sp.save(tmp_path / "hf")
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = corpus[:100] + EDGE[:-1]
    if model_type == "bpe":
        texts.append(EDGE[-1])  # the literal "<0xNN>" case is a documented unigram-only difference
    for s in texts:
        assert hf.encode(s, add_special_tokens=False) == sp.encode(s), s
        assert hf.decode(sp.encode(s)) == s
    assert hf("a b").input_ids[0] == sp.bos_id  # Llama-like default: bos prepended
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, len(hf)) == (0, 2, 3, sp.vocab_size)
    reloaded = load_tokenizer(out)  # HF files present -> loaded through HF
    assert isinstance(reloaded, HFTokenizer)
    assert (reloaded.pad_id, reloaded.bos_id, reloaded.eos_id) == (0, 2, 3)
    assert reloaded.encode(corpus[0]) == sp.encode(corpus[0])
    assert tokenizers_match(sp, reloaded)[0]


def test_hf_export_user_defined_symbols(corpus, tmp_path):
    sp = load_tokenizer(train_sentencepiece(corpus, tmp_path, vocab_size=400, user_defined_symbols=["<sep>"]))
    sep = sp.sp.piece_to_id("<sep>")
    plain = sentencepiece_to_hf(sp.model_file)  # an added token, matched in text and kept by decode, like SP
    ids = plain.encode("Add: 1 + 2<sep>", add_special_tokens=False)
    assert ids == sp.encode("Add: 1 + 2<sep>") and ids[-1] == sep
    assert plain.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "Add: 1 + 2<sep>"
    marked = sentencepiece_to_hf(sp.model_file, special_symbols=["<sep>"])  # e.g. Gemma's turn markers
    assert marked.encode("Add: 1 + 2<sep>", add_special_tokens=False) == ids
    assert marked.decode(ids, skip_special_tokens=True) == "Add: 1 + 2"


def test_hf_export_refuses_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "tokenizer.model").write_text("just some text\n")
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a SentencePiece model"):
        sentencepiece_to_hf(tmp_path / "tokenizer.model")


def test_load_paths(sp_path, tmp_path):
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)  # the .model file
    assert isinstance(load_tokenizer(sp_path.parent), SentencePieceTokenizer)  # dir with only tokenizer.model
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_dir_from_tokenizers_bpe(corpus, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(tmp_path))

    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, len(fast))
    for s in corpus[:20] + ["any text at all: ü 🙂"]:
        ids = tok.encode(s)
        assert tok.bos_id not in ids
        assert tok.decode(ids) == s
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages) == "### user:\nhi\n### assistant:\nyo\n"
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=True).endswith("### assistant:\n")
    copy = tok.save(tmp_path / "copy")
    assert tokenizers_match(tok, copy)[0]


def test_tokenizers_match_refuses_different_vocabularies(corpus, sp_path, tmp_path):
    ok, reason = tokenizers_match(sp_path, sp_path.parent)
    assert ok and "identical" in reason
    other = train_sentencepiece(["completely different words here"] * 50 + corpus[:100], tmp_path / "o", vocab_size=400)
    a, b = load_tokenizer(sp_path), load_tokenizer(other)
    ok, reason = tokenizers_match(a, b)
    assert not ok
    if a.vocab_size == b.vocab_size:
        assert "id " in reason
    else:
        assert "sizes differ" in reason
    smaller = train_sentencepiece(corpus, tmp_path / "s", vocab_size=340)
    ok, reason = tokenizers_match(sp_path, smaller)
    assert not ok and "sizes differ" in reason and "share one tokenizer" in reason


def test_command_line_trains_on_any_record_format(tmp_path, capsys):
    from train.tokenizer import main
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
                            + "\n" for i in range(200)))
    assert main([str(data), str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert 261 < tok.vocab_size <= 300 and tok.decode(tok.encode("What is 7 plus 7?")) == "What is 7 plus 7?"
    assert (tmp_path / "tok" / "tokenizer.json").is_file()             # HF files: usable as data.tokenizer
    assert main([str(data), str(tmp_path / "tok")]) == 2                # never over an existing tokenizer
    assert "not empty" in capsys.readouterr().err
