"""Gemma-2: Google's PyTorch release (the `gemma_pytorch` format) <-> HF Gemma2.

The release is one `*.ckpt` (torch.save of {"model_state_dict": {...}}) plus a SentencePiece
`tokenizer.model`; it carries no config, so the hyper-parameters come from `--config`: a preset
(gemma2-2b, gemma2-9b, gemma2-27b), a gemma_pytorch-style JSON (field names of its GemmaConfig,
e.g. attn_types=["LOCAL_SLIDING","GLOBAL",...], sliding_window_size), or an HF Gemma2 config.json.
A `params.json` next to the checkpoint is used when `--config` is absent (hf-to-gemma2 writes one).

What differs between the two formats, and what does not:
  * q, k and v are one fused `qkv_proj` (rows q | k | v) in gemma_pytorch, three tensors in HF.
  * both rotate halves in RoPE (no permutation), both scale embeddings by sqrt(hidden) at run
    time, and both RMSNorms multiply by (1 + weight): norm weights are copied unchanged.
  * the output head is tied to the embedder in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tools.adapters import Adapter, Rule, open_hf_source
from tools.errors import ConvertError
from tools.io import (atomic_output_dir, parse_dtype, torch_load,
                      validate_stream)


def split_qkv(t: torch.Tensor, c) -> list[torch.Tensor]:
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    if t.shape[0] != q + 2 * kv:
        raise RuntimeError(f"expected {q + 2 * kv} rows (q {q} + k {kv} + v {kv})")
    return list(t.split([q, kv, kv], dim=0))


def _same(name: str) -> Rule:
    return Rule(f"model.layers.{{i}}.{name}.weight", f"model.layers.{{i}}.{name}.weight")


ADAPTER = Adapter(
    family="gemma2",
    model_type="gemma2",
    rules=[
        Rule("embedder.weight", "model.embed_tokens.weight"),
        Rule("model.layers.{i}.self_attn.qkv_proj.weight",
             ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
              "model.layers.{i}.self_attn.v_proj.weight"),
             to_hf=split_qkv, to_src=lambda ts, c: torch.cat(ts, dim=0)),
        *[_same(n) for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                             "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm")],
        Rule("model.norm.weight", "model.norm.weight"),
    ],
    ignored_src=(r"(local_|global_)?freqs_cis\Z",),  # rotary caches saved as buffers
)

_COMMON = {"vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
           "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window_size": 4096,
           "use_pre_ffw_norm": True, "use_post_ffw_norm": True}
# Published hyper-parameters of the three Gemma-2 releases (gemma_pytorch field names).
PRESETS = {
    "gemma2-2b": {**_COMMON, "num_hidden_layers": 26, "hidden_size": 2304, "intermediate_size": 9216,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma2-9b": {**_COMMON, "num_hidden_layers": 42, "hidden_size": 3584, "intermediate_size": 14336,
                  "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma2-27b": {**_COMMON, "num_hidden_layers": 46, "hidden_size": 4608, "intermediate_size": 36864,
                   "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                   "query_pre_attn_scalar": 144},
}
LAYER_TYPES = {"LOCAL_SLIDING": "sliding_attention", "GLOBAL": "full_attention"}

# Gemma-2 instruct prompt format (Google's Gemma prompt formatting docs): <bos>, then per turn
# <start_of_turn>ROLE\n + content + <end_of_turn>\n, ROLE being `user` or `model` (the assistant);
# the generation prompt opens a model turn. Gemma-2 has no system role and Google's advice is to put
# system instructions in the first user turn: a leading system message is prepended to it,
# separated by a blank line; a system message anywhere else, or one without a user turn after it,
# is an error. Contents are stripped of surrounding whitespace, as in the Llama 3 template.
GEMMA2_CHAT_TEMPLATE = (
    "{%- set system = '' -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = (messages[0]['content'] | trim) + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- if not turns or turns[0]['role'] != 'user' -%}"
    "{{- raise_exception('Gemma-2 has no system role: the system message is prepended to the first user "
    "message, so a user message must follow it') -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{{- '<bos>' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = 'user' -%}"
    "{%- elif message['role'] in ('assistant', 'model') -%}{%- set role = 'model' -%}"
    "{%- else -%}{{- raise_exception('Gemma-2 turns are user or assistant (model); got role ' + message['role'] + "
    "' (a system message can only come first)') -}}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
TURN_TOKENS = ("<bos>", "<start_of_turn>", "<end_of_turn>")


def load_params(config: str | Path | None, src_dir: Path) -> dict:
    """Resolve --config (preset, gemma_pytorch JSON or HF config.json) to a dict."""
    if config is None:
        if (src_dir / "params.json").is_file():
            config = src_dir / "params.json"
        else:
            raise ConvertError(f"Google's Gemma-2 release carries no config and {src_dir / 'params.json'} does not "
                               f"exist: pass --config with one of {', '.join(PRESETS)} or a JSON file")
    if str(config) in PRESETS:
        return dict(PRESETS[str(config)])
    path = Path(config)
    if not path.is_file():
        raise ConvertError(f"--config '{config}' is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None


def hf_config_from_params(params: dict, state: dict[str, torch.Tensor] | None = None):
    from transformers import Gemma2Config

    if params.get("model_type") == "gemma2":  # an HF config.json was given
        return Gemma2Config.from_dict({**params, "architectures": ["Gemma2ForCausalLM"]})
    if params.get("model_type"):
        raise ConvertError(f"--config describes a '{params['model_type']}' model, not gemma2 (wrong family)")
    p = dict(params)
    if state is not None:  # sizes the tensors tell us need not be in the file
        if "embedder.weight" in state:
            p.setdefault("vocab_size", state["embedder.weight"].shape[0])
            p.setdefault("hidden_size", state["embedder.weight"].shape[1])
        layers = {int(n.split(".")[2]) for n in state if n.startswith("model.layers.")}
        if layers:
            p.setdefault("num_hidden_layers", max(layers) + 1)
        if "model.layers.0.mlp.gate_proj.weight" in state:
            p.setdefault("intermediate_size", state["model.layers.0.mlp.gate_proj.weight"].shape[0])
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
    missing = [k for k in required if k not in p]
    if missing:
        raise ConvertError(f"Gemma-2 config lacks {', '.join(missing)}")
    if not (p.get("use_pre_ffw_norm", True) and p.get("use_post_ffw_norm", True)):
        raise ConvertError("config has use_pre_ffw_norm/use_post_ffw_norm false: that is Gemma 1, not Gemma-2")
    n = p["num_hidden_layers"]
    attn_types = p.get("attn_types") or ["LOCAL_SLIDING", "GLOBAL"] * ((n + 1) // 2)
    unknown = [a for a in attn_types if a not in LAYER_TYPES]
    if unknown:
        raise ConvertError(f"unknown attn_types entry '{unknown[0]}' (use LOCAL_SLIDING or GLOBAL)")
    return Gemma2Config(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=n, num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], head_dim=p["head_dim"],
        max_position_embeddings=p.get("max_position_embeddings", 8192), rms_norm_eps=p.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=p.get("query_pre_attn_scalar") or p["head_dim"],
        sliding_window=p.get("sliding_window_size", 4096),
        layer_types=[LAYER_TYPES[a] for a in attn_types[:n]],
        final_logit_softcapping=p.get("final_logit_softcapping"),
        attn_logit_softcapping=p.get("attn_logit_softcapping"),
        rope_parameters={"rope_type": "default", "rope_theta": float(p.get("rope_theta", 10000.0))},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, architectures=["Gemma2ForCausalLM"])


def params_from_hf_config(c) -> dict:
    if not c.tie_word_embeddings:
        raise ConvertError("gemma_pytorch ties the output head to the embedder; this model has an untied lm_head")
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConvertError(f"rope_type '{rope.get('rope_type')}' cannot be expressed in the gemma_pytorch format")
    to_attn = {v: k for k, v in LAYER_TYPES.items()}
    params = {"vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
              "attn_types": [to_attn[t] for t in c.layer_types], "sliding_window_size": c.sliding_window,
              "final_logit_softcapping": c.final_logit_softcapping,
              "attn_logit_softcapping": c.attn_logit_softcapping, "query_pre_attn_scalar": c.query_pre_attn_scalar,
              "use_pre_ffw_norm": True, "use_post_ffw_norm": True}
    if rope.get("rope_theta", 10000.0) != 10000.0:
        params["rope_theta"] = rope["rope_theta"]
    return params


def _find_ckpt(src: Path) -> Path:
    if src.is_file():
        return src
    if not src.is_dir():
        raise ConvertError(f"{src} does not exist")
    if (src / "model.ckpt").is_file():
        return src / "model.ckpt"
    found = sorted(src.glob("*.ckpt"))
    if len(found) != 1:
        raise ConvertError(f"expected one *.ckpt file in {src}, found {len(found) or 'none'}")
    return found[0]


class GemmaPytorchSource:
    """A gemma_pytorch checkpoint, exposed as HF-named tensors."""

    family = "gemma2"

    def __init__(self, src: str | Path, config: str | Path | None = None, instruct: bool = False):
        self.path = _find_ckpt(Path(src))
        self.dir = self.path.parent
        ckpt = torch_load(self.path)
        state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConvertError(f"{self.path} is not a gemma_pytorch checkpoint (expected a dict of tensors under "
                               "'model_state_dict')")
        scaled = [n for n in state if n.endswith("weight_scaler")]
        if scaled:
            raise ConvertError(f"{self.path} is an int8-quantized release ('{scaled[0]}'); use the bf16/fp32 one")
        self.state = state
        self.config = hf_config_from_params(load_params(config, self.dir), state)
        self.instruct = instruct
        # converted once: both generation_config() and save_extras() need the instruct tokenizer
        self._chat_tokenizer = self._instruct_tokenizer() if instruct else None
        self.report = {"chat_template": self._chat_tokenizer is not None} if instruct else {}

    def tensors(self, dtype=None, budget_bytes=None):
        return ADAPTER.to_hf(list(self.state), self.state.__getitem__, self.config, lambda n: str(self.path))

    def load_tokenizer(self):
        path = self.dir / "tokenizer.model"
        if not path.is_file():
            return None
        from train.tokenizer import sentencepiece_to_hf

        try:  # the turn markers are user-defined symbols; special, as in Google's own HF release
            return sentencepiece_to_hf(path, special_symbols=("<start_of_turn>", "<end_of_turn>"))
        except ValueError as e:  # not a SentencePiece model, or a kind the conversion does not handle
            raise ConvertError(f"cannot convert {path} to an HF Gemma tokenizer: {e}") from None

    def _instruct_tokenizer(self):
        """The converted tokenizer carrying the Gemma-2 chat template (None without a tokenizer)."""
        tok = self.load_tokenizer()
        if tok is None:
            return None
        lacking = [t for t in TURN_TOKENS if t not in tok.get_vocab()]
        if lacking:
            raise ConvertError(f"--instruct: {self.dir / 'tokenizer.model'} has no {', '.join(lacking)}, so the "
                               "Gemma-2 chat format cannot be written (Google's Gemma-2 tokenizers have them: is "
                               "this one of them?); drop --instruct to convert without a chat template")
        tok.chat_template = GEMMA2_CHAT_TEMPLATE
        return tok

    def generation_config(self):
        if self._chat_tokenizer is None:
            return None  # the default one, from the model config
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(self.config)
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        end_of_turn = self._chat_tokenizer.convert_tokens_to_ids("<end_of_turn>")
        gen.eos_token_id = [i for i in eos if i is not None] + [end_of_turn]  # instruct replies end with it
        return gen

    def save_extras(self, out: Path) -> list[str]:
        if not (self.dir / "tokenizer.model").is_file():
            return []
        tok = self._chat_tokenizer if self.instruct else self.load_tokenizer()
        if tok is not None:
            tok.save_pretrained(out)
        if not (out / "tokenizer.model").is_file():  # keep the SentencePiece model for the way back
            (out / "tokenizer.model").write_bytes((self.dir / "tokenizer.model").read_bytes())
        return ["tokenizer"] if tok is not None else ["tokenizer.model"]


def hf_to_gemma(src: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> dict:
    """HF Gemma2 directory -> gemma_pytorch `model.ckpt` + params.json (+ tokenizer.model)."""
    src = Path(src)
    config, reader, expected = open_hf_source(src, "gemma2")
    params = params_from_hf_config(config)
    names = [n for n in reader.keys() if n != "lm_head.weight"]
    for _ in validate_stream(((n, torch.empty(reader.shape(n), device="meta"), str(reader.files[n])) for n in names),
                             expected, "gemma2"):
        pass
    cast = parse_dtype(dtype)
    state = {}
    for name, t in ADAPTER.to_src(list(expected), reader.get, config, lambda n: str(reader.files[n])):
        state[name] = t.to(cast) if cast is not None else t
    with atomic_output_dir(out, overwrite) as tmp:
        torch.save({"model_state_dict": state}, tmp / "model.ckpt")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        extras = []
        if (src / "tokenizer.model").is_file():
            (tmp / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
            extras.append("tokenizer.model")
    return {"out": str(out), "tensors": len(state), "extras": extras}
