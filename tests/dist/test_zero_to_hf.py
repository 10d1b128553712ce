"""zero-to-hf on a real ZeRO-3 checkpoint written by 2 deepspeed ranks (CPU, gloo).

One launch (this file run as a script by the deepspeed launcher) trains two tiny students for two
steps and saves them; every test below reuses that checkpoint:
  * gemma: Gemma-2 with tied embeddings and odd-sized params (partition padding), two optimizer
    param groups and small ZeRO sub-groups (several flat fp32 groups per rank); the run's config,
    generation config and SentencePiece tokenizer are saved in checkpoints/hf_meta/.
  * llama: an untied Llama student inside a KD wrapper with a frozen teacher (`teacher.*`) and
    an extra trainable projection (`proj.*`) that is not part of the student; the student's
    final norm is frozen (it must still be exported).
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist
TOKENS = [2, 5, 17, 99, 42, 7, 250, 3, 11, 64, 128, 9]


# ------------------------------------------------------------------------------------ worker side

def _worker(out: Path) -> None:
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.integrations import HfDeepSpeedConfig

    from tests.convert_fixtures import gemma2_config, llama_config, write_gemma_spm
    from train.parallel import init_distributed

    init_distributed()
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
                 "zero_optimization": {"stage": 3, "sub_group_size": 3000, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_config build partitioned (zero.Init) models

    def param_groups(module):
        decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim <= 1]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]

    def batch(step, vocab):
        g = torch.Generator().manual_seed(100 * step + rank)
        return torch.randint(0, vocab, (2, 12), generator=g)

    def save_logits(engine, run, fn):
        engine.eval()
        with torch.no_grad():
            result = fn(torch.tensor([TOKENS]))
        if rank == 0:
            torch.save(result, out / run / "engine_logits.pt")

    # --- run 1: a Gemma-2 student, tied embeddings, odd sizes
    gcfg = gemma2_config(hidden_size=33, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                         intermediate_size=50, vocab_size=300)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(gcfg)
    engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(param_groups(student), lr=1e-2),
                                      config=ds_config)
    for step in range(2):
        ids = batch(step, gcfg.vocab_size)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    ckpt = out / "gemma" / "checkpoints"
    engine.save_checkpoint(str(ckpt))
    save_logits(engine, "gemma", lambda ids: engine(input_ids=ids).logits[0])
    if rank == 0:
        meta = ckpt / "hf_meta"
        meta.mkdir(parents=True, exist_ok=True)
        gcfg.save_pretrained(meta)
        GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, max_new_tokens=7).save_pretrained(meta)
        write_gemma_spm(meta / "tokenizer.model", vocab_size=gcfg.vocab_size)
        if importlib.util.find_spec("google.protobuf") is not None:  # needed to convert it for HF
            from transformers import GemmaTokenizer
            tok = GemmaTokenizer(**GemmaTokenizer.convert_to_native_format(vocab_file=str(meta / "tokenizer.model")))
            tok.save_pretrained(meta)
    dist.barrier()

    # --- run 2: an untied Llama student wrapped with a frozen teacher and an extra projection
    lcfg = llama_config(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=300)

    class KDWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.student = AutoModelForCausalLM.from_config(lcfg)
            torch.manual_seed(2)
            self.teacher = AutoModelForCausalLM.from_config(lcfg)
            self.teacher.requires_grad_(False)
            self.proj = torch.nn.Linear(32, 32, bias=False)
            # a frozen student weight: exported from the frozen fragments, not the optimizer
            norm = self.student.model.norm.weight
            with deepspeed.zero.GatheredParameters([norm], modifier_rank=0):
                norm.data.copy_(torch.linspace(0.5, 1.5, norm.numel()))
            norm.requires_grad_(False)

        def forward(self, ids):
            out = self.student(input_ids=ids, output_hidden_states=True)
            with torch.no_grad():
                t = self.teacher(input_ids=ids, output_hidden_states=True)
            kl = F.kl_div(out.logits.log_softmax(-1), t.logits.log_softmax(-1), log_target=True,
                          reduction="batchmean")
            return kl + F.mse_loss(self.proj(out.hidden_states[-1]), t.hidden_states[-1])

    wrapper = KDWrapper()
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=torch.optim.AdamW(param_groups(wrapper), lr=1e-2),
                                      config=ds_config)
    for step in range(2):
        engine.backward(engine(batch(step, lcfg.vocab_size)))
        engine.step()
    ckpt = out / "llama" / "checkpoints"
    engine.save_checkpoint(str(ckpt))
    save_logits(engine, "llama", lambda ids: engine.module.student(input_ids=ids).logits[0])
    if rank == 0:
        (ckpt / "hf_meta").mkdir(parents=True, exist_ok=True)
        lcfg.save_pretrained(ckpt / "hf_meta")
    dist.barrier()
    del keep_alive
    dist.destroy_process_group()   # a rank leaving with live communicator threads can abort


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _worker(Path(sys.argv[sys.argv.index("--out") + 1]))
    sys.exit(0)


# ------------------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from .launch import run_deepspeed

    out = tmp_path_factory.mktemp("zero3")
    run_deepspeed(Path(__file__), "--out", out, nproc=2, timeout=300, env={"TRANSFORMERS_VERBOSITY": "error"})
    return out


def _convert(args):
    from tools.convert import main

    return main(["--json", "zero-to-hf", *map(str, args)])


def _reference(ckpt_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0]


def test_gemma_tied_equals_zero_to_fp32(runs, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt = runs / "gemma" / "checkpoints"
    # a small shard size forces several shards, each built from per-rank partitions
    assert _convert([ckpt, tmp_path / "hf", "--max-shard-size", "40KB"]) == 0
    report = json.loads(capsys.readouterr().out)
    hf = tmp_path / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((hf / s).is_file() for s in shards)
    # memory bound: never more than one output shard gathered or buffered at a time
    assert report["peak_buffered_bytes"] <= 40_000 and report["peak_gathered_bytes"] <= 40_000
    assert report["ranks"] == 2 and report["rank_file_loads"] == 2 * len(shards)
    names = set(index["weight_map"])
    assert "lm_head.weight" not in names  # tied: written once, re-tied by from_pretrained

    ref = _reference(ckpt)
    assert set(ref) - names == {"lm_head.weight"}
    for name in names:
        with safe_open(hf / index["weight_map"][name], "pt") as f:
            assert torch.equal(f.get_tensor(name), ref[name]), name  # exact in fp32

    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    engine_logits = torch.load(runs / "gemma" / "engine_logits.pt")
    diff = (_logits(model) - engine_logits).abs().max().item()
    print(f"zero-to-hf gemma2 vs live ZeRO-3 engine: max abs logit diff {diff:.2e}")
    assert diff < 1e-5
    # metadata travelled from hf_meta/
    assert GenerationConfig.from_pretrained(hf).max_new_tokens == 7
    assert (hf / "tokenizer.model").read_bytes() == (ckpt / "hf_meta" / "tokenizer.model").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).is_file() == (ckpt / "hf_meta" / name).is_file()
    if (hf / "tokenizer.json").is_file():
        assert AutoTokenizer.from_pretrained(hf)("the cat")["input_ids"] == \
            AutoTokenizer.from_pretrained(ckpt / "hf_meta")("the cat")["input_ids"]


def test_bf16_output_and_tag(runs, tmp_path):
    from safetensors.torch import load_file

    ckpt = runs / "gemma" / "checkpoints"
    assert _convert([ckpt, tmp_path / "hf", "--dtype", "bf16", "--tag", "global_step2"]) == 0
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    ref = _reference(ckpt)
    assert all(sd[n].dtype == torch.bfloat16 and torch.equal(sd[n], ref[n].to(torch.bfloat16)) for n in sd)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    # the tag dir given directly: a plain DeepSpeed checkpoint (no COMPLETE marker anywhere) converts the same
    assert _convert([ckpt / "global_step2", tmp_path / "direct", "--dtype", "bf16"]) == 0
    direct = tmp_path / "direct" / "model.safetensors"
    assert direct.read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


def test_streamed_tensors_are_plain(runs):
    from tools.zero_to_hf import ZeroSource

    # The saved flat partitions require grad; outputs must not be tied to them by autograd (that kept
    # every rank's memory-mapped file alive until the end: no streaming).
    src = ZeroSource(runs / "gemma" / "checkpoints")
    assert not any(t.requires_grad or t.grad_fn is not None for _, t, _ in src.tensors(budget_bytes=20_000))


def test_student_only_no_teacher(runs, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpt = runs / "llama" / "checkpoints"
    # the extra trainable projection is not part of the student: refused unless dropped explicitly
    assert _convert([ckpt, tmp_path / "refused"]) == 2
    err = capsys.readouterr().err
    assert "proj.weight" in err and "--drop" in err and "model_states.pt" in err
    assert not (tmp_path / "refused").exists()

    assert _convert([ckpt, tmp_path / "hf", "--drop", r"^proj\."]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix"] == "student." and report["excluded_frozen"] > 0 and report["dropped_trainable"] == 1
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    ref = _reference(ckpt)
    student = {k[len("student."):]: v for k, v in ref.items() if k.startswith("student.")}
    assert sd.keys() == student.keys() and "lm_head.weight" in sd  # untied head kept
    assert all(torch.equal(sd[k], student[k]) for k in sd)
    assert torch.equal(sd["model.norm.weight"], torch.linspace(0.5, 1.5, 32))  # the frozen student weight
    teacher = {k[len("teacher."):]: v for k, v in ref.items() if k.startswith("teacher.")}
    assert not torch.equal(sd["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    diff = (_logits(model) - torch.load(runs / "llama" / "engine_logits.pt")).abs().max().item()
    print(f"zero-to-hf llama (wrapped, teacher excluded) vs live ZeRO-3 engine: max abs logit diff {diff:.2e}")
    assert diff < 1e-5


def test_bad_checkpoints(runs, tmp_path, capsys):
    ckpt = runs / "gemma" / "checkpoints"
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken, symlinks=True)
    (broken / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert _convert([broken, out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and "missing" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left behind

    # the llama run's config does not describe the gemma checkpoint
    assert _convert([ckpt, tmp_path / "x", "--config-dir", runs / "llama" / "checkpoints" / "hf_meta"]) == 2
    assert "has no place in an HF llama model" in capsys.readouterr().err
    assert _convert([ckpt, tmp_path / "y", "--tag", "global_step9"]) == 2
    assert "global_step9" in capsys.readouterr().err
    # the training stack marks finished saves COMPLETE: an unmarked sibling is an interrupted save
    marked = tmp_path / "marked"
    shutil.copytree(ckpt, marked, symlinks=True)
    (marked / "global_step2" / "COMPLETE").touch()
    shutil.copytree(marked / "global_step2", marked / "global_step3")
    (marked / "global_step3" / "COMPLETE").unlink()
    assert _convert([marked, tmp_path / "z", "--tag", "global_step3"]) == 2
    assert "COMPLETE" in capsys.readouterr().err and not (tmp_path / "z").exists()
    # given directly, the interrupted tag dir is refused just the same, pointing at the complete one before it
    assert _convert([marked / "global_step3", tmp_path / "z"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {marked / 'global_step3'} has no COMPLETE marker" in err
    assert f"previous complete checkpoint instead: {marked / 'global_step2'}" in err and not (tmp_path / "z").exists()
    assert _convert([marked / "global_step2", tmp_path / "z2"]) == 0
    assert _convert([marked, tmp_path / "z"]) == 0  # 'latest' names the complete global_step2


def test_verify_zero_checkpoint_against_hf(runs, tmp_path, capsys):
    pytest.importorskip("google.protobuf")  # for the run's HF tokenizer
    from tools.convert import main

    g = runs / "gemma" / "checkpoints"
    assert _convert([g, tmp_path / "g"]) == 0
    capsys.readouterr()
    # verify loads the ZeRO directory itself (same streaming reader) and tokenizes with hf_meta's tokenizer
    assert main(["--json", "verify", str(g), str(tmp_path / "g"), "--tol", "1e-6", "--prompt", "the cat runs"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] == 0.0 and result["tokens"] > 3 and "note" not in result
