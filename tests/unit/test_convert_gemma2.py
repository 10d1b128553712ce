"""Gemma-2: gemma_pytorch release format <-> HF Gemma2, checked by logits against an independent
gemma_pytorch-style forward and by exact round trips."""

import json
import math

import pytest
import torch

from tests.convert_fixtures import corpus, gemma2_config, hf_state, logits, random_model, write_gemma_spm
from tools.adapters.gemma2 import PRESETS, hf_config_from_params
from tools.convert import main

# gemma_pytorch-style config of the tiny model (sliding window 4 < sequence length, so it matters)
PARAMS = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 12,
          "attn_types": ["LOCAL_SLIDING", "GLOBAL"], "sliding_window_size": 4, "final_logit_softcapping": 3.0,
          "attn_logit_softcapping": 2.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 256}
TOKENS = [2, 17, 250, 3, 99, 42, 42, 7, 280, 128, 64, 5, 201, 33]


def gemma_reference_forward(sd, p, tokens):
    """gemma_pytorch's Gemma-2 math, written from its description: fused qkv, (1 + w) RMSNorm,
    sqrt(hidden) embedding scale, RoPE on halves, query_pre_attn_scalar, tanh softcaps, sliding
    window on LOCAL_SLIDING layers, pre/post norms around attention and MLP, tied output head."""
    nh, nkv, hd, dim = p["num_attention_heads"], p["num_key_value_heads"], p["head_dim"], p["hidden_size"]
    seq = len(tokens)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(seq).float(), freqs)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x):
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["rms_norm_eps"]) * (1 + w)

    def softcap(x, cap):
        return torch.tanh(x / cap) * cap

    h = sd["embedder.weight"][torch.tensor(tokens)] * math.sqrt(dim)
    i_idx, j_idx = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    for layer, kind in enumerate(p["attn_types"]):
        pre = f"model.layers.{layer}."
        allowed = j_idx <= i_idx
        if kind == "LOCAL_SLIDING":
            allowed &= (i_idx - j_idx) < p["sliding_window_size"]
        x = norm(h, sd[pre + "input_layernorm.weight"])
        qkv = x @ sd[pre + "self_attn.qkv_proj.weight"].T
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = rope(q.view(seq, nh, hd)), rope(k.view(seq, nkv, hd)), v.view(seq, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q * p["query_pre_attn_scalar"] ** -0.5, k)
        scores = softcap(scores, p["attn_logit_softcapping"]).masked_fill(~allowed, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, nh * hd)
        h = h + norm(o @ sd[pre + "self_attn.o_proj.weight"].T, sd[pre + "post_attention_layernorm.weight"])
        x = norm(h, sd[pre + "pre_feedforward_layernorm.weight"])
        gate = torch.nn.functional.gelu(x @ sd[pre + "mlp.gate_proj.weight"].T, approximate="tanh")
        mlp = (gate * (x @ sd[pre + "mlp.up_proj.weight"].T)) @ sd[pre + "mlp.down_proj.weight"].T
        h = h + norm(mlp, sd[pre + "post_feedforward_layernorm.weight"])
    out = norm(h, sd["model.norm.weight"]) @ sd["embedder.weight"].T
    return softcap(out, p["final_logit_softcapping"])


def random_gemma_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = PARAMS
    dim, hd = p["hidden_size"], p["head_dim"]

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"embedder.weight": r(p["vocab_size"], dim, s=0.5)}
    for i in range(p["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.qkv_proj.weight"] = r((p["num_attention_heads"] + 2 * p["num_key_value_heads"]) * hd, dim)
        sd[pre + "self_attn.o_proj.weight"] = r(dim, p["num_attention_heads"] * hd)
        sd[pre + "mlp.gate_proj.weight"] = r(p["intermediate_size"], dim)
        sd[pre + "mlp.up_proj.weight"] = r(p["intermediate_size"], dim)
        sd[pre + "mlp.down_proj.weight"] = r(dim, p["intermediate_size"])
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            sd[pre + n + ".weight"] = r(dim)
    sd["model.norm.weight"] = r(dim)
    return sd


@pytest.fixture(scope="module")
def google_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma") / "release"
    d.mkdir()
    torch.save({"model_state_dict": {**random_gemma_state(), "freqs_cis": torch.zeros(4, 2)}}, d / "model.ckpt")
    (d / "gemma_config.json").write_text(json.dumps(PARAMS))
    write_gemma_spm(d / "tokenizer.model")
    return d


def test_gemma2_to_hf_matches_reference_forward(google_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["gemma2-to-hf", str(google_dir / "model.ckpt"), str(tmp_path / "hf"),
                 "--config", str(google_dir / "gemma_config.json")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    c = model.config
    assert c.layer_types == ["sliding_attention", "full_attention"] and c.sliding_window == 4
    assert (c.query_pre_attn_scalar, c.attn_logit_softcapping, c.final_logit_softcapping) == (12, 2.0, 3.0)
    ref = gemma_reference_forward(random_gemma_state(), PARAMS, TOKENS)
    diff = (logits(model, TOKENS) - ref).abs().max().item()
    print(f"gemma2-to-hf vs gemma_pytorch-style reference forward: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    # each Gemma-specific detail is visible in the logits, so the comparison above covers it
    for change in ({"sliding_window_size": 64}, {"attn_logit_softcapping": 50.0}, {"query_pre_attn_scalar": 8}):
        assert (gemma_reference_forward(random_gemma_state(), {**PARAMS, **change}, TOKENS) - ref).abs().max() > 1e-3


def test_gemma_tokenizer_matches_sentencepiece(google_dir, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    assert main(["gemma2-to-hf", str(google_dir), str(tmp_path / "hf"), "--config", str(google_dir / "gemma_config.json")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template is None  # a base model: only --instruct writes one
    sp = spm.SentencePieceProcessor(model_file=str(google_dir / "tokenizer.model"))
    assert len(tok) == sp.get_piece_size() == PARAMS["vocab_size"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    for text in corpus(5, seed=3) + ["  two  spaces, digits 2024 and ünïcödé 😀"]:
        ids = tok(text)["input_ids"]
        assert ids == [2] + sp.encode(text), text
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (google_dir / "tokenizer.model").read_bytes()


CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
CHAT_PROMPT = "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
CHAT_FULL = CHAT_PROMPT + "Paris.<end_of_turn>\n"


def test_instruct_writes_gemma2_chat_template(tmp_path, capsys):
    import jinja2
    from transformers import AutoTokenizer, GenerationConfig

    src = tmp_path / "release"
    src.mkdir()
    torch.save({"model_state_dict": random_gemma_state()}, src / "model.ckpt")
    (src / "params.json").write_text(json.dumps(PARAMS))
    write_gemma_spm(src / "tokenizer.model", turn_tokens=True)
    assert main(["--json", "gemma2-to-hf", str(src), str(tmp_path / "hf"), "--instruct"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] is True
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")

    def render(messages, gen=False):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    assert render(CHAT) == CHAT_FULL
    # the training stack takes what follows the prompt (with the generation prompt) as the reply
    assert render(CHAT[:-1], True) == CHAT_PROMPT and CHAT_FULL.startswith(CHAT_PROMPT)
    # Gemma-2 has no system role: a leading system message opens the first user turn
    system = [{"role": "system", "content": "Be brief."}]
    assert render(system + CHAT) == CHAT_FULL.replace("user\n", "user\nBe brief.\n\n")
    assert render(system + CHAT[:-1], True) == CHAT_PROMPT.replace("user\n", "user\nBe brief.\n\n")
    with pytest.raises(jinja2.TemplateError, match="can only come first"):
        render(CHAT + system)
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        render(system, True)
    # the markup is the turn tokens, one id each, and the reply ends with <end_of_turn>
    ids = tok(CHAT_FULL, add_special_tokens=False)["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert ids[0] == tok.bos_token_id and (ids.count(start), ids.count(end)) == (2, 2)
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == [tok.eos_token_id, end]


def test_instruct_needs_the_turn_tokens(google_dir, tmp_path, capsys):
    assert main(["gemma2-to-hf", str(google_dir), str(tmp_path / "hf"), "--config",
                 str(google_dir / "gemma_config.json"), "--instruct"]) == 2
    err = capsys.readouterr().err
    assert "<start_of_turn>" in err and str(google_dir / "tokenizer.model") in err and not (tmp_path / "hf").exists()


def test_hf_gemma_hf_round_trip_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(gemma2_config())
    model.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-gemma2", str(tmp_path / "hf"), str(tmp_path / "google")]) == 0
    ckpt = torch.load(tmp_path / "google" / "model.ckpt")["model_state_dict"]
    assert ckpt["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 8, 32)
    params = json.loads((tmp_path / "google" / "params.json").read_text())
    assert params["attn_types"] == ["LOCAL_SLIDING", "GLOBAL"] and params["query_pre_attn_scalar"] == 12
    # the reference forward on the written gemma_pytorch tensors agrees with the HF model
    ref = gemma_reference_forward(ckpt, params, TOKENS)
    assert (logits(model, TOKENS) - ref).abs().max() < 1e-4
    assert main(["gemma2-to-hf", str(tmp_path / "google"), str(tmp_path / "back")]) == 0  # params.json found
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    a, b = hf_state(model), hf_state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(model, TOKENS), logits(back, TOKENS))


def test_presets_have_published_hyperparameters():
    c = hf_config_from_params(PRESETS["gemma2-9b"])
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (3584, 42, 16, 8, 256)
    c = hf_config_from_params(PRESETS["gemma2-27b"])
    assert (c.query_pre_attn_scalar, c.head_dim, c.intermediate_size) == (144, 128, 36864)
    c = hf_config_from_params(PRESETS["gemma2-2b"])
    assert (c.sliding_window, c.final_logit_softcapping, c.attn_logit_softcapping, c.vocab_size) == \
        (4096, 30.0, 50.0, 256000)
    assert c.layer_types[:2] == ["sliding_attention", "full_attention"] and len(c.layer_types) == 26


def test_gemma_without_config_is_a_clear_error(google_dir, tmp_path, capsys):
    assert main(["gemma2-to-hf", str(google_dir / "model.ckpt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "gemma2-2b" in err and not (tmp_path / "hf").exists()
