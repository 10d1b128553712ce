"""`kd-train --plan` against a real run: the memory the plan gives per rank (model states, gathered
weights, DeepSpeed's buffers, activations, loss head) against what 2 ZeRO-3 CPU ranks take, measured as
their peak resident memory during training above what they held before the engines were built."""
import json

import pytest
import torch
import yaml

from train import plan
from train.config import load_config

from .conftest import REPO, tiny_llama
from .launch import run_deepspeed

pytestmark = pytest.mark.dist


def _models(kd_setup, root):
    from transformers import LlamaConfig, LlamaForCausalLM
    from train.tokenizer import load_tokenizer
    vocab = load_tokenizer(kd_setup / "tokenizer").vocab_size
    # big enough that the planned terms dwarf the allocator's noise, small enough for 2 CPU cores
    student = {**tiny_llama(768, 8, vocab), "intermediate_size": 2304, "num_attention_heads": 8,
               "num_key_value_heads": 4, "max_position_embeddings": 256}
    (root / "student.json").write_text(json.dumps(student))
    t = tiny_llama(384, 4, vocab)
    t.pop("model_type")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**t, "num_attention_heads": 6, "num_key_value_heads": 2})).save_pretrained(
        root / "teacher")
    return root / "student.json", root / "teacher"


def test_plan_matches_measured_peak(kd_setup, tmp_path):
    student, teacher = _models(kd_setup, tmp_path)
    overrides = [f"output_dir={tmp_path}", "run_name=mem", f"model.student={student}", f"model.teacher={teacher}",
                 "train.steps=3", "train.micro_batch=8", "data.eval=null", "train.save_every=0"]
    # the gradient bucket small enough to be filled: a CPU rank's resident memory counts only the
    # pages written, where a GPU allocates the whole bucket (and the plan counts it whole)
    ds = json.loads((REPO / "ds_configs" / "zero3_student.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 5_000_000
    (tmp_path / "ds_student.json").write_text(json.dumps(ds))
    overrides.append(f"parallel.ds_config_student={tmp_path / 'ds_student.json'}")
    # glibc returns blocks of 128 kB and more to the system when they are freed, so the resident memory
    # follows the live tensors (as the CUDA allocator's allocated bytes do) rather than malloc's caches
    run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", *overrides,
                  env={"KD_TEST_MEMORY": str(tmp_path / "memory"), "MALLOC_MMAP_THRESHOLD_": "131072"})
    measured = [json.loads((tmp_path / f"memory.rank{r}").read_text()) for r in (0, 1)]
    used = max(m["peak"] - m["before_models"] for m in measured)
    cfg = load_config(str(kd_setup / "recipe.yaml"), overrides)
    p = plan.compute(cfg, nproc=2)
    planned = (p.total * plan.GB + p.cpu)
    rows = "\n".join(f"  {k}: {v * 1e3:.1f} MB" for k, v in p.rows)
    print(f"planned {planned / 1e6:.0f} MB, measured {used / 1e6:.0f} MB per rank\n{rows}")
    assert planned == pytest.approx(used, rel=0.2), (
        f"planned {planned / 1e6:.0f} MB, measured {used / 1e6:.0f} MB ({measured})\n{rows}\n"
        f"{yaml.safe_dump(cfg.parallel.__dict__)}")
