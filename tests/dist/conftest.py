"""A tiny distillation setup shared by the training tests: demo-task data, a SentencePiece
tokenizer trained on it, a random tiny Llama teacher saved in HF format, and a recipe."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_llama(hidden: int, layers: int, vocab: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, vocab_size=vocab,
                tie_word_embeddings=False)


@pytest.fixture(scope="session")
def kd_setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.demo_task import demo_texts, make_demo_data
    from train.tokenizer import load_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("kd")
    train_path, eval_path = make_demo_data(root / "data", n_train=320, n_eval=32)
    tok_dir = root / "tokenizer"
    train_sentencepiece(demo_texts(train_path), tok_dir, vocab_size=360)
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = tiny_llama(48, 2, tok.vocab_size)
    cfg.pop("model_type")
    teacher = LlamaForCausalLM(LlamaConfig(**cfg))
    # a scaled head gives the random teacher confident, mostly token-to-token predictions: a
    # far-from-uniform target that a smaller student can learn within a few dozen steps
    with torch.no_grad():
        teacher.lm_head.weight *= 20
    teacher.save_pretrained(root / "teacher")
    tok.save(root / "teacher")
    (root / "student.json").write_text(json.dumps(tiny_llama(32, 2, tok.vocab_size)))
    s_cfg = tiny_llama(32, 2, tok.vocab_size)
    s_cfg.pop("model_type")
    LlamaForCausalLM(LlamaConfig(**s_cfg)).save_pretrained(root / "student-init")   # fixed initial weights
    # Gemma-2: tied embeddings, final-logit softcap (small, so that it bites), sliding window
    from transformers import Gemma2Config, Gemma2ForCausalLM
    Gemma2ForCausalLM(Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=tok.vocab_size, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
        query_pre_attn_scalar=8, sliding_window=16, max_position_embeddings=128, tie_word_embeddings=True,
    )).save_pretrained(root / "gemma2-init")
    recipe = {
        "run_name": "t", "output_dir": str(root / "runs"),
        "model": {"student": str(root / "student.json"), "teacher": str(root / "teacher"), "dtype": "fp32"},
        "train": {"steps": 6, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1},
        "loss": {"method": "grkd", "chunk_size": 16, "params": {"k": 8, "transition": 0.5}},
        "data": {"train": str(train_path), "eval": str(eval_path), "tokenizer": str(tok_dir),
                 "max_len": 48, "eval_samples": 16, "max_new_tokens": 8},
        "parallel": {"nproc": 2},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def kd_train(recipe: Path, *overrides: str, env: dict | None = None, check: bool = True,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """``kd-train RECIPE overrides`` as a user runs it (it launches 2 deepspeed ranks itself)."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "train", str(recipe), *overrides], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kd-train exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
                             f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") != "eval"]


LAUNCH_COMMON = ("train.steps=3", "data.eval=null")     # what every launcher test runs


@pytest.fixture(scope="session")
def self_launched(kd_setup) -> list[float]:
    """The per-step losses of ``kd-train RECIPE`` launching its own 2 ranks: what every other
    launcher (torchrun, mpirun, deepspeed, srun, two nodes) must give."""
    kd_train(kd_setup / "recipe.yaml", "run_name=self-launch", *LAUNCH_COMMON)
    return [r["loss"] for r in metrics(kd_setup / "runs" / "self-launch")]
