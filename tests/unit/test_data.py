"""train.data: loading and format detection, prompt masking, truncation, packing, batches, exact resume."""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, GSM8K_PROMPT, IGNORE_INDEX, Collator, DataError,
                        Example, PackedDataset, TokenizedDataset, detect_format, encode_prompt, iter_records,
                        load_records, make_loader, shift_labels, to_example, tokenize_example)
from train.demo_task import make_demo_records
from train.tokenizer import load_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
GSM8K = next((d for d in (REPO / "shared" / "data" / "gsm8k", REPO.parent / "shared" / "data" / "gsm8k")
              if (d / "train.jsonl").exists()), None)

RECORDS = {
    "prompt_response": {"prompt": "Add: 2 + 3\nAnswer:", "response": "5"},
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    "dolly": {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats nap.", "category": "x"},
    "gsm8k": {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
}
CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    train, _ = make_demo_records(n_train=700, n_eval=0, seed=0)
    texts = [f"{r['prompt']} {r['response']}" for r in train] + ["Below is an instruction that describes a task."]
    return load_tokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("tok"), vocab_size=400))


def _hf_with_template(tok, path, template):
    hf = tok.to_hf()
    hf.chat_template = template
    hf.save_pretrained(str(path))
    return load_tokenizer(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _demo_dataset(tok, n=40, max_len=48):
    train, _ = make_demo_records(n_train=n, n_eval=0, seed=0)
    return TokenizedDataset(train, tok, max_len)


def _trained(item_or_ids, labels=None):
    ids, labels = (item_or_ids["input_ids"], item_or_ids["labels"]) if labels is None else (item_or_ids, labels)
    return [int(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_format_detection_from_file(tmp_path, tok, fmt):
    path = _write_jsonl(tmp_path / "d.jsonl", [RECORDS[fmt]] * 3)
    assert detect_format(load_records(path)[0]) == fmt
    ds = TokenizedDataset(path, tok, 256)
    assert ds.stats.formats == {fmt: 3} and ds.stats.n_examples == 3
    assert fmt in ds.stats.summary()


def test_examples_per_format():
    ex = to_example(RECORDS["alpaca"])
    assert ex.prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.") and ex.response == "Blue."
    ex = to_example({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert ex.prompt == ALPACA_PROMPT.format(instruction="Translate.", input="chat")
    ex = to_example(RECORDS["dolly"])
    assert ex.prompt == ALPACA_PROMPT.format(instruction="Summarise.", input="Cats sleep a lot.")
    assert ex.response == "Cats nap."
    ex = to_example(RECORDS["gsm8k"])
    assert ex.prompt == "Question: What is 2 + 2?\nAnswer:" and ex.response.endswith("#### 4")
    assert to_example({"prompt": "p", "completion": "c"}).response == "c"
    ex = to_example(RECORDS["sharegpt"])
    assert ex.prompt == "User: hi\nAssistant:" and ex.response == "hello" and ex.fmt == "sharegpt"


def test_containers(tmp_path):
    recs = [RECORDS["prompt_response"], RECORDS["gsm8k"]]
    (tmp_path / "list.json").write_text(json.dumps(recs))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": recs}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in recs))
    for name in ("list.json", "wrapped.json", "lines.json"):
        assert load_records(tmp_path / name) == recs, name
    assert load_records(tmp_path / "list.json", limit=1) == recs[:1]


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    recs = [RECORDS["alpaca"], {"instruction": "b", "input": "c", "output": "d"}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    assert load_records(tmp_path / "d.parquet") == recs
    assert load_records(tmp_path / "d.parquet", limit=1) == recs[:1]


def test_file_named_parquet_that_is_not_parquet(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    path = _write_jsonl(tmp_path / "renamed.parquet", [RECORDS["prompt_response"]])
    with pytest.raises(DataError, match=r"renamed\.parquet is not a parquet file.*rename it"):
        load_records(path)


def test_saved_hf_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    recs = [RECORDS["prompt_response"], {"prompt": "x", "response": "y"}]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "single"))
    assert load_records(tmp_path / "single") == recs
    assert load_records(tmp_path / "single", limit=1) == recs[:1]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs),
                          "test": datasets.Dataset.from_list(recs[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd") == recs
    assert load_records(tmp_path / "dd", split="test") == recs[:1]
    with pytest.raises(DataError, match=r"no split 'validation'.*'train', 'test'"):
        load_records(tmp_path / "dd", split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain is a directory but not a saved HF dataset"):
        load_records(tmp_path / "plain")


def test_saved_hf_dataset_dir_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"ds is a directory.*needs the optional package datasets: "
                                        r"pip install 'kd-stack\[data\]'"):
        load_records(tmp_path / "ds")


@pytest.mark.skipif(GSM8K is None, reason="shared/data/gsm8k not present")
def test_gsm8k_real_files(tok):
    for split in ("train", "test"):
        recs = load_records(GSM8K / f"{split}.jsonl", limit=50)
        assert len(recs) == 50 and {detect_format(r) for r in recs} == {"gsm8k"}
    ds = TokenizedDataset(GSM8K / "train.jsonl", tok, 1024, limit=50)
    assert ds.stats.formats == {"gsm8k": 50} and ds.stats.n_examples == 50 and ds.stats.n_truncated == 0
    first = load_records(GSM8K / "train.jsonl", limit=1)[0]
    assert tok.decode(_trained(ds[0])) == first["answer"]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not valid JSON.*fix or delete"):
        load_records(path)
    # the column is the column in that line: 29 is just past "...response": (the value is missing), and the
    # stray comma of the second line is its 16th character
    path.write_text('{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=r"line 1: not valid JSON \(Expecting value at column 29\)"):
        load_records(path)
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a",, "response": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON \(Expecting property name .* at column 16\)"):
        load_records(path)
    path.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: expected a JSON object, got list"):
        load_records(path)
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n "response": }]')
    with pytest.raises(DataError, match=r"bad\.json line 2: not valid JSON"):
        load_records(tmp_path / "bad.json")


def test_malformed_records_name_the_line(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [RECORDS["prompt_response"], {"text": "no known keys"}])
    with pytest.raises(DataError, match=r"d\.jsonl line 2: cannot tell the record format.*\['text'\].*Alpaca"):
        TokenizedDataset(path, tok, 64)
    _write_jsonl(path, [{"prompt": "a", "response": 7}])
    with pytest.raises(DataError, match=r"line 1: field 'response' must be a string, got int"):
        TokenizedDataset(path, tok, 64)
    _write_jsonl(path, [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match="line 1: the conversation has no assistant turn"):
        TokenizedDataset(path, tok, 64)
    _write_jsonl(path, [{"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(DataError, match="role='wizard'"):
        TokenizedDataset(path, tok, 64)


def test_empty_dataset_is_an_error(tmp_path, tok):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}: the dataset is empty"):
            load_records(tmp_path / name)
        with pytest.raises(DataError, match=rf"{name}: the dataset is empty"):
            TokenizedDataset(tmp_path / name, tok, 64)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------------- tokens


def test_prompt_masking(tok):
    ds = _demo_dataset(tok, n=40)
    assert ds.stats.n_truncated == ds.stats.n_dropped == 0
    for item, ex in zip(ds.items, ds.examples):
        n_prompt = len(encode_prompt(ex.prompt, tok))
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids[0] == tok.bos_id and ids[:n_prompt] == encode_prompt(ex.prompt, tok)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # -100 exactly on bos + prompt ...
        assert IGNORE_INDEX not in labels[n_prompt:]  # ... and nowhere else
        assert labels[n_prompt:] == ids[n_prompt:]  # unshifted: labels[i] is the token at i
        assert labels[-1] == tok.eos_id
        assert tok.decode(_trained(item)) == ex.response
        assert _trained(item) == tok.encode(ex.response) + [tok.eos_id]


def test_shift_labels():
    labels = [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 3]
    assert shift_labels(labels) == [IGNORE_INDEX, 5, 6, 3, IGNORE_INDEX]
    t = torch.tensor([labels, labels])
    assert torch.equal(shift_labels(t), torch.tensor([shift_labels(labels)] * 2))
    assert shift_labels(np.array(labels)).tolist() == shift_labels(labels)


def test_truncation_and_dropping(tok):
    ex = Example("Reverse: a b c d\nAnswer:", "d c b a")
    full = tokenize_example(ex, tok, 1000)
    n_prompt = len(encode_prompt(ex.prompt, tok))
    assert not full.truncated and len(full.input_ids) == n_prompt + len(tok.encode(ex.response)) + 1

    cut = tokenize_example(ex, tok, n_prompt + 2)  # cut from the right: keeps 2 response tokens, loses eos
    assert cut.truncated and cut.input_ids == full.input_ids[:n_prompt + 2]
    assert cut.labels == full.labels[:n_prompt + 2] and tok.eos_id not in cut.labels
    assert tokenize_example(ex, tok, n_prompt) is None  # the prompt fills max_len: nothing left to learn

    recs = [{"prompt": ex.prompt, "response": ex.response}, {"prompt": "Reverse: " + "a " * 60, "response": "x"},
            {"prompt": "Add: 1 + 2\nAnswer:", "response": "3 " * 30}]
    ds = TokenizedDataset(recs, tok, n_prompt + 2)
    assert (ds.stats.n_records, ds.stats.n_examples, ds.stats.n_truncated, ds.stats.n_dropped) == (3, 2, 2, 1)
    assert all(len(it["input_ids"]) <= n_prompt + 2 for it in ds.items)
    with pytest.raises(DataError, match="all 1 examples were dropped.*raise max_len"):
        TokenizedDataset(recs[1:2], tok, 8)


def test_chat_plain_template_trains_on_assistant_turns(tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add: 1 + 2"},
                        {"role": "assistant", "content": "3"}, {"role": "user", "content": "Add: 2 + 2"},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "ignored"}]}
    ex = to_example(rec, tok)
    assert [s for s, trainable in ex.as_segments() if trainable] == ["3", "4"]
    assert ex.prompt == "System: Be brief.\nUser: Add: 1 + 2\nAssistant:3\nUser: Add: 2 + 2\nAssistant:"
    assert ex.response == "4"
    t = tokenize_example(ex, tok, 256)
    assert _trained(t.input_ids, t.labels) == tok.encode("3") + tok.encode("4") + [tok.eos_id]
    assert "ignored" not in tok.decode(t.input_ids)
    prompt_ids = encode_prompt(ex, tok)  # what an evaluator generates from: exactly the trained prefix
    assert t.input_ids[:len(prompt_ids)] == prompt_ids
    assert t.input_ids[len(prompt_ids):] == tok.encode("4") + [tok.eos_id]


def test_chat_with_tokenizer_template(tok, tmp_path):
    hf = _hf_with_template(tok, tmp_path / "t", "{{ bos_token }}" + CHAT_TEMPLATE)
    rec = {"messages": [{"role": "user", "content": "Add: 1 + 2"}, {"role": "assistant", "content": "3"},
                        {"role": "user", "content": "Add: 2 + 2"}, {"role": "assistant", "content": "4"}]}
    ex = to_example(rec, hf)
    assert ex.from_template
    assert [s for s, trainable in ex.as_segments() if trainable] == ["3\n", "4\n"]
    assert "".join(s for s, _ in ex.as_segments()) == hf.apply_chat_template(rec["messages"])[len("<s>"):]
    t = tokenize_example(ex, hf, 256)
    assert t.input_ids.count(hf.bos_id) == 1 and t.input_ids[0] == hf.bos_id  # template's bos not doubled
    assert _trained(t.input_ids, t.labels) == hf.encode("3\n") + hf.encode("4\n") + [hf.eos_id]

    # chat_template=false: the plain form even though the tokenizer has a template
    plain = to_example(rec, hf, chat_template="false")
    assert not plain.from_template and plain.prompt.startswith("User: Add: 1 + 2\nAssistant:3\nUser:")


@pytest.mark.parametrize("mode", ["auto", "true", "false", True, False])
@pytest.mark.parametrize("fmt", ["gsm8k", "prompt_response"])
def test_single_turn_records_through_the_chat_template(tok, tmp_path, mode, fmt):
    hf = _hf_with_template(tok, tmp_path / "t", "{{ bos_token }}" + CHAT_TEMPLATE)
    rec = RECORDS[fmt]
    prompt = GSM8K_PROMPT.format(question=rec["question"]) if fmt == "gsm8k" else rec["prompt"]
    response = rec["answer"] if fmt == "gsm8k" else rec["response"]
    templated = mode in ("auto", "true", True)
    if templated:  # a user turn holding the format's prompt, the response as the assistant's reply
        prompt, response = f"### user:\n{prompt}\n### assistant:\n", response + "\n"
    ds = TokenizedDataset([rec], hf, 256, chat_template=mode)
    ex, ids, labels = ds.examples[0], ds[0]["input_ids"].tolist(), ds[0]["labels"].tolist()
    assert (ex.prompt, ex.response, ex.from_template, ex.fmt) == (prompt, response, templated, fmt)
    n_prompt = 1 + len(hf.encode(prompt))  # bos + the prompt part, nothing else masked
    assert ids == [hf.bos_id] + hf.encode(prompt) + hf.encode(response) + [hf.eos_id]
    assert labels == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    # what an evaluator generates from is exactly the untrained prefix, from the Example or its prompt text
    assert encode_prompt(ex, hf) == encode_prompt(ex.prompt, hf) == ids[:n_prompt]


def test_chat_template_true_needs_a_template(tok, tmp_path):
    with pytest.raises(DataError, match=r"data\.chat_template=true but the tokenizer \(sentencepiece:.*"
                                        r"tokenizer\.model\) has no chat template; set data\.chat_template=false"):
        TokenizedDataset([RECORDS["gsm8k"]], tok, 64, chat_template="true")
    with pytest.raises(DataError, match="data.chat_template=true but the tokenizer"):
        to_example(RECORDS["chat"], tok, chat_template="true")
    assert not to_example(RECORDS["chat"], tok).from_template  # auto: plain without a template
    with pytest.raises(DataError, match=r"data\.chat_template='yes' is not one of auto, true, false"):
        TokenizedDataset([RECORDS["gsm8k"]], tok, 64, chat_template="yes")


def test_chat_records_encode_prompt_agrees_in_every_mode(tok, tmp_path):
    hf = _hf_with_template(tok, tmp_path / "t", CHAT_TEMPLATE)
    rec = {"messages": [{"role": "user", "content": "Add: 1 + 2"}, {"role": "assistant", "content": "3"},
                        {"role": "user", "content": "Add: 2 + 2"}, {"role": "assistant", "content": "4"}]}
    for mode in ("auto", "false"):
        ex = to_example(rec, hf, chat_template=mode)
        t = tokenize_example(ex, hf, 256)
        prompt_ids = encode_prompt(ex, hf)
        assert t.input_ids[:len(prompt_ids)] == prompt_ids and t.labels[len(prompt_ids) - 1] == IGNORE_INDEX
        assert _trained(t.input_ids[len(prompt_ids):], t.labels[len(prompt_ids):]) == \
            hf.encode(ex.response) + [hf.eos_id]


def test_chat_template_without_stable_prefixes_trains_final_turn(tok, tmp_path):
    # Like templates that strip reasoning from earlier replies: a reply renders differently once it is no
    # longer the last message, so growing prefixes are not prefixes -> train on the final reply only.
    template = ("{% for m in messages %}### {{ m['role'] }}:\n"
                "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}"
                "\n{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")
    hf = _hf_with_template(tok, tmp_path / "t", template)
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    segments = to_example(rec, hf).as_segments()
    prompt = hf.apply_chat_template(rec["messages"][:3], add_generation_prompt=True)
    assert "(earlier)" in prompt and prompt.endswith("### assistant:\n")
    assert segments == ((prompt, False), (hf.apply_chat_template(rec["messages"])[len(prompt):], True))
    assert segments[1][0].startswith("d")

# ---------------------------------------------------------------------------------------------------- batches


def test_packing(tok):
    ds = _demo_dataset(tok, n=30, max_len=48)
    packed = PackedDataset(ds, 48)
    assert len(packed) < len(ds)
    flat_ids, flat_labels, pos = [], [], []
    for row in packed.items:
        assert len(row["input_ids"]) <= 48
        flat_ids += row["input_ids"].tolist()
        flat_labels += row["labels"].tolist()
        pos += row["position_ids"].tolist()
        shifted = shift_labels(row["labels"].tolist())
        starts = [i for i, p in enumerate(row["position_ids"].tolist()) if p == 0]
        for s in starts[1:]:
            assert shifted[s - 1] == IGNORE_INDEX  # the last token of an example predicts nothing
    assert flat_ids == [i for it in ds.items for i in it["input_ids"].tolist()]  # order and content kept
    expected_pos, expected_labels = [], []
    for it in ds.items:
        expected_pos += list(range(len(it["input_ids"])))
        expected_labels += [IGNORE_INDEX] + it["labels"].tolist()[1:]
    assert pos == expected_pos and flat_labels == expected_labels

    batch = Collator(tok.pad_id, pad_to_multiple_of=16)([packed[0], packed[1]])
    n0, n1 = len(packed[0]["input_ids"]), len(packed[1]["input_ids"])
    assert batch["input_ids"].shape == (2, 48)
    assert batch["position_ids"][0, :n0].tolist() == packed[0]["position_ids"].tolist()
    assert batch["position_ids"][1, n1:].tolist() == list(range(48 - n1))  # padding: a segment of its own
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (48 - n1)


def test_packed_rows_do_not_attend_across_examples(tok):
    """The documented contract: attention_mask=None + restarting position_ids + use_cache=False isolates
    packed examples (with a cache or a 2D mask transformers does not look for packing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    items = sorted(_demo_dataset(tok, n=8).items, key=lambda it: len(it["input_ids"]))[:2]
    packed = PackedDataset(items, 64)
    assert len(packed) == 1
    batch = Collator(tok.pad_id, pad_to_multiple_of=64)([packed[0]])  # padding tail included
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for it in items:
            n = len(it["input_ids"])
            alone = model(input_ids=torch.tensor(it["input_ids"], dtype=torch.long)[None]).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-4, atol=1e-5)
            start += n


def test_packing_masks_first_token_even_without_bos():
    # with no bos (some HF tokenizers) an example may start with a trained token; packing must still mask it
    items = [{"input_ids": np.array(ids, dtype=np.int32), "labels": np.array(ids, dtype=np.int32)}
             for ids in ([5, 6, 7], [8, 9], [10, 11, 12, 13])]
    packed = PackedDataset(items, 6)
    assert [row["input_ids"].tolist() for row in packed.items] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    assert packed[0]["labels"].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert packed[0]["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert items[0]["labels"].tolist() == [5, 6, 7]  # the source dataset is not modified


def test_collate_unpacked(tok):
    ds = _demo_dataset(tok, n=3)
    items = [ds[0], ds[1], ds[2]]
    lens = [len(it["input_ids"]) for it in items]
    batch = Collator(tok.pad_id)(items)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids", "prompt_len"}
    # where each row's response starts: its first trained label
    assert batch.pop("prompt_len").tolist() == [int((it["labels"] != IGNORE_INDEX).argmax()) for it in items]
    assert all(v.dtype == torch.long and v.shape == (3, max(lens)) for v in batch.values())
    for row, (it, n) in enumerate(zip(items, lens)):
        assert batch["input_ids"][row, :n].tolist() == it["input_ids"].tolist()
        assert batch["input_ids"][row, n:].eq(tok.pad_id).all()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lens) - n)
        assert batch["position_ids"][row].tolist() == list(range(max(lens)))
    assert Collator(tok.pad_id, pad_to_multiple_of=8)(items)["input_ids"].shape[1] % 8 == 0


def test_loader_needs_enough_examples(tok):
    ds = _demo_dataset(tok, n=10)
    with pytest.raises(DataError, match="has 10 examples but world_size=4 x batch_size=3 needs at least 12"):
        make_loader(ds, batch_size=3, world_size=4)
    assert len(make_loader(ds, batch_size=5, world_size=2)) == 1


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("pack", [False, True])
def test_loader_resume_is_exact(tok, pack):
    ds = _demo_dataset(tok, n=48)
    kwargs = dict(batch_size=4, rank=1, world_size=2, seed=7, pack=pack)
    reference = _take(make_loader(ds, **kwargs), 20)
    per_epoch = len(make_loader(ds, **kwargs))
    assert 2 <= per_epoch < 7  # so the 7 batches below cross an epoch boundary
    for stop in (7, per_epoch, 2 * per_epoch):  # mid-epoch, and exactly at an epoch's end
        first = make_loader(ds, **kwargs)
        head = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = make_loader(ds, **kwargs)
        resumed.load_state_dict(state)
        assert _same(head + _take(resumed, 20 - stop), reference)
    # each epoch is a new permutation
    assert not _same(reference[:per_epoch], reference[per_epoch:2 * per_epoch])


def test_loader_ranks_and_state_checks(tok):
    ds = _demo_dataset(tok, n=40)
    loaders = [make_loader(ds, batch_size=4, rank=r, world_size=2, seed=1) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 5
    seen = [{tuple(row.tolist()) for b in _take(ld, 5) for row in b["input_ids"]} for ld in loaders]
    assert not seen[0] & seen[1]  # the ranks see disjoint examples within an epoch
    state = loaders[0].state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 40  # 5 batches of 4 on each of 2 ranks
    for change in (dict(seed=2), dict(drop_last=False)):
        other = make_loader(ds, batch_size=4, rank=0, world_size=2, **{"seed": 1, **change})
        key = next(iter(change))
        with pytest.raises(DataError, match=f"setup changed \\({key}: saved {state[key]} vs now {change[key]}\\)"):
            other.load_state_dict(state)
    with pytest.raises(DataError, match="num_samples: saved 40 vs now 39"):
        make_loader(_demo_dataset(tok, n=39), batch_size=4, world_size=2, seed=1).load_state_dict(state)
    same_on_other_rank = make_loader(ds, batch_size=4, rank=1, world_size=2, seed=1)
    same_on_other_rank.load_state_dict(state)  # rank 0's state is valid on every rank
    assert same_on_other_rank.state_dict() == loaders[1].state_dict()


def test_for_loop_is_one_epoch_and_next_never_ends(tok):
    ds = _demo_dataset(tok, n=24)
    loader = make_loader(ds, batch_size=4, seed=2)
    assert len(list(loader)) == len(loader) == 6  # a fresh loader: exactly one epoch, then stops
    assert loader.state_dict()["epoch"] == 0
    again = list(loader)  # the next epoch
    assert len(again) == 6 and loader.epoch == 1
    stream = make_loader(ds, batch_size=4, seed=2)
    assert _same(_take(stream, 12)[6:], again)  # next() rolls over the same epochs


def test_uneven_eval_counts_every_example_once(tok):
    ds = _demo_dataset(tok, n=10)
    trained = []
    for rank in range(3):  # 10 examples over 3 ranks: 4 slots each, 2 of them top-up repeats
        batches = list(make_loader(ds, batch_size=3, rank=rank, world_size=3, drop_last=False))
        assert len(batches) == 2 and sum(len(b["input_ids"]) for b in batches) == 4
        for b in batches:
            for ids, labels in zip(b["input_ids"], b["labels"]):
                if (labels != IGNORE_INDEX).any():
                    trained.append(tuple(ids[ids != tok.pad_id].tolist()))
    assert sorted(trained) == sorted(tuple(it["input_ids"].tolist()) for it in ds.items)
    # the end of the epoch is saved as all 10 examples consumed, not the 12 slots 3 ranks went through
    done = make_loader(ds, batch_size=3, rank=0, world_size=3, drop_last=False)
    list(done)
    assert done.state_dict()["consumed"] == 10


def test_iter_records_locations(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [RECORDS["gsm8k"]] * 2)
    assert [where for where, _ in iter_records(path)] == [f"{path} line 1", f"{path} line 2"]


def test_small_eval_set_smaller_than_one_global_batch(tok):
    ds = _demo_dataset(tok, n=3)
    per_rank = [list(make_loader(ds, batch_size=16, rank=r, world_size=2, drop_last=False)) for r in range(2)]
    assert [len(b) for b in per_rank] == [1, 1]        # equal batch counts: ZeRO-3 ranks stay in step
    counted = sum(int((b["labels"] != IGNORE_INDEX).any(-1).sum()) for bs in per_rank for b in bs)
    assert counted == 3


def _numbered(n):
    """Examples whose first token is their index + 10, to follow them through the loaders."""
    return [{"input_ids": np.array([i + 10, 1], dtype=np.int32), "labels": np.array([i + 10, 1], dtype=np.int32)}
            for i in range(n)]


def _indices(loader, batches):
    return [int(i) - 10 for b in _take(loader, batches) for i in b["input_ids"][:, 0]]


@pytest.mark.parametrize("k", [2, 8])  # batches taken: in the first epoch, in the second
def test_loader_resumes_at_another_world_size(k):
    ds = _numbered(48)
    old = [make_loader(ds, 4, rank, 2, seed=3, pad_id=0) for rank in range(2)]
    per_epoch = len(old[0])
    assert per_epoch == 6
    for ld in old:
        _take(ld, k)
    state = json.loads(json.dumps(old[0].state_dict()))
    assert state == old[1].state_dict()
    assert (state["epoch"], state["consumed"]) == (k // per_epoch, (k % per_epoch) * 8)
    left = per_epoch - k % per_epoch
    rest = Counter(i for ld in old for i in _indices(ld, left))  # the uninterrupted run, to the epoch's end
    assert len(rest) == sum(rest.values()) == 48 - state["consumed"]
    for world, batch in ((1, 8), (4, 2)):  # the same global batch on 1 and on 4 ranks
        new = [make_loader(ds, batch, rank, world, seed=3, pad_id=0) for rank in range(world)]
        for ld in new:
            ld.load_state_dict(state)
        assert Counter(i for ld in new for i in _indices(ld, left)) == rest  # none lost, none repeated
        assert all((ld.epoch, ld.batch_in_epoch) == (state["epoch"], per_epoch) for ld in new)  # epoch used up
    three = make_loader(ds, 4, 0, 3, seed=3, pad_id=0)
    with pytest.raises(DataError, match=rf"{state['consumed']} samples of epoch {state['epoch']} were consumed "
                                        r"\(saved with world_size=2 x batch_size=4\), which is not a multiple of "
                                        r"world_size=3 x batch_size=4 = 12 now"):
        three.load_state_dict(state)


def test_loader_resume_at_an_epoch_end_needs_no_common_divisor():
    ds = _numbered(48)
    old = make_loader(ds, 4, 0, 2, seed=3, pad_id=0)
    _take(old, len(old))
    state = old.state_dict()
    assert state["consumed"] == 48
    five = make_loader(ds, 2, 0, 5, seed=3, pad_id=0)  # 10 per global batch does not divide 48, but nothing is left
    five.load_state_dict(state)
    fresh = make_loader(ds, 2, 0, 5, seed=3, pad_id=0)
    _take(fresh, len(fresh))
    assert _same(_take(five, 3), _take(fresh, 3))  # straight into epoch 1
    ds = _numbered(50)                         # 2 x 4 uses 48 of 50 per epoch
    old = make_loader(ds, 4, 0, 2, seed=3, pad_id=0)
    _take(old, len(old))
    assert old.state_dict()["consumed"] == 48
    four = make_loader(ds, 5, 0, 4, seed=3, pad_id=0)      # 20 per global batch: 2 per epoch, none left after 48
    four.load_state_dict(old.state_dict())
    fresh = make_loader(ds, 5, 0, 4, seed=3, pad_id=0)
    _take(fresh, len(fresh))
    assert _same(_take(four, 2), _take(fresh, 2))


def test_loader_reads_a_state_saved_per_rank_batches():
    # the format before positions were global: batches per rank, with the saving run's world and batch size
    ds = _numbered(48)
    legacy = {"epoch": 1, "batch_in_epoch": 2, "world_size": 2, "batch_size": 4, "seed": 3, "num_samples": 48,
              "drop_last": True}
    one = make_loader(ds, 8, 0, 1, seed=3, pad_id=0)
    one.load_state_dict(legacy)
    assert (one.epoch, one.batch_in_epoch, one.state_dict()["consumed"]) == (1, 2, 16)
