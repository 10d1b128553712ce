"""Tiny random models and original-format fixtures for the kd-convert tests (tests/unit and tests/dist)."""

from __future__ import annotations

import base64
import io
import random
from collections import Counter
from pathlib import Path

import torch

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ["the", "cat", "dog", "distill", "teacher", "student", "model", "logits", "token", "gemma", "llama", "zero",
         "shard", "bird", "runs", "fast", "slow", "and", "of", "to", "Paris", "France", "capital", "is"]


def corpus(n=300, seed=0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", ",", "!", ""])
            for _ in range(n)]


def llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=304, max_position_embeddings=512, tie_word_embeddings=False,
              # a short original context so that llama3 rope scaling changes most frequencies
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    kw.update(over)
    return LlamaConfig(**kw)


def gemma2_config(**over):
    from transformers import Gemma2Config

    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
              final_logit_softcapping=3.0, attn_logit_softcapping=2.0, max_position_embeddings=256)
    kw.update(over)
    return Gemma2Config(**kw)


def random_model(config, seed=0):
    """A causal LM with all weights random (norm weights too, so that norm handling is tested)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.ndim == 1 else 0.2)
    return model.eval()


def train_tiktoken_ranks(text: str, merges: int) -> dict[bytes, int]:
    """A tiny byte-level BPE in tiktoken's format (all 256 bytes, then `merges` merged tokens)."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(LLAMA3_PATTERN, text)]
    for _ in range(merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                        key=lambda kv: kv[1])))


def write_gemma_spm(path: Path, vocab_size: int = 300, seed: int = 0, turn_tokens: bool = False) -> None:
    """A SentencePiece model trained like Gemma's: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, byte fallback,
    no dummy prefix, whitespace kept; `turn_tokens` adds the instruct format's <start_of_turn>/<end_of_turn>."""
    import sentencepiece as spm

    buf = io.BytesIO()
    symbols = ["<mask>"] + (["<start_of_turn>", "<end_of_turn>"] if turn_tokens else [])
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(400, seed)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=symbols, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
    path.write_bytes(buf.getvalue())


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids).reshape(1, -1)).logits[0].float()
