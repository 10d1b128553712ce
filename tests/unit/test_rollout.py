"""train.rollout without engines: the replay buffer, where each micro-batch's responses come from (off, gkd,
distillm as docs/methods.md defines it, always), DistiLLM's threshold phi, checkpoint round trips, the
dataset-item form of student samples, and ``Rollout.next`` with a stub student."""
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kd.reduce import IGNORE_INDEX
from train.config import load_config
from train.data import Collator
from train.rollout import SOURCES, ReplayBuffer, Rollout, as_items, prompts_of, sample

PAD, EOS = 0, 2
BASE = ["model.student=demo-student", "model.teacher=demo-teacher", "data.train=x.jsonl", "data.eval=y.jsonl",
        "data.max_len=64", "onpolicy.max_new_tokens=8", "train.eval_every=10"]


def config(mode="distillm", *overrides):
    return load_config(None, BASE + [f"onpolicy.mode={mode}", *overrides])


def make(mode="distillm", *overrides, dp_rank=0):
    sp = SimpleNamespace(dp_rank=dp_rank, rank=0, size=1, group=None)
    return Rollout(config(mode, *overrides), student=object(), sp=sp, collate=Collator(PAD), pad_id=PAD, eos_id=EOS)


def fill(rollout, n=None):
    """Put ``n`` (default: capacity) distinct samples into the buffer."""
    n = rollout.buffer.capacity if n is None else n
    rollout.buffer.push([[1, 100 + i] for i in range(n)], [[200 + i, EOS] for i in range(n)])


# --- the replay buffer ------------------------------------------------------------------------


def test_buffer_is_fifo_with_capacity():
    buf = ReplayBuffer(3)
    assert len(buf) == 0 and not buf.full
    buf.push([[1], [2]], [[10], [20]])
    assert len(buf) == 2 and not buf.full
    buf.push([[3], [4]], [[30], [40]])
    assert len(buf) == 3 and buf.full
    assert buf.items == [([2], [20]), ([3], [30]), ([4], [40])]       # the oldest went first
    buf.push([[5], [6], [7], [8]], [[50], [60], [70], [80]])           # more than the capacity at once
    assert buf.items == [([6], [60]), ([7], [70]), ([8], [80])]


def test_buffer_sample_without_replacement_and_reproducible():
    buf = ReplayBuffer(10)
    buf.push([[i] for i in range(10)], [[100 + i] for i in range(10)])
    prompts, responses = buf.sample(6, torch.Generator().manual_seed(3))
    assert len(prompts) == len(responses) == 6
    assert len({p[0] for p in prompts}) == 6                           # no repeats
    assert all(r[0] == p[0] + 100 for p, r in zip(prompts, responses))  # pairs stay together
    again = buf.sample(6, torch.Generator().manual_seed(3))
    assert again == (prompts, responses)
    other = [buf.sample(6, torch.Generator().manual_seed(s))[0] for s in range(4, 9)]
    assert any(o != prompts for o in other)                             # the generator decides
    g = torch.Generator().manual_seed(3)                                # one generator moves on
    assert buf.sample(6, g) == (prompts, responses) and buf.sample(6, g) != (prompts, responses)


def test_buffer_sample_repeats_when_fewer_than_n():
    buf = ReplayBuffer(10)
    buf.push([[i] for i in range(3)], [[100 + i] for i in range(3)])
    prompts, responses = buf.sample(8, torch.Generator().manual_seed(0))
    assert len(prompts) == len(responses) == 8
    assert sorted({p[0] for p in prompts}) == [0, 1, 2]                 # every sample once, then repeats
    assert sorted(p[0] for p in prompts[:3]) == [0, 1, 2]
    assert all(r[0] == p[0] + 100 for p, r in zip(prompts, responses))
    assert buf.sample(8, torch.Generator().manual_seed(0)) == (prompts, responses)


# --- where the responses come from ------------------------------------------------------------


def test_off_never_draws():
    r = make("off")
    state = r.draws.get_state().clone()
    assert not r.active
    assert all(r.source(p) == "dataset" for p in np.linspace(0, 1, 50))
    assert torch.equal(r.draws.get_state(), state)          # the generator did not move
    assert r.stats() == {}


def test_always_is_fresh():
    r = make("always")
    assert r.active and all(r.source(p) == "fresh" for p in np.linspace(0, 1, 200))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75, 1.0])
def test_gkd_realises_the_fraction_and_agrees_across_objects(fraction):
    a, b = make("gkd", f"onpolicy.fraction={fraction}"), make("gkd", f"onpolicy.fraction={fraction}", dp_rank=3)
    n = 4000
    seq_a = [a.source(i / n) for i in range(n)]
    seq_b = [b.source(i / n) for i in range(n)]
    assert seq_a == seq_b               # every rank (any data-parallel rank) draws the same decisions
    assert set(seq_a) <= {"fresh", "dataset"}
    realised = seq_a.count("fresh") / n
    assert realised == pytest.approx(fraction, abs=4 * (fraction * (1 - fraction) / n) ** 0.5 + 1e-12)
    # the decision is r < fraction on the generator seeded by train.seed
    g = torch.Generator().manual_seed(0)
    assert seq_a == ["fresh" if float(torch.rand((), generator=g)) < fraction else "dataset" for _ in range(n)]


def test_gkd_other_seed_other_sequence():
    a, b = make("gkd"), make("gkd", "train.seed=1")
    assert [a.source(0) for _ in range(64)] != [b.source(0) for _ in range(64)]


def distillm_expected(r, phi, progress, full, ratio):
    """docs/methods.md, DistiLLM's adaptive off-policy schedule, written out independently."""
    fresh_below = phi * (1 - progress) if ratio == "decreasing" else phi
    if r < fresh_below or (r < phi and not full):
        return "fresh"
    if r < phi:
        return "replay"
    return "dataset"


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("progress", [0.0, 0.25, 0.7, 1.0])
@pytest.mark.parametrize("full", [False, True])
def test_distillm_decisions_follow_methods_md(phi, progress, full):
    r = make("distillm", "onpolicy.buffer_size=4")
    r.phi = phi
    fill(r, 4 if full else 3)
    assert r.buffer.full == full
    twin = torch.Generator().manual_seed(0)          # the draws: one generator seeded by train.seed
    got, want = [], []
    for _ in range(400):
        x = float(torch.rand((), generator=twin))
        got.append(r.source(progress))
        want.append(distillm_expected(x, phi, progress, full, "decreasing"))
    assert got == want
    # the regions are non-empty where methods.md says they are
    fresh_share = phi * (1 - progress) if full else phi
    assert ("fresh" in got) == (fresh_share > 0.02)
    assert ("replay" in got) == (full and phi - phi * (1 - progress) > 0.02)
    assert ("dataset" in got) == (phi < 0.98)


def test_distillm_concrete_draws(monkeypatch):
    """A few hand-checked decisions: phi 0.5 at progress 0.5 (fresh below 0.25, replay below 0.5)."""
    r = make("distillm", "onpolicy.buffer_size=2")
    r.phi = 0.5
    values = iter([])
    monkeypatch.setattr(torch, "rand", lambda *a, generator=None: torch.tensor(next(values)))   # r values fed in
    values = iter([0.1, 0.3, 0.6])
    assert [r.source(0.5) for _ in range(3)] == ["fresh", "fresh", "dataset"]   # buffer not full
    fill(r)
    values = iter([0.1, 0.3, 0.6, 0.2499, 0.25, 0.4999, 0.5])
    assert [r.source(0.5) for _ in range(7)] == ["fresh", "replay", "dataset", "fresh", "replay", "replay",
                                                 "dataset"]
    values = iter([0.1, 0.3, 0.49])
    assert [r.source(0.0) for _ in range(3)] == ["fresh"] * 3     # at the start every on-policy draw is fresh
    values = iter([0.0, 0.3, 0.49])
    assert [r.source(1.0) for _ in range(3)] == ["replay"] * 3    # at the end every one is replayed


def test_distillm_phi_zero_is_all_dataset():
    r = make("distillm")
    assert r.phi == 0.0                              # init_threshold's default
    assert {r.source(p) for p in np.linspace(0, 1, 300)} == {"dataset"}


def test_distillm_replay_ratio_decreasing_vs_constant():
    """decreasing: the fresh share of the on-policy draws falls with progress; constant: it does not."""
    def shares(ratio, progress, n=3000):
        r = make("distillm", "onpolicy.buffer_size=2", f"onpolicy.replay_ratio={ratio}")
        r.phi = 0.6
        fill(r)
        got = [r.source(progress) for _ in range(n)]
        return {s: got.count(s) / n for s in SOURCES}
    early, late = shares("decreasing", 0.1), shares("decreasing", 0.9)
    assert early["fresh"] == pytest.approx(0.6 * 0.9, abs=0.04)
    assert late["fresh"] == pytest.approx(0.6 * 0.1, abs=0.04)
    assert late["replay"] == pytest.approx(0.6 * 0.9, abs=0.04)
    for s in (early, late):
        assert s["dataset"] == pytest.approx(0.4, abs=0.04)
    c_early, c_late = shares("constant", 0.1), shares("constant", 0.9)
    assert c_early == c_late                          # the same draws, the same decisions: progress is ignored
    assert c_early["dataset"] == pytest.approx(0.4, abs=0.04)
    assert c_early["fresh"] + c_early["replay"] == pytest.approx(0.6, abs=0.04)


@pytest.mark.parametrize("ratio, progress, fresh, fresh_tol, replay", [
    ("constant", 0.5, 0.3, 0.04, 0.3), ("increasing", 0.25, 0.15, 0.03, 0.45)])
def test_distillm_constant_and_increasing_replay_ratios_as_in_distillm(ratio, progress, fresh, fresh_tol, replay):
    """DistiLLM's finetune.py: fresh below phi / 2 (constant) or phi * progress (increasing)."""
    r = make("distillm", "onpolicy.buffer_size=2", f"onpolicy.replay_ratio={ratio}")
    r.phi = 0.6
    fill(r)
    got = [r.source(progress) for _ in range(3000)]
    assert got.count("fresh") / 3000 == pytest.approx(fresh, abs=fresh_tol)
    assert got.count("replay") / 3000 == pytest.approx(replay, abs=0.04)


# --- DistiLLM's threshold ---------------------------------------------------------------------


def test_on_eval_raises_phi_on_a_rise_of_at_least_eps():
    r = make("distillm", "onpolicy.loss_eps=0.1", "onpolicy.threshold_step=0.3", "onpolicy.val_metric=eval_forward_kl")
    assert r.phi == 0.0 and r.ref_loss is None
    r.on_eval({"eval_forward_kl": 2.0, "eval_loss": 9.0})
    assert r.phi == 0.0 and r.ref_loss == 2.0                    # the first call sets the reference only
    r.on_eval({"eval_forward_kl": 2.09})
    assert r.phi == 0.0 and r.ref_loss == 2.0                    # a smaller rise changes nothing
    r.on_eval({"eval_forward_kl": 1.5})
    assert r.phi == 0.0 and r.ref_loss == 2.0                    # nor does a fall
    r.on_eval({"eval_forward_kl": 2.1})
    assert r.phi == pytest.approx(0.3) and r.ref_loss == 2.1     # >= ref + eps: phi rises, a new reference
    r.on_eval({"eval_forward_kl": 2.15})
    assert r.phi == pytest.approx(0.3) and r.ref_loss == 2.1     # measured from the new reference
    for loss in (2.3, 2.5, 2.7, 2.9):
        r.on_eval({"eval_forward_kl": loss})
    assert r.phi == 1.0 and r.ref_loss == 2.9                    # capped at 1


def test_on_eval_default_metric_is_the_student_nll_and_a_missing_key_is_named():
    r = make("distillm")                                         # DistiLLM's finetune.py: the dev-set loss
    r.on_eval({"eval_student_nll": 1.0, "eval_forward_kl": 5.0})
    r.on_eval({"eval_student_nll": 1.2, "eval_forward_kl": 0.0})
    assert r.ref_loss == 1.2 and r.phi == pytest.approx(0.1)
    with pytest.raises(KeyError) as e:
        r.on_eval({"eval_forward_kl": 1.0, "eval_acc": 0.5})
    assert "eval_student_nll" in str(e.value) and "eval_acc, eval_forward_kl" in str(e.value)


def test_on_eval_ignored_outside_distillm():
    r = make("gkd")
    r.on_eval({})                                                # no val_metric needed
    assert r.phi == 0.0 and r.ref_loss is None


# --- checkpoints --------------------------------------------------------------------------------


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def drive(r, steps, progress=0.5, batch=3):
    """Decisions and the replayed samples of ``steps`` micro-batches, pushing fake fresh samples."""
    out = []
    for i in range(steps):
        src = r.source(progress)
        r.counts[src] += 1
        if src == "fresh":
            k = len(r.buffer) + i * 1000
            r.buffer.push([[1, k + j] for j in range(batch)], [[5, k + j, EOS] for j in range(batch)])
            out.append((src, None))
        elif src == "replay":
            out.append((src, r.buffer.sample(batch, r.replay)))
        else:
            out.append((src, None))
    return out


def test_state_round_trip_continues_the_same_decisions_and_replays():
    a = make("distillm", "onpolicy.buffer_size=7")
    a.on_eval({"eval_student_nll": 1.0})
    a.on_eval({"eval_student_nll": 1.5})
    a.phi = 0.7                                      # plenty of fresh and replayed micro-batches
    drive(a, 20)
    assert a.buffer.full
    with a._rng():                                   # a sampling stream that has moved
        torch.rand(5)
    state, rank_state = roundtrip(a.state_dict()), roundtrip(a.rank_state_dict())
    b = make("distillm", "onpolicy.buffer_size=7")
    b.load_state_dict(state, rank_state)
    assert (b.phi, b.ref_loss, b.counts) == (a.phi, a.ref_loss, a.counts)
    assert b.buffer.items == a.buffer.items
    want, got = drive(a, 40), drive(b, 40)
    assert got == want
    assert {s for s, _ in want} == {"fresh", "replay", "dataset"}
    with a._rng():
        x = torch.rand(5)
    with b._rng():
        y = torch.rand(5)
    assert torch.equal(x, y)                         # the sampling stream continues too
    # a fresh object without the state draws differently
    c = make("distillm", "onpolicy.buffer_size=7")
    c.phi = 0.7
    assert [s for s, _ in drive(c, 40)] != [s for s, _ in want]


def test_load_without_rank_state_restarts_sampling_and_empties_buffer():
    a = make("distillm", "onpolicy.buffer_size=4")
    a.phi = 0.5
    drive(a, 10)
    b = make("distillm", "onpolicy.buffer_size=4")
    b.load_state_dict(roundtrip(a.state_dict()), None)          # another world size
    assert len(b.buffer) == 0 and b.sampling is None and b.phi == 0.5
    assert torch.equal(b.draws.get_state(), a.draws.get_state())    # the shared draws continue
    assert b.replay.get_state().equal(torch.Generator().manual_seed(b.seed).get_state())   # from its seed
    c = make("distillm", "onpolicy.buffer_size=4")
    c.phi = 0.5
    assert [b.source(0.2) for _ in range(30)] != [c.source(0.2) for _ in range(30)]   # not from the start


def test_sampling_stream_leaves_the_global_rng_alone_and_differs_per_replica():
    r0, r1 = make("gkd"), make("gkd", dp_rank=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with r0._rng():
        a0 = torch.rand(4)
    with r1._rng():
        a1 = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a0, a1)
    with r0._rng():
        b0 = torch.rand(4)
    assert not torch.equal(a0, b0)                               # the stream moves on between calls
    torch.manual_seed(r0.seed)
    assert torch.equal(torch.cat([a0, b0]), torch.rand(8))       # one stream seeded per replica


# --- dataset items of student samples -----------------------------------------------------------


PROMPTS = [[1, 11, 12, 13], [1, 21], [1, 31, 32]]
RESPONSES = [[41, 42, EOS], [51, 52, 53, 54, EOS], [61]]


def test_as_items_and_collate():
    items = as_items(PROMPTS, RESPONSES)
    for it, p, r in zip(items, PROMPTS, RESPONSES):
        assert it["input_ids"].tolist() == p + r
        assert it["labels"].tolist() == [IGNORE_INDEX] * len(p) + r        # unshifted; prompt not trained
        assert int(it["prompt_len"]) == len(p)
    batch = Collator(PAD)(items)
    assert batch["input_ids"].shape == (3, 7)
    assert batch["prompt_len"].tolist() == [4, 2, 3]
    assert batch["input_ids"][1].tolist() == [1, 21, 51, 52, 53, 54, EOS]
    assert batch["input_ids"][2].tolist() == [1, 31, 32, 61, PAD, PAD, PAD]
    assert batch["labels"][2].tolist() == [IGNORE_INDEX] * 3 + [61] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert prompts_of(batch) == PROMPTS


def test_prompts_of_a_dataset_batch():
    """Loader items: int32 arrays, labels -100 on the prompt."""
    items = [{"input_ids": np.array(p + r, dtype=np.int32),
              "labels": np.array([IGNORE_INDEX] * len(p) + r, dtype=np.int32), "prompt_len": np.int64(len(p))}
             for p, r in zip(PROMPTS, RESPONSES)]
    assert prompts_of(Collator(PAD, pad_to_multiple_of=4)(items)) == PROMPTS


# --- Rollout.next with a stub student ---------------------------------------------------------


def loader_of(n_batches):
    batches = []
    for b in range(n_batches):
        prompts = [[1, 100 * b + 10 * i + 1, 100 * b + 10 * i + 2][: 2 + i % 2] for i in range(3)]
        responses = [[7, 8, 9, EOS][: 2 + i] for i in range(3)]
        batches.append(Collator(PAD)(as_items(prompts, responses)))
    return batches


def test_next_fresh_replay_dataset(monkeypatch):
    r = make("distillm", "onpolicy.buffer_size=6")
    calls = []

    def generate(prompts):
        calls.append(prompts)
        return [[300 + len(calls), 40 + i] + [EOS] * (i % 2) for i in range(len(prompts))]
    monkeypatch.setattr(r, "_generate", generate)
    plan = iter(["fresh", "dataset", "fresh", "replay", "replay"])
    monkeypatch.setattr(r, "source", lambda progress: next(plan))
    batches = loader_of(5)
    loader = iter(batches)

    b, src = r.next(loader, 0.0)                            # fresh: the loader's prompts, the student's responses
    assert src == "fresh" and calls == [prompts_of(batches[0])]
    want = [p + [301, 40 + i] + [EOS] * (i % 2) for i, p in enumerate(prompts_of(batches[0]))]
    assert [row[: len(w)].tolist() for row, w in zip(b["input_ids"], want)] == want
    assert prompts_of(b) == prompts_of(batches[0])
    for row, lab, p, w in zip(b["input_ids"], b["labels"], prompts_of(batches[0]), want):
        assert lab[: len(p)].tolist() == [IGNORE_INDEX] * len(p)
        assert lab[len(p): len(w)].tolist() == w[len(p):]
        assert (lab[len(w):] == IGNORE_INDEX).all() and (row[len(w):] == PAD).all()
    assert len(r.buffer) == 3 and r.buffer.items[0] == (prompts_of(batches[0])[0], [301, 40])

    b, src = r.next(loader, 0.0)                            # dataset: the loader's batch itself
    assert src == "dataset" and b is batches[1] and len(calls) == 1

    r.next(loader, 0.0)                                     # fresh again: 6 samples, the buffer is full
    assert len(r.buffer) == 6 and r.buffer.full
    pool = list(r.buffer.items)
    for _ in range(2):
        b, src = r.next(loader, 0.0)                        # replay: samples from the buffer, no generation
        assert src == "replay" and len(calls) == 2
        got = list(zip(prompts_of(b), [lab[lab != IGNORE_INDEX].tolist() for lab in b["labels"]]))
        assert len(got) == 3 and all(g in pool for g in got)
        assert len(set(map(str, got))) == 3                 # without replacement
        assert r.buffer.items == pool                       # replay does not push
    assert r.counts == {"dataset": 1, "fresh": 2, "replay": 2}
    stats = r.stats()
    assert stats["onpolicy_fraction"] == pytest.approx(4 / 5)
    assert stats["replay_fraction"] == pytest.approx(2 / 5) and stats["buffer"] == 6
    assert stats["sampled_len"] == pytest.approx((2 + 3 + 2) * 2 / 6)
    assert "sampled_len" not in r.stats()                   # reset after each step's log


def test_next_source_draws_once_per_micro_batch(monkeypatch):
    """gkd end to end through the real ``source``: the decisions equal r < fraction on the twin generator."""
    r = make("gkd", "onpolicy.fraction=0.5")
    monkeypatch.setattr(r, "_generate", lambda prompts: [[99, EOS] for _ in prompts])
    twin = torch.Generator().manual_seed(0)
    batches = loader_of(12)
    loader = iter(batches)
    for k in range(12):
        want = "fresh" if float(torch.rand((), generator=twin)) < 0.5 else "dataset"
        b, src = r.next(loader, k / 12)
        assert src == want
        if src == "dataset":
            assert b is batches[k]
        else:
            assert prompts_of(b) == prompts_of(batches[k])
            assert [lab[lab != IGNORE_INDEX].tolist() for lab in b["labels"]] == [[99, EOS]] * 3


# --- sample(): padding and cutting of HF generate's output -------------------------------------


class FakeLM(torch.nn.Module):
    def __init__(self, continuation):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuation, self.seen = continuation, {}
        self.generation_config = None       # sample() swaps in an empty one for the call

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus, logits_processor=()):
        self.seen = dict(input_ids=input_ids, attention_mask=attention_mask, config=generation_config,
                         logits_processor=list(logits_processor))
        return torch.cat([input_ids, torch.tensor(self.continuation)], 1)


def test_sample_left_pads_and_cuts_after_eos_and_at_max_len():
    lm = FakeLM([[5, EOS, 6, 7], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    prompts = [[1, 2, 3], [1], [1, 2]]
    out = sample(lm, prompts, max_new_tokens=4, pad_id=PAD, eos_id=EOS, max_len=6, temperature=0.7, top_p=0.9)
    assert lm.seen["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 1], [PAD, 1, 2]]
    assert lm.seen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    cfg = lm.seen["config"]
    assert cfg.do_sample and cfg.temperature == 0.7 and cfg.top_p == 0.9 and cfg.max_new_tokens == 4
    assert out == [[5, EOS],            # EOS kept, the rest dropped
                   [5, 6, 7, 8],        # no EOS: all of it (1 + 4 <= 6)
                   [EOS]]
    short = sample(FakeLM([[5, 6, 7, 8]]), [[1, 2, 3, 4]], max_new_tokens=4, pad_id=PAD, eos_id=EOS, max_len=6)
    assert short == [[5, 6]]            # prompt + sample fits in max_len


def test_stop_ids_take_a_released_models_end_of_turn_but_not_a_derived_config():
    from transformers import GenerationConfig

    from train.rollout import stop_ids
    released = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[1, 107]))   # Gemma-2-it's
    assert stop_ids(released, 1) == [1, 107]
    derived = SimpleNamespace(generation_config=GenerationConfig.from_dict({"eos_token_id": 2, "_from_model_config": True}))
    assert stop_ids(derived, 3) == [3]                       # a random init's default id 2 is not this tokenizer's EOS
    assert stop_ids(None, 3) == [3]


def test_sample_stops_at_any_stop_id_and_samples_only_the_shared_vocabulary():
    lm = FakeLM([[5, 107, 6, 7], [5, EOS, 7, 8]])
    out = sample(lm, [[1], [1]], max_new_tokens=4, pad_id=PAD, eos_id=[EOS, 107], max_len=16, vocab_size=50)
    assert out == [[5, 107], [5, EOS]]
    assert lm.seen["config"].eos_token_id == [EOS, 107]
    (vocab,) = lm.seen["logits_processor"]
    scores = vocab(None, torch.zeros(2, 64))
    assert torch.isinf(scores[:, 50:]).all() and (scores[:, :50] == 0).all()
