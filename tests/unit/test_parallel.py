"""Sequence parallelism pieces that need no second rank: the sharder, the global mask rebuilt from
position ids (against a loop over its definition, and against transformers' own masks), and the
model checks. The multi-rank equality lives in tests/dist/test_sp.py."""
import itertools

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, MistralForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from train.data import Collator, PackedDataset, shift_labels
from train.parallel import (ParallelError, attention_window, check_model, check_world, flash_varlen_kwargs,
                            global_attention_mask, shard)


def packed_batch(lengths_per_row, max_len, multiple):
    """Rows packed from examples of the given lengths, through the real PackedDataset + Collator."""
    items, tok = [], 1
    for lengths in lengths_per_row:
        for n in lengths:
            ids = torch.arange(tok, tok + n).numpy()
            items.append({"input_ids": ids, "labels": ids.copy()})
            tok += n
    packed = PackedDataset(items, max_len)
    return Collator(pad_id=0, pad_to_multiple_of=multiple)([packed[i] for i in range(len(packed))])


def test_shard_shifts_before_cutting_and_keeps_global_positions():
    batch = packed_batch([[5, 6], [9]], max_len=12, multiple=4)
    T = batch["input_ids"].shape[1]
    assert T % 4 == 0
    whole = shard(batch, 0, 1)
    assert torch.equal(whole["targets"], shift_labels(batch["labels"])) and "labels" not in whole
    assert torch.equal(whole["attention_mask"], batch["attention_mask"])        # padded rows keep their mask
    assert "attention_mask" not in shard(batch, 0, 1, packed=True)              # packed rows follow positions
    pieces = [shard(batch, r, 4) for r in range(4)]
    for key in ("input_ids", "position_ids", "targets"):
        assert torch.equal(torch.cat([p[key] for p in pieces], dim=1), whole[key]), key
    assert all("attention_mask" not in p for p in pieces)
    assert sum(p["n_real"] for p in pieces) == whole["n_real"] == 5 + 6 + 9
    # the target of slice 0's last token is slice 1's first label: lost if shifted after cutting
    n = T // 4
    assert pieces[0]["targets"][0, -1] == batch["labels"][0, n]
    assert torch.equal(pieces[2]["position_ids"], batch["position_ids"][:, 2 * n:3 * n])
    with pytest.raises(ParallelError, match="multiple of parallel.sequence=5"):
        shard(batch, 0, 5)


def reference_mask(position_ids, window):
    B, T = position_ids.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b, q, k in itertools.product(range(B), range(T), range(T)):
        same_doc = all(position_ids[b, j] == position_ids[b, j - 1] + 1 for j in range(k + 1, q + 1))
        out[b, 0, q, k] = k <= q and same_doc and (window is None or q - k < window)
    return out


@pytest.mark.parametrize("window", [None, 3, 100])
def test_global_mask_matches_its_definition(window):
    batch = packed_batch([[4, 3, 2], [7, 1]], max_len=12, multiple=2)
    pos = batch["position_ids"]
    assert torch.equal(global_attention_mask(pos, window), reference_mask(pos, window))
    plain = torch.arange(10).repeat(2, 1)
    if window in (None, 100):
        assert global_attention_mask(plain, window) is None      # plain causal: sdpa's is_causal path
    else:
        assert torch.equal(global_attention_mask(plain, window), reference_mask(plain, window))


def test_flash_varlen_kwargs_describe_the_same_documents_as_the_mask():
    """flash-attn's varlen kernel attends causally inside each [cu[i], cu[i+1]) of the flattened batch:
    run that with sdpa segment by segment and compare with the rebuilt mask on the whole batch."""
    import torch.nn.functional as F
    batch = packed_batch([[6, 5, 4], [9, 7], [3, 8, 2]], max_len=16, multiple=1)
    pos = batch["position_ids"]
    B, T = pos.shape
    kw = flash_varlen_kwargs(pos)
    cu = kw["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == B * T and torch.equal(kw["cu_seq_lens_k"], kw["cu_seq_lens_q"])
    assert kw["max_length_q"] == kw["max_length_k"] == max(b - a for a, b in zip(cu, cu[1:]))
    q, k, v = (torch.randn(B, 2, T, 8, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=global_attention_mask(pos))
    flat = [x.transpose(1, 2).reshape(B * T, 2, 8) for x in (q, k, v)]
    got = torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in flat), is_causal=True)
                     .transpose(0, 1) for a, b in zip(cu, cu[1:])])
    torch.testing.assert_close(got.reshape(B, T, 2, 8).transpose(1, 2), expected)
    assert flash_varlen_kwargs(torch.arange(10).repeat(3, 1)) == {}       # unpacked: plain causal flash
    with pytest.raises(ParallelError, match="start at position 0"):
        flash_varlen_kwargs(torch.tensor([[0, 1, 0, 1], [2, 3, 0, 1]]))


@pytest.mark.parametrize("family, window, windows", [("mistral", None, [None, None]), ("mistral", 5, [5, 5]),
                                                     ("qwen2_moe", 5, [5, None])])
def test_rebuilt_mask_gives_transformers_outputs(family, window, windows):
    """A model whose attention ignores the mask transformers built and uses the one rebuilt from the
    position ids (what the sequence-parallel core sees) computes the same hidden states. Qwen2-MoE
    passes no window to the attention function (its first layer slides, its second does not): the
    window must come from the module."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, sliding_window=window, max_position_embeddings=64)
    if family == "mistral":
        model = MistralForCausalLM._from_config(MistralConfig(**common), attn_implementation="sdpa")
    else:
        cfg = Qwen2MoeConfig(**common, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"],
                             num_experts=2,
                             num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        model = Qwen2MoeForCausalLM._from_config(cfg, attn_implementation="sdpa")
    model.eval()
    batch = packed_batch([[6, 5, 4], [9, 7]], max_len=16, multiple=1)
    ids = batch["input_ids"] % 64

    def run():
        return model.model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).last_hidden_state

    expected = run()
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []

    def rebuilt(module, q, k, v, mask, *args, **kwargs):
        seen.append(attention_window(module, kwargs))
        return sdpa(module, q, k, v, global_attention_mask(kwargs["position_ids"], seen[-1]), *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = rebuilt
    try:
        got = run()
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
    assert seen == windows
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the mask matters: plain causal attention over the packed rows differs
    ALL_ATTENTION_FUNCTIONS["sdpa"] = lambda module, q, k, v, mask, *a, **kw: sdpa(module, q, k, v, None, *a, **kw)
    try:
        assert (run() - expected).abs().max() > 1e-3
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa


def test_check_world():
    check_world(2, 4)
    check_world(1, 3)
    with pytest.raises(ParallelError, match=r"parallel.sequence=4 does not divide the 2 ranks"):
        check_world(4, 2)


def test_check_model_names_the_setting():
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    check_model(cfg, "model.student=x", 1, "eager")                 # SP=1: anything goes
    check_model(cfg, "model.student=x", 2, "sdpa")
    with pytest.raises(ParallelError, match=r"parallel.sequence=4 .*model.student=x.*num_attention_heads=6"):
        check_model(cfg, "model.student=x", 4, "sdpa")
    with pytest.raises(ParallelError, match=r"num_key_value_heads=2 .*3"):
        check_model(cfg, "model.teacher=y", 3, "sdpa")
    check_model(LlamaConfig(num_attention_heads=8, num_key_value_heads=2), "t", 8, "sdpa")  # KV heads replicated
    with pytest.raises(ParallelError, match=r"attention 'eager'.*model.attn_implementation"):
        check_model(cfg, "model.student=x", 2, "eager")
    from transformers import Gemma2Config
    gemma = Gemma2Config(num_attention_heads=8, num_key_value_heads=4)
    with pytest.raises(ParallelError, match="softcap.*flash_attention_2"):
        check_model(gemma, "model.teacher=g", 2, "sdpa")
    check_model(gemma, "model.teacher=g", 2, "flash_attention_2")


def test_long_context_recipe_splits_llama3_heads():
    """recipes/llama3_8b_to_1b_32k.yaml against the real Llama-3.1-8B and Llama-3.2-1B geometries."""
    from pathlib import Path

    from train.config import load_config
    from train.engines import ds_config
    c = load_config(str(Path(__file__).parents[2] / "recipes" / "llama3_8b_to_1b_32k.yaml"), [])
    assert (c.parallel.sequence, c.parallel.nproc, c.data.max_len, c.data.pack) == (8, 8, 32768, True)
    teacher = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256)
    student = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
    for role, conf in (("model.teacher", teacher), ("model.student", student)):
        check_model(conf, role, c.parallel.sequence, c.model.attn_implementation)
    ds = ds_config(c, "student", 8)
    assert ds["sequence_parallel_size"] == 8 and ds["train_batch_size"] == 16      # one replica: 16 rows/step
