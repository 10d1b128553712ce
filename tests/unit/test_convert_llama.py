"""Llama 3: Meta original format <-> HF, checked by logits against an independent Meta-style forward
and by exact round trips."""

import json
import math

import pytest
import torch

from tests.convert_fixtures import (LLAMA3_PATTERN, corpus, hf_state, llama_config, logits, random_model,
                                    train_tiktoken_ranks, write_tiktoken_file)
from tools.adapters.llama import (LLAMA32_SMALL, hf_config_from_params, rope_to_hf, rope_to_meta,
                                  tiktoken_file_from_hf)
from tools.convert import main

DIM, LAYERS, HEADS, KV, FFN, VOCAB = 64, 2, 4, 2, 96, 304
PARAMS = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV, "vocab_size": VOCAB,
          "multiple_of": 32, "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "rope_theta": 500000.0,
          "use_scaled_rope": True, "rope_scaling_factor": 8.0, "rope_original_max_position_embeddings": 64}


# ---- an independent re-implementation of Meta's reference Llama 3 forward (complex rotary) ----

def _scaled_freqs(freqs, factor, low, high, old_ctx):
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / factor)
        else:
            s = (old_ctx / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


def meta_forward(sd, params, tokens):
    dim, nh, nkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd = dim // nh
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if params["use_scaled_rope"]:
        freqs = _scaled_freqs(freqs, params["rope_scaling_factor"], 1.0, 4.0,
                              params["rope_original_max_position_embeddings"])
    seq = len(tokens)
    cis = torch.polar(torch.ones(seq, hd // 2, dtype=torch.float64),
                      torch.outer(torch.arange(seq, dtype=torch.float64), freqs)).to(torch.complex64)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]) * w

    def rotary(x):  # interleaved pairs are (real, imag)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * cis[:, None, :]).flatten(-2)

    h = sd["tok_embeddings.weight"][torch.tensor(tokens)]
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q = rotary((x @ sd[p + "attention.wq.weight"].T).view(seq, nh, hd))
        k = rotary((x @ sd[p + "attention.wk.weight"].T).view(seq, nkv, hd))
        v = (x @ sd[p + "attention.wv.weight"].T).view(seq, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(seq, dim)
        h = h + o @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        w1, w2, w3 = (sd[p + f"feed_forward.{w}.weight"] for w in ("w1", "w2", "w3"))
        h = h + (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


def random_meta_state(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    hd = DIM // HEADS
    sd = {"tok_embeddings.weight": r(VOCAB, DIM, s=0.5)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": r(HEADS * hd, DIM), p + "attention.wk.weight": r(KV * hd, DIM),
                   p + "attention.wv.weight": r(KV * hd, DIM), p + "attention.wo.weight": r(DIM, HEADS * hd),
                   p + "feed_forward.w1.weight": r(FFN, DIM), p + "feed_forward.w2.weight": r(DIM, FFN),
                   p + "feed_forward.w3.weight": r(FFN, DIM),
                   p + "attention_norm.weight": 1 + r(DIM), p + "ffn_norm.weight": 1 + r(DIM)})
    sd["norm.weight"] = 1 + r(DIM)
    sd["output.weight"] = r(VOCAB, DIM)
    return sd


def write_meta_shards(sd, out, n):
    """Split as fairscale would: column-parallel dim 0, row-parallel (wo, w2) dim 1, vocab-parallel
    embedding dim 0, norms replicated."""
    out.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            pieces = [t.clone()] * n
        else:
            dim = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
            pieces = [c.clone() for c in t.chunk(n, dim=dim)]
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    for k, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{k:02d}.pth")
    (out / "params.json").write_text(json.dumps(PARAMS))


TOKENS = [1, 17, 250, 3, 99, 42, 42, 7, 300, 128, 64, 5, 201, 33, 11, 8, 2, 150, 77, 19]


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta") / "src"
    write_meta_shards(random_meta_state(), d, n=2)
    return d


def test_meta_to_hf_matches_meta_reference_forward(meta_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["meta-llama3-to-hf", str(meta_dir), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (KV, FFN, VOCAB)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    ref = meta_forward(random_meta_state(), PARAMS, TOKENS)
    diff = (logits(model, TOKENS) - ref).abs().max().item()
    print(f"meta-llama3-to-hf vs Meta reference forward: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    # The rotary permutation matters: without it the logits are far off.
    unpermuted = dict(random_meta_state())
    sd = model.state_dict()
    for i in range(LAYERS):
        unpermuted[f"layers.{i}.attention.wq.weight"] = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
    assert (meta_forward(unpermuted, PARAMS, TOKENS) - ref).abs().max() > 1e-2


def test_rope_scaling_is_carried(meta_dir):
    ref = meta_forward(random_meta_state(), PARAMS, TOKENS)
    unscaled = meta_forward(random_meta_state(), {**PARAMS, "use_scaled_rope": False}, TOKENS)
    assert (ref - unscaled).abs().max() > 1e-3  # so the test above would catch a dropped scaling


def test_hf_meta_hf_round_trip_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(llama_config())
    model.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-meta-llama3", str(tmp_path / "hf"), str(tmp_path / "meta"), "--num-shards", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "meta").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard0 = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    assert shard0["layers.0.attention.wo.weight"].shape == (DIM, DIM // 2)        # row-parallel
    assert shard0["layers.0.attention.wk.weight"].shape == (KV * 16 // 2, DIM)   # column-parallel
    assert shard0["tok_embeddings.weight"].shape == (VOCAB // 2, DIM)            # vocab-parallel
    assert main(["meta-llama3-to-hf", str(tmp_path / "meta"), str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    a, b = hf_state(model), hf_state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(model, TOKENS), logits(back, TOKENS))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(model.config, key), key


def test_meta_hf_meta_round_trip_exact(meta_dir, tmp_path):
    assert main(["meta-llama3-to-hf", str(meta_dir), str(tmp_path / "hf")]) == 0
    assert main(["hf-to-meta-llama3", str(tmp_path / "hf"), str(tmp_path / "meta"), "--num-shards", "2"]) == 0
    for k in range(2):
        a = torch.load(meta_dir / f"consolidated.{k:02d}.pth")
        b = torch.load(tmp_path / "meta" / f"consolidated.{k:02d}.pth")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    from tools.adapters.llama import meta_ffn_dim
    assert meta_ffn_dim(DIM, params["multiple_of"], params["ffn_dim_multiplier"]) == FFN
    assert {k: params[k] for k in PARAMS if k not in ("multiple_of", "ffn_dim_multiplier")} == \
        {k: v for k, v in PARAMS.items() if k not in ("multiple_of", "ffn_dim_multiplier")}


def test_tied_embeddings_llama32_style(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = random_model(llama_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-meta-llama3", str(tmp_path / "hf"), str(tmp_path / "meta")]) == 0
    meta = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    assert torch.equal(meta["output.weight"], meta["tok_embeddings.weight"])  # Meta's code needs the head
    assert main(["meta-llama3-to-hf", str(tmp_path / "meta"), str(tmp_path / "back")]) == 0
    with safe_open(tmp_path / "back" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model, TOKENS), logits(back, TOKENS))


def test_rope_factor_defaults():
    base = dict(PARAMS)
    base.pop("rope_scaling_factor")
    assert hf_config_from_params(base, 64, 96, False).rope_parameters["factor"] == 8.0
    dim, layers = sorted(LLAMA32_SMALL)[0]
    small = {**base, "dim": dim, "n_layers": layers, "n_heads": 32, "n_kv_heads": 8}
    assert hf_config_from_params(small, 64, 96, True).rope_parameters["factor"] == 32.0
    assert hf_config_from_params(small, 64, 96, True, rope_factor=16.0).rope_parameters["factor"] == 16.0
    plain = hf_config_from_params({**base, "use_scaled_rope": False}, 64, 96, False)
    assert plain.rope_parameters["rope_type"] == "default" and plain.max_position_embeddings == 8192


def test_rope_permutation_is_inverse():
    w = torch.randn(8 * 16, 24)
    assert torch.equal(rope_to_meta(rope_to_hf(w, 8), 8), w)
    assert not torch.equal(rope_to_hf(w, 8), w)


def _with_tiktoken(meta_dir, src, specials):
    """A copy of the Meta release with a tiny tiktoken tokenizer.model leaving `specials` ids of the
    embedding for special tokens."""
    ranks = train_tiktoken_ranks("\n".join(corpus(300)), VOCAB - 256 - specials)
    src.mkdir()
    for f in meta_dir.iterdir():
        (src / f.name).symlink_to(f)
    write_tiktoken_file(src / "tokenizer.model", ranks)
    return src, ranks


def test_tokenizer_conversion_matches_tiktoken(tmp_path, meta_dir):
    tiktoken = pytest.importorskip("tiktoken")
    from transformers import AutoTokenizer

    src, ranks = _with_tiktoken(meta_dir, tmp_path / "src", specials=8)
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template is None  # a base model: only --instruct writes one
    enc = tiktoken.Encoding("tiny", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert len(tok) == VOCAB
    assert tok.convert_ids_to_tokens(len(ranks)) == "<|begin_of_text|>" == tok.bos_token
    for text in ["the cat runs fast.", "Paris is the capital of France!", "  odd   spacing\n\nnew 1234 ünï 😀"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1:] == enc.encode(text)
        assert tok.decode(ids[1:]) == text
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (len(ranks), len(ranks) + 1)
    # and back: the tiktoken file is reproduced byte for byte
    assert tiktoken_file_from_hf(tmp_path / "hf" / "tokenizer.json") == (src / "tokenizer.model").read_text()
    assert main(["hf-to-meta-llama3", str(tmp_path / "hf"), str(tmp_path / "meta")]) == 0
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


# ------------------------------------------------------------------------------------ chat template

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]
CHAT_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
CHAT_FULL = CHAT_PROMPT + "Paris.<|eot_id|>"


def _check_llama3_chat(render):
    """render(messages, add_generation_prompt) -> text. The prompt with the generation prompt must be a
    prefix of the whole conversation: the training stack takes what follows it as the reply."""
    assert render(CHAT, False) == CHAT_FULL
    assert render(CHAT[:-1], True) == CHAT_PROMPT and CHAT_FULL.startswith(CHAT_PROMPT)
    assert render(CHAT[1:], False) == CHAT_FULL.replace("<|start_header_id|>system<|end_header_id|>\n\nBe brief."
                                                        "<|eot_id|>", "")


def test_llama3_chat_template_renders_header_format():
    # the template itself, without tiktoken (the conversion test below needs it)
    from transformers.utils.chat_template_utils import render_jinja_template

    from tools.adapters.llama import LLAMA3_CHAT_TEMPLATE

    _check_llama3_chat(lambda messages, gen: render_jinja_template(
        conversations=[messages], chat_template=LLAMA3_CHAT_TEMPLATE, add_generation_prompt=gen)[0][0])


def test_instruct_writes_llama3_chat_template(tmp_path, meta_dir, capsys):
    pytest.importorskip("tiktoken")
    from transformers import AutoTokenizer, GenerationConfig

    src, ranks = _with_tiktoken(meta_dir, tmp_path / "src", specials=12)  # up to <|python_tag|> and one reserved
    assert main(["--json", "meta-llama3-to-hf", str(src), str(tmp_path / "hf"), "--instruct"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] is True
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    _check_llama3_chat(lambda messages, gen: tok.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=gen))
    # the markup is the special tokens, one id each, and <|begin_of_text|> appears once
    ids = tok(CHAT_FULL, add_special_tokens=False)["input_ids"]
    header, eot = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert (ids.count(header), ids.count(eot), ids[-1]) == (3, 3, eot)
    n = len(ranks)  # <|eom_id|> and <|eot_id|> are the 9th and 10th special tokens
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == [n + 1, n + 8, n + 9]
    # a turn ends with <|eot_id|>: training on the template adds no <|end_of_text|> after a reply
    assert tok.eos_token == "<|eot_id|>"


def test_instruct_needs_the_chat_tokens(tmp_path, meta_dir, capsys):
    pytest.importorskip("tiktoken")

    src, _ = _with_tiktoken(meta_dir, tmp_path / "src", specials=8)  # stops before <|eot_id|>
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "hf"), "--instruct"]) == 2
    err = capsys.readouterr().err
    assert "<|eot_id|>" in err and str(src / "tokenizer.model") in err and not (tmp_path / "hf").exists()
