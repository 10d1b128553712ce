"""`kd-convert verify A B`: load two checkpoints of any supported format and compare their logits.

Formats are told apart by their files: a DeepSpeed checkpoint (`latest` or `*_model_states.pt`),
Meta Llama (`params.json` + `consolidated.*.pth`), gemma_pytorch (`*.ckpt`) or an HF directory
(`config.json` + safetensors). Non-HF formats are converted in memory with the same code as the
on-disk conversions, so `verify ORIGINAL CONVERTED` checks the converter and the files at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tools.errors import ConvertError
from tools.io import expected_hf_shapes, validate_stream

DEFAULT_PROMPT = "The capital of France is Paris. Knowledge distillation trains a small student model"


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".ckpt":
        return "gemma-pytorch"
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist")
    if (path / "latest").is_file() or any(path.glob("*_model_states.pt")) or any(path.glob("*/*_model_states.pt")):
        return "zero"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta-llama"
    if any(path.glob("*.ckpt")):
        return "gemma-pytorch"
    if (path / "config.json").is_file():
        return "hf"
    raise ConvertError(f"cannot tell the checkpoint format of {path}: expected an HF directory, a Meta Llama "
                       "directory, a gemma_pytorch *.ckpt or a DeepSpeed checkpoint directory")


def open_source(path: str | Path, gemma_config=None, tag=None, config_dir=None):
    """A converter source for a non-HF checkpoint (None for HF directories)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "meta-llama":
        from tools.adapters.llama import MetaLlamaSource
        return MetaLlamaSource(path)
    if fmt == "gemma-pytorch":
        from tools.adapters.gemma2 import GemmaPytorchSource
        return GemmaPytorchSource(path, gemma_config)
    if fmt == "zero":
        from tools.zero_to_hf import ZeroSource
        return ZeroSource(path, tag=tag, config_dir=config_dir)
    return None


def model_from_source(source, dtype=torch.float32):
    """Build an HF model from a source's tensors, in memory."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    expected = expected_hf_shapes(source.config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype)
    state = {n: t.to(dtype) for n, t in validate_stream(source.tensors(dtype=dtype), expected, source.family)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [m for m in missing if m not in (getattr(model, "all_tied_weights_keys", None) or {})]
    if missing or unexpected:
        raise ConvertError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def load_any(path, gemma_config=None, dtype=torch.float32):
    """(model, tokenizer or None) for a checkpoint of any supported format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = Path(path)
    source = open_source(path, gemma_config=gemma_config)
    if source is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tok = None
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(path)
        return model, tok
    tok = None
    if hasattr(source, "load_tokenizer"):
        tok = source.load_tokenizer()
    elif getattr(source, "config_dir", None) is not None and (source.config_dir / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(source.config_dir)
    return model_from_source(source, dtype), tok


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max/mean abs diff and top-1 agreement over the vocabulary rows both models have; `vocab_a`
    and `vocab_b` are each model's own logit width, `compared_vocab` the shared one."""
    vocab_a, vocab_b = a.shape[-1], b.shape[-1]
    vocab = min(vocab_a, vocab_b)
    a, b = a[..., :vocab].float(), b[..., :vocab].float()
    diff = (a - b).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(), "compared_vocab": vocab,
            "vocab_a": vocab_a, "vocab_b": vocab_b}


def verify(a, b, prompt=None, tokens=None, tol=1e-3, min_top1=1.0, gemma_config_a=None, gemma_config_b=None,
           dtype=torch.float32, seq_len=16, seed=0) -> dict:
    model_a, tok_a = load_any(a, gemma_config_a, dtype)
    model_b, tok_b = load_any(b, gemma_config_b, dtype)
    vocab = min(model_a.config.vocab_size, model_b.config.vocab_size)
    note = None
    if tokens is not None:
        ids = list(tokens)
    elif tok_a is not None or tok_b is not None:
        tok = tok_a or tok_b
        ids = tok(prompt or DEFAULT_PROMPT)["input_ids"]
        if tok_a is not None and tok_b is not None and tok_b(prompt or DEFAULT_PROMPT)["input_ids"] != ids:
            note = "the two tokenizers encode the prompt differently; A's ids were used for both"
    else:
        if prompt is not None:
            raise ConvertError("--prompt needs a tokenizer and neither checkpoint has one; use --tokens")
        ids = torch.randint(0, vocab, (seq_len,), generator=torch.Generator().manual_seed(seed)).tolist()
        note = f"no tokenizer: {seq_len} random token ids (seed {seed})"
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ConvertError(f"token id {bad[0]} is outside the vocabulary both models share (0..{vocab - 1})")
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits_a = model_a(input_ids=input_ids).logits[0]
        logits_b = model_b(input_ids=input_ids).logits[0]
    result = compare_logits(logits_a, logits_b)
    result.update(tokens=len(ids), tol=tol, min_top1=min_top1,
                  ok=result["max_abs_diff"] <= tol and result["top1_agreement"] >= min_top1)
    if note:
        result["note"] = note
    return result
