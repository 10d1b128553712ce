"""Llama 3.x: Meta's original release (`consolidated.NN.pth`, `params.json`, tiktoken
`tokenizer.model`) <-> HF Llama.

Format facts this relies on (Meta's reference model code, fairscale layers):
  * rotary embedding rotates interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves
    (x_j, x_{j+d/2}); wq/wk rows are permuted per head to match (`rope_to_hf`).
  * model-parallel shards split column-parallel weights (wq wk wv w1 w3 output) on dim 0,
    row-parallel ones (wo w2) on dim 1, the embedding on the vocab dim 0 (VocabParallelEmbedding
    in Llama 3; Llama 2's ParallelEmbedding split dim 1, detected from the shapes); norms are
    replicated.
  * Llama 3.1/3.2 set `use_scaled_rope`; the scaling factor is 8 except for the 3.2 1B/3B
    models (32), recognised by their shapes unless params.json has `rope_scaling_factor`.
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from pathlib import Path

import torch

from tools.adapters import Adapter, Rule, open_hf_source
from tools.errors import ConvertError
from tools.io import (atomic_output_dir, has_module, parse_dtype, torch_load,
                      validate_stream)


def rope_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _layer(meta: str, hf: str, **kw) -> Rule:
    return Rule(f"layers.{{i}}.{meta}.weight", f"model.layers.{{i}}.{hf}.weight", **kw)


ADAPTER = Adapter(
    family="llama",
    model_type="llama",
    rules=[
        Rule("tok_embeddings.weight", "model.embed_tokens.weight"),
        _layer("attention.wq", "self_attn.q_proj",
               to_hf=lambda t, c: [rope_to_hf(t, c.num_attention_heads)],
               to_src=lambda ts, c: rope_to_meta(ts[0], c.num_attention_heads)),
        _layer("attention.wk", "self_attn.k_proj",
               to_hf=lambda t, c: [rope_to_hf(t, c.num_key_value_heads)],
               to_src=lambda ts, c: rope_to_meta(ts[0], c.num_key_value_heads)),
        _layer("attention.wv", "self_attn.v_proj"),
        _layer("attention.wo", "self_attn.o_proj"),
        _layer("feed_forward.w1", "mlp.gate_proj"),
        _layer("feed_forward.w2", "mlp.down_proj"),
        _layer("feed_forward.w3", "mlp.up_proj"),
        _layer("attention_norm", "input_layernorm"),
        _layer("ffn_norm", "post_attention_layernorm"),
        Rule("norm.weight", "model.norm.weight"),
        Rule("output.weight", "lm_head.weight"),
    ],
    ignored_src=(r"rope\.freqs\Z",),  # Llama 2 era rotary cache, not a weight
)

LLAMA32_SMALL = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B: rope factor 32
# (ffn_dim_multiplier, multiple_of) of the published models, tried first when writing params.json
KNOWN_FFN = [(1.3, 1024), (1.3, 4096), (1.2, 4096), (1.5, 256), (1.0, 256), (None, 256)]
SPECIAL_31 = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
              "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_30 = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
              "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
# Llama 3 instruct prompt format (Meta's model card and reference ChatFormat): <|begin_of_text|>,
# then per message a header naming its role (system, user, assistant...), a blank line, the content
# stripped of surrounding whitespace (Meta's encoder strips it) and <|eot_id|>; the generation
# prompt is an open assistant header. No tool calls, no Llama 3.1 date preamble.
LLAMA3_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def mp_dim(name: str, shard_shape: tuple[int, ...] | None = None, dim: int | None = None) -> int | None:
    """Dimension Meta's model parallelism splits `name` along (None: replicated)."""
    if name.endswith("norm.weight") or name == "rope.freqs":
        return None
    if name == "tok_embeddings.weight":
        return 1 if shard_shape is not None and shard_shape[1] != dim else 0
    if re.search(r"\.(wo|w2)\.weight\Z", name):
        return 1
    return 0


def meta_ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, intermediate: int) -> tuple[float | None, int]:
    for multiplier, multiple_of in KNOWN_FFN:
        if meta_ffn_dim(dim, multiple_of, multiplier) == intermediate:
            return multiplier, multiple_of
    # Any size can be expressed: round up to a multiple of itself from just below it.
    multiplier = intermediate / int(2 * (4 * dim) / 3)
    if meta_ffn_dim(dim, intermediate, multiplier) != intermediate:
        raise ConvertError(f"intermediate_size {intermediate} cannot be expressed in Meta's params.json")
    return multiplier, intermediate


def hf_config_from_params(params: dict, vocab_size: int, intermediate: int, tie: bool,
                          rope_factor: float | None = None):
    from transformers import LlamaConfig

    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    scaled = bool(params.get("use_scaled_rope", False))
    rope = {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))}
    if scaled:
        factor = rope_factor or params.get("rope_scaling_factor") or (32.0 if (dim, n_layers) in LLAMA32_SMALL else 8.0)
        rope.update(rope_type="llama3", factor=float(factor),
                    low_freq_factor=float(params.get("rope_low_freq_factor", 1.0)),
                    high_freq_factor=float(params.get("rope_high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(params.get("rope_original_max_position_embeddings", 8192)))
    return LlamaConfig(
        hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads") or n_heads, head_dim=dim // n_heads,
        intermediate_size=intermediate, vocab_size=vocab_size, rms_norm_eps=params.get("norm_eps", 1e-5),
        max_position_embeddings=params.get("max_seq_len") or (131072 if scaled else 8192),
        rope_parameters=rope, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
        architectures=["LlamaForCausalLM"])


def params_from_hf_config(config) -> dict:
    dim, heads = config.hidden_size, config.num_attention_heads
    if config.head_dim != dim // heads:
        raise ConvertError(f"head_dim {config.head_dim} != hidden_size/num_attention_heads: Meta's format cannot "
                           "express it")
    if config.attention_bias or getattr(config, "mlp_bias", False):
        raise ConvertError("Meta's Llama format has no biases (config has attention_bias/mlp_bias)")
    rope = dict(config.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ConvertError(f"rope_type '{rope_type}' cannot be expressed in Meta's params.json")
    multiplier, multiple_of = ffn_params(dim, config.intermediate_size)
    params = {"dim": dim, "n_layers": config.num_hidden_layers, "n_heads": heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
              "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier, "norm_eps": config.rms_norm_eps,
              "rope_theta": rope.get("rope_theta", 10000.0), "use_scaled_rope": rope_type == "llama3"}
    if rope_type == "llama3":
        # Not in Meta's own files (their code hardcodes 8 / 1 / 4 / 8192); written so that the
        # reverse conversion is exact for anything else.
        params["rope_scaling_factor"] = rope["factor"]
        for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                             ("original_max_position_embeddings", 8192)):
            if rope.get(key, default) != default:
                params[f"rope_{key}"] = rope[key]
    if config.max_position_embeddings != (131072 if rope_type == "llama3" else 8192):
        params["max_seq_len"] = config.max_position_embeddings
    return params


def _special_tokens(n: int, scaled_rope: bool) -> list[str]:
    named = SPECIAL_31 if scaled_rope else SPECIAL_30
    first_free = 2 if scaled_rope else 5
    tokens = named[:n]
    tokens += [f"<|reserved_special_token_{first_free + i}|>" for i in range(n - len(tokens))]
    return tokens


def convert_tokenizer(path: Path, vocab_size: int, scaled_rope: bool, max_len: int):
    """tiktoken `tokenizer.model` -> HF fast tokenizer, or None when `tiktoken` is not installed."""
    if not has_module("tiktoken"):  # TikTokenConverter reads the file with it
        warnings.warn("tiktoken is not installed: tokenizer.model copied as-is, not converted "
                      "(pip install 'kd-stack[convert]')")
        return None
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        n_base = sum(1 for line in path.read_text().splitlines() if line.strip())
    except UnicodeDecodeError:
        raise ConvertError(f"{path} is not a tiktoken BPE file (a Llama 2 SentencePiece model?)") from None
    if n_base > vocab_size:
        raise ConvertError(f"{path} has {n_base} tokens but the embedding only {vocab_size} rows")
    specials = _special_tokens(min(256, vocab_size - n_base), scaled_rope)
    backend = TikTokenConverter(vocab_file=str(path), extra_special_tokens=specials).converted()
    kwargs = {}
    if len(specials) >= 2:
        bos, eos = specials[0], specials[1]
        bos_id = n_base
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, bos_id)])])
        kwargs = {"bos_token": bos, "eos_token": eos}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=["input_ids", "attention_mask"],
                                   clean_up_tokenization_spaces=False, model_max_length=max_len, **kwargs)


def tiktoken_file_from_hf(tokenizer_json: Path) -> str | None:
    """Byte-level BPE `tokenizer.json` -> tiktoken file text (base tokens only, specials are
    implied by the vocab size). None if the tokenizer is not byte-level BPE."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = json.loads(tokenizer_json.read_text())["model"]
    if model.get("type") != "BPE":
        return None
    decode = {ch: b for b, ch in bytes_to_unicode().items()}
    lines = []
    for token, rank in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if any(ch not in decode for ch in token):
            return None
        raw = bytes(decode[ch] for ch in token)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}\n")
    return "".join(lines)


def _shard_paths(src: Path) -> list[Path]:
    found = {}
    for p in src.glob("consolidated.*.pth"):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ConvertError(f"no consolidated.NN.pth shard in {src}: not a Meta Llama checkpoint")
    for k in range(max(found) + 1):
        if k not in found:
            raise ConvertError(f"missing shard {src / f'consolidated.{k:02d}.pth'} "
                               f"(found {', '.join(found[i].name for i in sorted(found))})")
    return [found[k] for k in sorted(found)]


class MetaLlamaSource:
    """A Meta Llama 3 checkpoint directory, exposed as HF-named tensors (merged shard by tensor)."""

    family = "llama"

    def __init__(self, src: str | Path, rope_factor: float | None = None, instruct: bool = False):
        self.src = Path(src)
        if not self.src.is_dir():
            raise ConvertError(f"{self.src} is not a directory")
        params_path = self.src / "params.json"
        if not params_path.is_file():
            raise ConvertError(f"missing {params_path}: not a Meta Llama checkpoint")
        try:
            self.params = json.loads(params_path.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{params_path} is not valid JSON: {e}") from None
        lacking = [k for k in ("dim", "n_layers", "n_heads") if k not in self.params]
        if lacking:
            raise ConvertError(f"{params_path} lacks {', '.join(lacking)}: not a Meta Llama params.json")
        self.paths = _shard_paths(self.src)
        self.shards = [torch_load(p) for p in self.paths]
        names = list(self.shards[0])
        for path, shard in zip(self.paths[1:], self.shards[1:]):
            for name in names:
                if name not in shard:
                    raise ConvertError(f"tensor '{name}' is in {self.paths[0].name} but missing from {path}")
            for name in shard:
                if name not in self.shards[0]:
                    raise ConvertError(f"unknown tensor '{name}' in {path} (not in {self.paths[0].name})")
        self._check_shard_count()
        self.names = names
        if "tok_embeddings.weight" not in names:
            raise ConvertError(f"tok_embeddings.weight missing from {self.paths[0]}")
        vocab = self._merged_shape("tok_embeddings.weight")[0]
        w1 = "layers.0.feed_forward.w1.weight"
        intermediate = self._merged_shape(w1)[0] if w1 in names else 0
        # Llama 3.2 1B/3B tie the output head to the embedding; Meta's files may still carry a copy.
        self.tied = "output.weight" not in names or torch.equal(self._merged("output.weight"),
                                                                 self._merged("tok_embeddings.weight"))
        self.config = hf_config_from_params(self.params, vocab, intermediate, self.tied, rope_factor)
        self.instruct = instruct
        self._tokenizer = False  # not converted yet
        tok = self.load_tokenizer()
        if instruct and tok is not None:
            lacking = [t for t in CHAT_TOKENS if t not in tok.get_vocab()]
            if lacking:
                raise ConvertError(f"--instruct: the tokenizer converted from {self.src / 'tokenizer.model'} has no "
                                   f"{', '.join(lacking)} (its {len(tok)} ids leave too few special tokens after the "
                                   "BPE), so the Llama 3 chat format cannot be written; drop --instruct to convert "
                                   "without a chat template")
            tok.chat_template = LLAMA3_CHAT_TEMPLATE
        if tok is not None and tok.bos_token is not None:
            self.config.bos_token_id = tok.bos_token_id
            self.config.eos_token_id = self._eos_ids(tok)
            if instruct:
                # as Meta's instruct release: a turn ends with <|eot_id|>, so training on the chat
                # template adds no <|end_of_text|> after it
                tok.eos_token = "<|eot_id|>"
        elif vocab == 128256:  # the released Llama 3 vocabulary, tokenizer not converted
            self.config.bos_token_id = 128000
            self.config.eos_token_id = [128001, 128008, 128009] if instruct else 128001
        self.report = {"shards": len(self.paths), "tied_embeddings": self.tied}
        if instruct:
            self.report["chat_template"] = tok is not None

    def _check_shard_count(self):
        name = "layers.0.attention.wq.weight"
        if name not in self.shards[0]:
            return
        rows = self.shards[0][name].shape[0]
        full = self.params["dim"]
        if rows * len(self.shards) != full:
            need = full // rows if rows and full % rows == 0 else "?"
            raise ConvertError(f"{self.paths[0]} holds {rows} of {full} rows of '{name}': the checkpoint has {need} "
                               f"model-parallel shards but {len(self.paths)} were found (missing "
                               f"consolidated.{len(self.paths):02d}.pth?)")

    def _origin(self, name: str) -> str:
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"{self.src}/consolidated.{{00..{len(self.paths) - 1:02d}}}.pth"

    def _merged_shape(self, name: str) -> list[int]:
        shape = list(self.shards[0][name].shape)
        dim = mp_dim(name, tuple(shape), self.params["dim"])
        if dim is not None:
            shape[dim] = sum(shard[name].shape[dim] for shard in self.shards)
        return shape

    def _merged(self, name: str) -> torch.Tensor:
        parts = [shard[name] for shard in self.shards]
        dim = mp_dim(name, tuple(parts[0].shape), self.params["dim"])
        if dim is None or len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=dim)

    def _eos_ids(self, tok):
        eos = [tok.eos_token_id]
        if self.instruct:
            eos += [i for i in tok.convert_tokens_to_ids(["<|eom_id|>", "<|eot_id|>"]) if i is not None
                    and i != tok.unk_token_id and i < self.config.vocab_size]
        return eos[0] if len(eos) == 1 else eos

    def load_tokenizer(self):
        if self._tokenizer is False:
            path = self.src / "tokenizer.model"
            self._tokenizer = None
            if path.is_file():
                self._tokenizer = convert_tokenizer(path, self.config.vocab_size,
                                                    self.params.get("use_scaled_rope", False),
                                                    self.config.max_position_embeddings)
        return self._tokenizer

    def tensors(self, dtype=None, budget_bytes=None):
        names = [n for n in self.names if not (self.tied and n == "output.weight")]
        return ADAPTER.to_hf(names, self._merged, self.config, self._origin)

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(bos_token_id=self.config.bos_token_id, eos_token_id=self.config.eos_token_id,
                                **({"do_sample": True, "temperature": 0.6, "top_p": 0.9} if self.instruct else {}))

    def save_extras(self, out: Path) -> list[str]:
        tok = self.load_tokenizer()
        if tok is not None:
            tok.save_pretrained(out)
            return ["tokenizer"]
        if (self.src / "tokenizer.model").is_file():
            (out / "original").mkdir()
            (out / "original" / "tokenizer.model").write_bytes((self.src / "tokenizer.model").read_bytes())
            return ["original/tokenizer.model"]
        return []


def hf_to_meta(src: str | Path, out: str | Path, num_shards: int = 1, dtype: str | None = None,
               overwrite: bool = False) -> dict:
    """HF Llama directory -> Meta format (`consolidated.NN.pth` x num_shards, params.json, tokenizer.model)."""
    src = Path(src)
    config, reader, expected = open_hf_source(src, "llama")
    params = params_from_hf_config(config)
    # Validate names/shapes first (shape only: cheap), then convert in the canonical order.
    extra = [n for n in reader.keys() if n not in expected and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise ConvertError(f"unknown tensor '{extra[0]}' in {reader.files[extra[0]]}: not part of an HF Llama model")
    for _ in validate_stream(((n, torch.empty(reader.shape(n), device="meta"), str(reader.files[n]))
                              for n in expected if n in reader.files), expected, "llama"):
        pass
    cast = parse_dtype(dtype)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    tensors = list(ADAPTER.to_src(list(expected), reader.get, config, lambda n: str(reader.files[n])))
    if config.tie_word_embeddings:
        tensors.append(("output.weight", dict(tensors)["tok_embeddings.weight"]))
    for name, t in tensors:
        if cast is not None:
            t = t.to(cast)
        dim = mp_dim(name)
        if dim is None:
            for shard in shards:
                shard[name] = t.clone()
            continue
        if t.shape[dim] % num_shards:
            raise ConvertError(f"'{name}' has {t.shape[dim]} rows/cols on dim {dim}, not divisible into "
                               f"{num_shards} shards")
        for shard, piece in zip(shards, t.chunk(num_shards, dim=dim)):
            shard[name] = piece.clone()  # a view would drag its whole storage into the file
    with atomic_output_dir(out, overwrite) as tmp:
        for k, shard in enumerate(shards):
            torch.save(shard, tmp / f"consolidated.{k:02d}.pth")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        extras = []
        if (src / "tokenizer.json").is_file():
            text = tiktoken_file_from_hf(src / "tokenizer.json")
            if text is not None:
                (tmp / "tokenizer.model").write_text(text)
                extras.append("tokenizer.model")
        if not extras and (src / "original" / "tokenizer.model").is_file():
            (tmp / "tokenizer.model").write_bytes((src / "original" / "tokenizer.model").read_bytes())
            extras.append("tokenizer.model")
    return {"out": str(out), "shards": num_shards, "tensors": len(tensors), "extras": extras}
