"""Generation from the ZeRO-3 student on 2 deepspeed CPU ranks (``train.rollout`` through
``Engine.for_generation``), checked against plain HF ``generate`` on the same weights in this process:

- greedy tokens are identical, gathered once per call and layer by layer (``layerwise``, synced), with
  other prompts of other lengths on each rank (left padding, which the reference checks changes nothing);
- the gathered mode all-gathers once per call: the number of all-gathers does not grow with the number
  of new tokens, and ``generate`` itself gathers nothing, while the layerwise mode gathers on every token;
- sampling through ``Rollout`` (mode always) is reproducible across launches and across a save/restore
  of its state, differs between data-parallel ranks, and leaves the training RNG alone.

Two launches of ``rollout_worker.py`` (12-15 s each) hold every check; the tests compare their JSON. The
last test (one process): a checkpoint's own generation defaults (repetition penalty, n-gram bans) do not
shape the samples.
"""
import json

import pytest
import torch

from .conftest import tiny_llama
from .launch import run_deepspeed

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("rollout")
    spec = tiny_llama(32, 2, 128)
    spec.pop("model_type")
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(**spec))
    with torch.no_grad():         # a wider margin between the top logits (entropy stays ~4.2 of 4.85 nats)
        student.lm_head.weight *= 10
    student.save_pretrained(work / "student")
    for phase in ("first", "second"):
        run_deepspeed("tests/dist/rollout_worker.py", work, phase, nproc=2, timeout=300,
                      env={"TRANSFORMERS_VERBOSITY": "error"})
    return work, *(json.loads((work / f"{phase}.json").read_text()) for phase in ("first", "second"))


def test_greedy_under_zero3_equals_plain_generate(runs):
    """Both generation modes give exactly the tokens of ``rollout.sample`` on the unpartitioned model
    (loaded from the HF directory the ranks loaded), batch by batch as each rank ran it."""
    from transformers import LlamaForCausalLM

    from train.rollout import sample

    work, first, _ = runs
    model = LlamaForCausalLM.from_pretrained(work / "student", dtype=torch.float32, attn_implementation="sdpa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # as in the ranks
    try:
        for rank in first:
            prompts = rank["prompts"]
            assert len({len(p) for p in prompts}) == len(prompts)        # left padding on every row but one
            reference = sample(model, prompts, greedy=True, **rank["greedy_args"])
            assert all(len(r) > 1 for r in reference)
            # left padding changes nothing: each row is what its prompt gives alone
            assert reference == [sample(model, [p], greedy=True, **rank["greedy_args"])[0] for p in prompts]
            assert rank["greedy_gathered"] == reference, rank["rank"]
            assert rank["greedy_layerwise"] == reference, rank["rank"]
    finally:
        torch.set_num_threads(threads)
    assert first[0]["prompts"] != first[1]["prompts"]


def test_zero3_generation_gathers_once_per_call(runs):
    """All-gathers of one ``for_generation`` + ``sample`` call of 4 and of 12 new tokens: the same
    number gathered (entering the context: one gather of every parameter), none inside ``generate``;
    layerwise, every token's forward gathers again."""
    _, first, _ = runs
    for rank in first:
        c = rank["gathers"]
        assert c["gathered_4"]["call"] > 0
        assert c["gathered_4"] == c["gathered_12"], c
        assert c["gathered_4"]["generate"] == 0, c
        assert 0 < c["layerwise_4"]["generate"] < c["layerwise_12"]["generate"], c
        assert c["layerwise_12"]["generate"] >= 3 * c["gathered_12"]["call"], c     # >= one per token and parameter


def _responses(draws):
    return [d["responses"] for d in draws]


def test_sampling_is_seeded_per_rank_restorable_and_leaves_the_training_rng(runs):
    """Three micro-batches of the same prompts on both ranks, mode always: the same samples in a second
    launch; after restoring the state saved after the first draw (in the same process, and from a file in
    the second launch) the next two draws are those of the uninterrupted run; the ranks' samples differ;
    ``torch.get_rng_state()`` is the same before and after every draw."""
    _, first, second = runs
    for a, b in zip(first, second):
        draws = a["uninterrupted"]
        assert [d["source"] for d in draws + b["uninterrupted"]] == ["fresh"] * 6
        assert all(d["rng_unchanged"] for d in draws + b["uninterrupted"] + a["restored_in_process"]
                   + b["restored_from_file"])
        assert a["training_rng_unchanged"] and b["training_rng_unchanged"]
        assert _responses(b["uninterrupted"]) == _responses(draws)                     # another launch
        assert _responses(a["restored_in_process"]) == _responses(draws[1:])
        assert _responses(b["restored_from_file"]) == _responses(draws[1:])
        samples = _responses(draws)
        assert samples[0] != samples[1] != samples[2]                                  # the stream moves on
    assert _responses(first[0]["uninterrupted"]) != _responses(first[1]["uninterrupted"])   # per-rank streams


def test_sample_ignores_the_checkpoint_generation_defaults(runs, tmp_path):
    """``sample`` draws from the model's own distribution (temperature / top_p / greedy only): a student
    directory whose generation_config.json sets a repetition penalty and an n-gram ban (as released chat
    models' do) gives the same greedy tokens as without it. One process, no launch."""
    import shutil

    from transformers import LlamaForCausalLM

    from train.rollout import sample

    work, first, _ = runs
    shutil.copytree(work / "student", tmp_path / "student")
    path = tmp_path / "student" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "repetition_penalty": 3.0, "no_repeat_ngram_size": 2}))
    rank = first[0]                # its greedy tokens equal plain generate's without the file's settings
    released = LlamaForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32, attn_implementation="sdpa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sample(released, rank["prompts"], greedy=True, **rank["greedy_args"]) == rank["greedy_gathered"]
    finally:
        torch.set_num_threads(threads)
