"""train.demo_task: determinism, held-out split, correct answers, short sequences, exact match."""
import json
import re
from collections import Counter

import pytest

from train.demo_task import (SKILLS, demo_texts, exact_match, is_eval_prompt, make_demo_data,
                             make_demo_records)
from train.tokenizer import load_tokenizer, train_sentencepiece


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _solve(prompt: str) -> str:
    """An independent solver for each skill, so a wrong generator answer fails the test."""
    body = prompt.removesuffix("\nAnswer:")
    head, _, rest = body.partition(": ")
    items = rest.split()
    if head == "Reverse":
        return " ".join(items[::-1])
    if head == "Sort":
        return " ".join(str(x) for x in sorted(map(int, items)))
    if head == "Add":
        a, b = re.fullmatch(r"(\d+) \+ (\d+)", rest).groups()
        return str(int(a) + int(b))
    if head == "Next":
        xs = list(map(int, items))
        return str(xs[-1] + (xs[1] - xs[0]))
    if head == "Shift":
        return " ".join("a" if x == "z" else chr(ord(x) + 1) for x in items)
    if head.startswith("Count "):
        return str(items.count(head.split()[1]))
    pairs, query = re.fullmatch(r"(.*)\. What is (\w)\?", body).groups()
    return dict(p.split("=") for p in pairs.split())[query]


def test_same_seed_gives_identical_files(tmp_path):
    a = make_demo_data(tmp_path / "a", n_train=300, n_eval=50, seed=3)
    b = make_demo_data(tmp_path / "b", n_train=300, n_eval=50, seed=3)
    c = make_demo_data(tmp_path / "c", n_train=300, n_eval=50, seed=4)
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() != pc.read_bytes()


def test_eval_is_held_out(tmp_path):
    train, evals = make_demo_data(tmp_path, n_train=1400, n_eval=140, seed=0)
    train_prompts = {r["prompt"] for r in _read(train)}
    eval_prompts = [r["prompt"] for r in _read(evals)]
    assert len(train_prompts) == 1400 and len(set(eval_prompts)) == len(eval_prompts) == 140
    assert not train_prompts & set(eval_prompts)
    assert all(is_eval_prompt(p) for p in eval_prompts)
    assert not any(is_eval_prompt(p) for p in train_prompts)
    # the split is a property of the prompt: another seed's train set never contains these eval prompts
    other_train, _ = make_demo_records(n_train=1400, n_eval=0, seed=1)
    assert not {r["prompt"] for r in other_train} & set(eval_prompts)


def test_records_are_correct_and_balanced():
    train, evals = make_demo_records(n_train=700, n_eval=70, seed=0)
    for split, n in ((train, 700), (evals, 70)):
        counts = Counter(r["skill"] for r in split)
        assert set(counts) == set(SKILLS) and sum(counts.values()) == n
        assert max(counts.values()) - min(counts.values()) <= 1
    for r in train + evals:
        assert r["prompt"].endswith("\nAnswer:") and r["response"] == r["response"].strip()
        assert _solve(r["prompt"]) == r["response"], r


def test_sequences_are_short(tmp_path):
    train, evals = make_demo_data(tmp_path, n_train=700, n_eval=70, seed=0)
    tok = load_tokenizer(train_sentencepiece(demo_texts(train), tmp_path / "tok", vocab_size=512))
    longest = max(2 + len(tok.encode(r["prompt"])) + len(tok.encode(r["response"]))
                  for r in _read(train) + _read(evals))
    assert longest <= 48


@pytest.mark.parametrize("pred, ref, ok", [
    ("b c a d", "b c a d", True),
    ("  b  c a\nd ", "b c a d", True),
    ("432", "432", True),
    ("4 32", "432", False),
    ("B c a d", "b c a d", False),
    ("", "0", False),
    ("432 extra", "432", False),
])
def test_exact_match(pred, ref, ok):
    assert exact_match(pred, ref) is ok
