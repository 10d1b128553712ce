"""kd-convert plumbing: bad input, atomic output, sharding, verify and vocab-check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert_fixtures import gemma2_config, hf_state, llama_config, logits, random_model, write_gemma_spm
from tools.convert import main
from tools.errors import ConvertError
from tools.io import ShardedSafetensorsWriter, atomic_output_dir, parse_size

TOKENS = [2, 7, 19, 250, 31, 4, 88, 120]


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama") / "hf"
    random_model(llama_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def meta2(tmp_path_factory, llama_hf):
    d = tmp_path_factory.mktemp("meta") / "meta"
    assert main(["hf-to-meta-llama3", str(llama_hf), str(d), "--num-shards", "2"]) == 0
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _err(capsys) -> str:
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad input

def test_missing_shard_is_named(meta2, tmp_path, capsys):
    src = _copy(meta2, tmp_path / "a")
    (src / "consolidated.01.pth").unlink()
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert "consolidated.01.pth" in err and "2 model-parallel shards" in err
    src = _copy(meta2, tmp_path / "b")
    (src / "consolidated.00.pth").unlink()
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "out")]) == 2
    assert f"missing shard {src / 'consolidated.00.pth'}" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_is_named(meta2, tmp_path, capsys):
    src = _copy(meta2, tmp_path / "a")
    (src / "consolidated.01.pth").write_bytes(b"not a checkpoint")
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "out")]) == 2
    assert f"cannot read {src / 'consolidated.01.pth'}" in _err(capsys)


def test_unknown_tensor_is_named(meta2, tmp_path, capsys):
    src = _copy(meta2, tmp_path / "a")
    for k in range(2):
        shard = torch.load(src / f"consolidated.{k:02d}.pth")
        shard["layers.1.attention.wz.weight"] = torch.zeros(4, 4)
        torch.save(shard, src / f"consolidated.{k:02d}.pth")
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert "unknown tensor 'layers.1.attention.wz.weight'" in err and "consolidated." in err
    # present in one shard only: the shard is named
    shard = torch.load(src / "consolidated.00.pth")
    del shard["layers.1.attention.wz.weight"]
    torch.save(shard, src / "consolidated.00.pth")
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "out")]) == 2
    assert f"'layers.1.attention.wz.weight' in {src / 'consolidated.01.pth'}" in _err(capsys)


def test_shape_mismatch_is_named(meta2, tmp_path, capsys):
    src = _copy(meta2, tmp_path / "a")
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    assert main(["meta-llama3-to-hf", str(src), str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert "shape mismatch for 'model.layers.0.self_attn.k_proj.weight'" in err and "consolidated." in err


def test_wrong_family_is_refused(llama_hf, tmp_path, capsys):
    assert main(["hf-to-gemma2", str(llama_hf), str(tmp_path / "out")]) == 2
    assert "wrong family" in _err(capsys)
    google = tmp_path / "google"
    google.mkdir()
    torch.save({"model_state_dict": {"embedder.weight": torch.zeros(8, 4)}}, google / "model.ckpt")
    assert main(["gemma2-to-hf", str(google), str(tmp_path / "out"), "--config", str(llama_hf / "config.json")]) == 2
    assert "'llama' model, not gemma2 (wrong family)" in _err(capsys)
    assert main(["meta-llama3-to-hf", str(llama_hf), str(tmp_path / "out")]) == 2
    assert "params.json" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_failed_conversion_leaves_output_untouched(meta2, tmp_path, capsys):
    src = _copy(meta2, tmp_path / "src")
    for k in range(2):  # an unknown tensor at the very end: earlier shards are already on disk when it fails
        shard = torch.load(src / f"consolidated.{k:02d}.pth")
        shard["zzz.weight"] = torch.zeros(2)
        torch.save(shard, src / f"consolidated.{k:02d}.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    assert main(["meta-llama3-to-hf", str(src), str(out)]) == 2
    assert "already exists" in _err(capsys)
    assert main(["meta-llama3-to-hf", str(src), str(out), "--overwrite", "--max-shard-size", "20KB"]) == 2
    assert "zzz.weight" in _err(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dir left behind
    # and a successful --overwrite replaces the directory as a whole
    assert main(["meta-llama3-to-hf", str(meta2), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_atomic_output_dir_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cli_user_error_is_one_paragraph_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.convert", "meta-llama3-to-hf", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope" in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("kd-convert")] == proc.stderr.strip().splitlines()[-1:]


# ------------------------------------------------------------------------------- io building blocks

def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100kb") == 100_000 and parse_size("123") == 123
    for bad in ("five gigs", "5iB"):
        with pytest.raises(ConvertError):
            parse_size(bad)


def test_writer_gives_tied_tensors_their_own_storage(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 3)
    writer = ShardedSafetensorsWriter(tmp_path, 10**6)
    writer.add("a", w)
    writer.add("b", w)  # same storage: safetensors would refuse this
    writer.add("c", w[:2])  # a view of a larger storage
    assert writer.close() == ["model.safetensors"]
    sd = load_file(tmp_path / "model.safetensors")
    assert torch.equal(sd["a"], w) and torch.equal(sd["b"], w) and torch.equal(sd["c"], w[:2])


def test_sharded_output_loads(meta2, llama_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["meta-llama3-to-hf", str(meta2), str(tmp_path / "hf"), "--max-shard-size", "100KB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((tmp_path / "hf" / f).stat().st_size <= 100_000 + 10_000 for f in files)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    original = AutoModelForCausalLM.from_pretrained(llama_hf)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    a, b = hf_state(model), hf_state(original)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_option(meta2, tmp_path):
    from safetensors.torch import load_file

    assert main(["meta-llama3-to-hf", str(meta2), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------- zero-to-hf: which tag

def _fake_tags(run: Path, tags: dict[str, tuple[str, ...]]) -> Path:
    """Tag dirs holding empty files of the given names: enough to resolve a checkpoint (nothing is loaded)."""
    for tag, names in tags.items():
        (run / tag).mkdir(parents=True)
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", *names):
            (run / tag / name).touch()
    return run


def test_zero_to_hf_refuses_an_interrupted_save_however_named(tmp_path, capsys):
    from tools.zero_to_hf import resolve_checkpoint

    # the training stack's layout: step 6 was killed mid-save (trainer state written, no COMPLETE)
    run = _fake_tags(tmp_path / "run", {"step_00000002": ("COMPLETE",), "step_00000004": ("COMPLETE",),
                                        "step_00000006": ("trainer_state_rank0.pt",)})
    (run / "latest").write_text("step_00000004")
    for args in ([str(run / "step_00000006")], [str(run), "--tag", "step_00000006"]):
        assert main(["zero-to-hf", *args, str(tmp_path / "out")]) == 2
        err = _err(capsys)
        assert f"checkpoint {run / 'step_00000006'} has no COMPLETE marker" in err
        assert f"previous complete checkpoint instead: {run / 'step_00000004'}" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert resolve_checkpoint(run / "step_00000004", None) == (run, run / "step_00000004")
    assert resolve_checkpoint(run, None) == (run, run / "step_00000004")
    # the run's first save interrupted: no complete sibling, but the stack's trainer state gives it away
    first = _fake_tags(tmp_path / "first", {"step_00000002": ("trainer_state_rank0.pt", "trainer_state_rank1.pt")})
    with pytest.raises(ConvertError, match="no COMPLETE marker.*holds no complete checkpoint yet"):
        resolve_checkpoint(first / "step_00000002", None)
    # plain DeepSpeed checkpoints never have the marker: taken as they are, however the tag is given
    plain = _fake_tags(tmp_path / "plain", {"global_step2": (), "global_step4": ()})
    assert resolve_checkpoint(plain / "global_step2", None) == (plain, plain / "global_step2")
    assert resolve_checkpoint(plain, "global_step4") == (plain, plain / "global_step4")


# ----------------------------------------------------------------------------------------- verify

def test_verify_passes_on_conversions_and_fails_on_changes(llama_hf, meta2, tmp_path, capsys):
    assert main(["--json", "verify", str(meta2), str(llama_hf), "--tol", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] == 0.0 and result["top1_agreement"] == 1.0 and result["ok"]
    # a perturbed copy fails, with a non-zero exit
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_hf)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.05)
    model.save_pretrained(tmp_path / "changed")
    assert main(["--json", "verify", str(llama_hf), str(tmp_path / "changed"), "--tokens", "1,2,3,4,5,6"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] > 1e-3 and not result["ok"] and result["tokens"] == 6
    assert main(["verify", str(llama_hf), str(tmp_path / "changed"), "--tokens", "1,2,3", "--tol", "10",
                 "--min-top1", "0"]) == 0


def test_verify_reports_each_vocab_size(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    big = random_model(llama_config(vocab_size=400))
    big.save_pretrained(tmp_path / "big")
    small = AutoModelForCausalLM.from_config(llama_config(vocab_size=304))  # big's first 304 rows
    small.load_state_dict({k: v[:304] if k in ("model.embed_tokens.weight", "lm_head.weight") else v
                           for k, v in big.state_dict().items()})
    small.save_pretrained(tmp_path / "small")
    assert main(["--json", "verify", str(tmp_path / "big"), str(tmp_path / "small"), "--tol", "1e-5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["vocab_a"], result["vocab_b"], result["compared_vocab"]) == (400, 304, 304)
    assert result["max_abs_diff"] <= 1e-5 and result["top1_agreement"] == 1.0


def test_verify_gemma_release_against_hf(tmp_path, capsys):
    model = random_model(gemma2_config())
    model.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-gemma2", str(tmp_path / "hf"), str(tmp_path / "google")]) == 0
    (tmp_path / "google" / "params.json").rename(tmp_path / "g.json")
    assert main(["--json", "verify", str(tmp_path / "google" / "model.ckpt"), str(tmp_path / "hf"),
                 "--gemma-config-a", str(tmp_path / "g.json"), "--tol", "0"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "google" / "model.ckpt"), str(tmp_path / "hf")]) == 2
    assert "--config" in _err(capsys)


# ------------------------------------------------------------------------------------ vocab-check

@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    from transformers import GemmaTokenizer

    d = tmp_path_factory.mktemp("tok")
    write_gemma_spm(d / "tokenizer.model", vocab_size=300)
    return GemmaTokenizer(**GemmaTokenizer.convert_to_native_format(vocab_file=str(d / "tokenizer.model")))


def _with_tokenizer(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_vocab_check_padded_rows_and_resize(spm_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher = _with_tokenizer(random_model(gemma2_config(vocab_size=300)), spm_tokenizer, tmp_path / "teacher")
    student_model = random_model(llama_config(vocab_size=320))  # padded to a multiple of 64
    student = _with_tokenizer(student_model, spm_tokenizer, tmp_path / "student")
    assert main(["--json", "vocab-check", str(teacher), str(student)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["token_to_token"] and not r["same_logit_width"]
    assert (r["teacher_padded_rows"], r["student_padded_rows"]) == (0, 20)
    assert "distillable token-to-token, but logit widths differ" in r["verdict"]

    assert main(["--json", "vocab-check", str(teacher), str(student), "--resize", "--out", str(tmp_path / "r")]) == 0
    resized = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert resized.config.vocab_size == 300 and resized.lm_head.weight.shape[0] == 300
    assert torch.equal(logits(resized, TOKENS), logits(student_model, TOKENS)[:, :300])  # only padding removed
    assert (tmp_path / "r" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["vocab-check", str(teacher), str(tmp_path / "r")]) == 0
    assert "same tokenizer and same logit width" in capsys.readouterr().out
    # padding up: new rows are the mean embedding; real tokens keep their logits
    assert main(["vocab-check", str(teacher), str(student), "--resize", "--rows", "384", "--out",
                 str(tmp_path / "p")]) == 0
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    emb = padded.model.embed_tokens.weight
    assert emb.shape[0] == 384 and torch.allclose(emb[350], student_model.model.embed_tokens.weight.mean(0))
    assert torch.equal(logits(padded, TOKENS)[:, :320], logits(student_model, TOKENS))
    # trimming real tokens is refused
    assert main(["vocab-check", str(teacher), str(student), "--resize", "--rows", "256", "--out",
                 str(tmp_path / "t")]) == 2
    assert "only padding rows" in _err(capsys)


def test_vocab_check_different_tokenizers(spm_tokenizer, tmp_path, capsys):
    from transformers import GemmaTokenizer

    write_gemma_spm(tmp_path / "other.model", vocab_size=320, seed=7)
    other = GemmaTokenizer(**GemmaTokenizer.convert_to_native_format(vocab_file=str(tmp_path / "other.model")))
    teacher = _with_tokenizer(random_model(gemma2_config(vocab_size=300)), spm_tokenizer, tmp_path / "teacher")
    student = _with_tokenizer(random_model(gemma2_config(vocab_size=320)), other, tmp_path / "student")
    assert main(["--json", "vocab-check", str(teacher), str(student)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert not r["token_to_token"] and r["differing_ids"] > 0 and "NOT distillable" in r["verdict"]
