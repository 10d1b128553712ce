"""A synthetic instruction task for the demo: several small skills with short, exact-match-checkable answers.

Each record is ``{"prompt": "<Skill>: ...\\nAnswer:", "response": "...", "skill": name}``. The skills are
learnable by a model of a few million parameters in a few hundred CPU steps, yet not trivial (they need
attention over the prompt, not a fixed output):

====================  ===========================================  ==============
skill                 prompt                                       response
====================  ===========================================  ==============
reverse               ``Reverse: d a c b\\nAnswer:``                 ``b c a d``
sort                  ``Sort: 4 7 1\\nAnswer:``                      ``1 4 7``
add                   ``Add: 47 + 38\\nAnswer:``                     ``85``
sequence              ``Next: 3 7 11 15\\nAnswer:``                  ``19``
shift                 ``Shift: a c h\\nAnswer:``                     ``b d i``
count                 ``Count x: x y x w x\\nAnswer:``               ``3``
lookup                ``a=3 g=7 c=1. What is g?\\nAnswer:``          ``7``
====================  ===========================================  ==============

The train/eval split is decided by a hash of the prompt, not by the seed, so an eval prompt can never appear
in any train file, whatever seed made either. The same seed gives byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import string
from pathlib import Path
from typing import Callable, Iterator

LETTERS = string.ascii_lowercase
SMALL = LETTERS[:8]   # a-h: copy skills over a small alphabet stay learnable in a few CPU minutes
EVAL_BUCKETS = 5  # one prompt in EVAL_BUCKETS hashes to the eval side


def _letters(rng: random.Random, lo: int, hi: int, alphabet: str = SMALL) -> list[str]:
    return [rng.choice(alphabet) for _ in range(rng.randint(lo, hi))]


def _reverse(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 2, 4)
    return f"Reverse: {' '.join(xs)}\nAnswer:", " ".join(reversed(xs))


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    return f"Sort: {' '.join(map(str, xs))}\nAnswer:", " ".join(map(str, sorted(xs)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"Add: {a} + {b}\nAnswer:", str(a + b)


def _sequence(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(0, 99), rng.randint(1, 9)
    terms = [start + k * step for k in range(4)]
    return f"Next: {' '.join(map(str, terms))}\nAnswer:", str(start + 4 * step)


def _shift(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 2, 4)
    shifted = [LETTERS[(LETTERS.index(x) + 1) % 26] for x in xs]
    return f"Shift: {' '.join(xs)}\nAnswer:", " ".join(shifted)


def _count(rng: random.Random) -> tuple[str, str]:
    target = rng.choice("xyz")
    xs = [rng.choice("xyzw") for _ in range(rng.randint(5, 9))]
    return f"Count {target}: {' '.join(xs)}\nAnswer:", str(xs.count(target))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(SMALL, 3)
    values = {k: rng.randint(0, 9) for k in keys}
    query = rng.choice(keys)
    pairs = " ".join(f"{k}={v}" for k, v in values.items())
    return f"{pairs}. What is {query}?\nAnswer:", str(values[query])


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "sort": _sort, "add": _add, "sequence": _sequence,
    "shift": _shift, "count": _count, "lookup": _lookup,
}


def is_eval_prompt(prompt: str) -> bool:
    """The held-out side of a prompt: fixed by its hash, independent of seed and of the other records."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % EVAL_BUCKETS == 0


def _quotas(n: int) -> list[int]:
    k = len(SKILLS)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def make_demo_records(n_train: int = 4000, n_eval: int = 350, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records, each split balanced across skills and free of duplicate prompts."""
    rng = random.Random(seed)
    train: list[dict] = []
    evals: list[dict] = []
    for (name, fn), q_train, q_eval in zip(SKILLS.items(), _quotas(n_train), _quotas(n_eval)):
        seen: set[str] = set()
        got_train: list[dict] = []
        got_eval: list[dict] = []
        budget = 200 * (q_train + q_eval) + 1000  # every skill's space is far larger; this only stops a bug
        while len(got_train) < q_train or len(got_eval) < q_eval:
            budget -= 1
            if budget < 0:
                raise RuntimeError(f"demo skill {name!r} could not produce {q_train}+{q_eval} distinct prompts")
            prompt, response = fn(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            side = got_eval if is_eval_prompt(prompt) else got_train
            if len(side) < (q_eval if side is got_eval else q_train):
                side.append({"prompt": prompt, "response": response, "skill": name})
        train += got_train
        evals += got_eval
    rng.shuffle(train)  # mixed skills within every batch
    return train, evals


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def make_demo_data(out_dir: str | os.PathLike, n_train: int = 4000, n_eval: int = 350,
                   seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = make_demo_records(n_train, n_eval, seed)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, evals)
    return train_path, eval_path


def demo_texts(path: str | os.PathLike) -> Iterator[str]:
    """Texts to train the demo tokenizer on: each record as the model sees it, prompt then response."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                yield f"{r['prompt']} {r['response']}"


def normalize_answer(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping and collapsing whitespace (case and punctuation count)."""
    return normalize_answer(prediction) == normalize_answer(reference)
