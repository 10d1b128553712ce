"""`kd-train --plan` against a real run: the memory the plan gives per rank (model states, gathered
weights, DeepSpeed's buffers, activations, loss head) against what 2 ZeRO-3 CPU ranks take, measured as
their peak resident memory during training above what they held before the engines were built."""
import json

import pytest
import torch

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


def _measure(kd_setup, root, name, *extra, bucket=5_000_000, prefetch=None) -> tuple[float, float, str]:
    """(planned bytes, measured bytes, the plan's rows) per rank of a 3-step run of the 57M student."""
    student, teacher = root / "student.json", root / "teacher"
    overrides = [f"output_dir={root}", f"run_name={name}", f"model.student={student}", f"model.teacher={teacher}",
                 "train.steps=3", "train.micro_batch=8", "data.eval=null", "train.save_every=0",
                 "data.pack=true", *extra]      # packed: every row max_len tokens long, as the plan counts
    # the gradient bucket small enough to be filled: a CPU rank's resident memory counts only the
    # pages written, where a GPU allocates the whole bucket (and the plan counts it whole)
    ds = json.loads((REPO / "ds_configs" / "zero3_student.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = bucket
    if prefetch is not None:
        ds["zero_optimization"]["stage3_prefetch_bucket_size"] = prefetch
    (root / f"ds_{name}.json").write_text(json.dumps(ds))
    overrides.append(f"parallel.ds_config_student={root / f'ds_{name}.json'}")
    # glibc returns blocks of 128 kB and more to the system when they are freed, so the resident memory
    # follows the live tensors (as the CUDA allocator's allocated bytes do) rather than malloc's caches
    run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", *overrides,
                  env={"KD_TEST_MEMORY": str(root / f"memory-{name}"), "MALLOC_MMAP_THRESHOLD_": "131072"})
    measured = [json.loads((root / f"memory-{name}.rank{r}").read_text()) for r in (0, 1)]
    used = max(m["peak"] - m["before_models"] for m in measured)
    p = plan.compute(load_config(str(kd_setup / "recipe.yaml"), overrides), nproc=2)
    rows = "\n".join(f"  {k}: {v * 1e3:.1f} MB" for k, v in p.rows)
    return p.total * plan.GB + p.cpu, used, rows


@pytest.fixture(scope="module")
def runs(kd_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-memory")
    _models(kd_setup, root)
    return {"base": _measure(kd_setup, root, "base"),
            # one setting changed at a time: each moves one row of the plan
            "bucket": _measure(kd_setup, root, "bucket", bucket=30_000_000),
            "no prefetch": _measure(kd_setup, root, "no-prefetch", prefetch=1_000_000),
            "micro-batch": _measure(kd_setup, root, "micro-batch", "train.micro_batch=16")}


def test_plan_matches_measured_peak(runs):
    planned, used, rows = runs["base"]
    print(f"planned {planned / 1e6:.0f} MB, measured {used / 1e6:.0f} MB per rank\n{rows}")
    assert planned == pytest.approx(used, rel=0.2), f"planned {planned / 1e6:.0f} MB, measured {used / 1e6:.0f}\n{rows}"


@pytest.mark.parametrize("change", ["bucket", "no prefetch", "micro-batch"])
def test_each_row_moves_as_measured(runs, change):
    """The gradient bucket (+100 MB at 3e7), the weights gathered ahead (-196 MB with a prefetch bucket
    of 1e6) and the activations (+200 MB at twice the micro-batch): the plan's change against the
    measured one."""
    (p0, u0, _), (p1, u1, rows) = runs["base"], runs[change]
    print(f"{change}: planned {(p1 - p0) / 1e6:+.0f} MB, measured {(u1 - u0) / 1e6:+.0f} MB")
    assert abs(p1 - p0) > 50e6                                   # the change is big enough to measure
    assert p1 - p0 == pytest.approx(u1 - u0, rel=0.25), f"{change}: planned {(p1 - p0) / 1e6:+.0f} MB, measured " \
        f"{(u1 - u0) / 1e6:+.0f} MB\n{rows}"
