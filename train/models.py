"""Causal LMs from a spec (preset name, HF directory, or config.json) and the pieces kd needs.

The loss never asks a model for logits: it takes the decoder's final hidden states (after the
final norm) and the lm-head weight, so that ``kd.fused_distill_loss`` can chunk over tokens.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

# Tiny Llama-architecture models the CPU demo builds itself (nothing is downloaded).
PRESETS = {
    "demo-teacher": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=False),
    "demo-student": dict(model_type="llama", hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=False),
    # the leaderboard's student (benchmarks/quality.py): twice as wide, so that it gets within reach of
    # the demo teacher in 300 steps and the methods differ by more than seed noise
    "demo-student-wide": dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              rope_theta=10000.0, tie_word_embeddings=False),
}


def resolve_attention(name: str, config) -> str:
    """``auto``: flash-attn 2 on a GPU where installed; else sdpa, or eager for models with an
    attention-logit softcap (Gemma-2: sdpa cannot apply it, and transformers refuses sdpa there)."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def model_config(spec: str, vocab_size: int | None = None, **overrides):
    """The transformers config for a preset name, an HF model directory, or a config.json file."""
    if spec in PRESETS:
        kw = dict(PRESETS[spec])
        config = transformers.CONFIG_MAPPING[kw.pop("model_type")](**kw)
    elif Path(spec).is_file():
        data = json.loads(Path(spec).read_text())
        config = transformers.CONFIG_MAPPING[data.pop("model_type")](**data)
    elif Path(spec).is_dir():
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
    else:
        raise FileNotFoundError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}), an HF model "
                                "directory, nor a config.json file")
    if vocab_size is not None:
        config.vocab_size = vocab_size
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def load_causal_lm(spec: str, dtype: torch.dtype, attn_implementation: str = "auto",
                   vocab_size: int | None = None, seed: int = 0):
    """Weights from an HF directory, or a random init (seeded) for presets and config files.

    Call with a ``HfDeepSpeedConfig`` alive to build straight into ZeRO-3 partitions.
    """
    config = model_config(spec, vocab_size if not Path(spec).is_dir() else None)
    attn = resolve_attention(attn_implementation, config)
    if Path(spec).is_dir():
        if not any(Path(spec).glob("*.safetensors")) and not any(Path(spec).glob("*.bin")):
            raise FileNotFoundError(f"model directory {spec!r} holds no *.safetensors or *.bin weights; "
                                    "point at an HF model directory, or at its config.json for a random init")
        return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, attn_implementation=attn,
                                                    local_files_only=True)
    torch.manual_seed(seed)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def final_logit_softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None) or None


def lm_head_weight(model) -> torch.nn.Parameter:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: lm heads with a bias are not supported by the fused loss")
    return head.weight
