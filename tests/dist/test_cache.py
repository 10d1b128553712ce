"""The cached teacher end to end (mode=cache-teacher, then model.teacher=cache:DIR), on real deepspeed
CPU ranks: a cache holding the whole vocabulary trains exactly as the live teacher (GRKD, forward KL;
data parallel, sequence parallel with gradient accumulation, packed rows, resume), a smaller k moves
the loss less the larger it is, the files do not depend on the number of ranks, a killed build
finishes into the same files, and a cache that does not match the run is refused before any rank."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from train.cache import unpack_ids

from .conftest import LAUNCH_COMMON, kd_train, metrics
from .launch import run_deepspeed
from .test_launchers import _launch, _torchrun

pytestmark = pytest.mark.dist

FULL = ("cache.k=100000", "cache.dtype=fp32", "cache.shard_items=64")   # k is capped at the vocabulary


def build(kd_setup, out, *overrides, check=True):
    return kd_train(kd_setup / "recipe.yaml", "mode=cache-teacher", f"cache.out={out}", *overrides, check=check)


def losses(kd_setup, tmp_path, name, *overrides):
    kd_train(kd_setup / "recipe.yaml", f"output_dir={tmp_path}", f"run_name={name}", *LAUNCH_COMMON, *overrides)
    return [r["loss"] for r in metrics(tmp_path / name)]


def files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def full_cache(kd_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "full"
    proc = build(kd_setup, out, *FULL)
    assert "bytes per token on disk" in proc.stdout, proc.stdout
    return out


def test_a_full_cache_trains_as_the_live_teacher_and_a_smaller_k_less_so(kd_setup, tmp_path, full_cache,
                                                                           self_launched):
    m = json.loads((full_cache / "manifest.json").read_text())
    assert m["complete"] and m["fingerprint"]["k"] == m["fingerprint"]["vocab"] and m["shards"] == 5
    got = losses(kd_setup, tmp_path, "grkd", f"model.teacher=cache:{full_cache}")
    assert got == pytest.approx(self_launched, rel=1e-5)
    fkl = ("loss.method=forward_kl", "loss.params={}", "loss.metrics_k=4")
    live = losses(kd_setup, tmp_path, "fkl-live", *fkl)
    cached = losses(kd_setup, tmp_path, "fkl-cache", *fkl, f"model.teacher=cache:{full_cache}")
    assert cached == pytest.approx(live, rel=1e-5) and live[0] != live[-1]
    # k < V: the k + 1 category loss at step 1 (the same weights in every run) against the live one
    errors = {"V": abs(cached[0] - live[0]) / live[0]}
    for k in (4, 32):
        build(kd_setup, tmp_path / f"k{k}", f"cache.k={k}", "cache.dtype=fp32")
        step1 = losses(kd_setup, tmp_path, f"k{k}", *fkl, "train.steps=1", f"model.teacher=cache:{tmp_path / f'k{k}'}")
        errors[k] = abs(step1[0] - live[0]) / live[0]
    assert errors[4] > errors[32] > errors["V"] and errors["V"] < 1e-5, errors


def test_sequence_parallel_accumulation_and_resume_from_the_cache(kd_setup, tmp_path, full_cache):
    sp = ("parallel.sequence=2", "train.grad_accum=2", "train.micro_batch=2")
    live = losses(kd_setup, tmp_path, "sp-live", *sp)
    assert losses(kd_setup, tmp_path, "sp-cache", *sp, f"model.teacher=cache:{full_cache}") == \
        pytest.approx(live, rel=1e-5)
    # killed after step 2 of 4 and resumed: the loader's position finds the same cache rows
    cached = (f"model.teacher=cache:{full_cache}", "train.steps=4", f"output_dir={tmp_path}", "data.eval=null")
    whole = losses(kd_setup, tmp_path, "whole", *cached)
    killed = kd_train(kd_setup / "recipe.yaml", "run_name=halves", *cached, "train.save_every=2", check=False,
                      env={"KD_FAULT": "kill-during-save:4"})
    assert killed.returncode != 0
    kd_train(kd_setup / "recipe.yaml", "run_name=halves", *cached, "resume=auto")
    resumed = metrics(tmp_path / "halves")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx(whole, rel=1e-5)


def test_packed_rows_read_their_own_cache(kd_setup, tmp_path):
    out = tmp_path / "packed"
    build(kd_setup, out, *FULL, "data.pack=true")
    live = losses(kd_setup, tmp_path, "pack-live", "data.pack=true", "loss.method=forward_kl", "loss.params={}")
    cached = losses(kd_setup, tmp_path, "pack-cache", "data.pack=true", "loss.method=forward_kl", "loss.params={}",
                    f"model.teacher=cache:{out}")
    assert cached == pytest.approx(live, rel=1e-5)


def test_the_cache_does_not_depend_on_the_ranks_or_the_launcher(kd_setup, tmp_path, full_cache):
    build(kd_setup, tmp_path / "one", *FULL, "parallel.nproc=1")
    assert files(tmp_path / "one") == files(full_cache)
    _launch(_torchrun(str(kd_setup / "recipe.yaml"), "mode=cache-teacher", f"cache.out={tmp_path / 'torchrun'}", *FULL))
    assert files(tmp_path / "torchrun") == files(full_cache)
    # sequence parallel: the same rows, up to the float order of a split attention
    build(kd_setup, tmp_path / "sp", *FULL, "parallel.sequence=2")
    m = json.loads((full_cache / "manifest.json").read_text())
    bits, k = m["id_bits"], m["fingerprint"]["k"]
    for shard in sorted(full_cache.glob("shard-*")):
        a, b = load_file(shard), load_file(tmp_path / "sp" / shard.name)
        assert torch.equal(unpack_ids(a["ids"], bits, k)[:, :4], unpack_ids(b["ids"], bits, k)[:, :4])
        torch.testing.assert_close(a["values"], b["values"], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["log_tail"], b["log_tail"], rtol=0, atol=1e-4)


def test_a_killed_build_finishes_into_the_same_files(kd_setup, tmp_path, full_cache):
    out = tmp_path / "killed"
    proc = run_deepspeed("tests/dist/instrumented_worker.py", kd_setup / "recipe.yaml", "mode=cache-teacher",
                         f"cache.out={out}", *FULL, env={"KD_TEST_KILL_IN_SHARD": "2"}, check=False)
    assert proc.returncode != 0
    assert not (json.loads((out / "manifest.json").read_text()))["complete"]
    tmp = list(out.glob(".shard-*.tmp-*"))
    assert tmp, sorted(p.name for p in out.iterdir())          # killed mid-write
    for t in tmp:                                               # a live writer's file is left alone: age it
        os.utime(t, (time.time() - 3600, time.time() - 3600))
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert 0 < len(written) < 5
    refused = kd_train(kd_setup / "recipe.yaml", f"model.teacher=cache:{out}", f"output_dir={tmp_path}", check=False)
    assert refused.returncode == 2 and "incomplete" in refused.stderr and "Traceback" not in refused.stderr

    proc = build(kd_setup, out, *FULL)
    assert f"{5 - len(written)} of 5 shards to write" in proc.stdout, proc.stdout
    assert files(out) == files(full_cache)
    assert all((out / n).stat().st_mtime_ns == t for n, t in written.items())    # kept, not rewritten
    again = build(kd_setup, out, *FULL)
    assert "complete already" in again.stdout and files(out) == files(full_cache)


@pytest.mark.parametrize("override,names", [
    ("data.max_len=40", ["data.max_len=48", "data.max_len=40"]),
    ("data.pack=true", ["data.pack=false", "data.pack=true"]),
    ("loss.temperature=2.0", ["loss.temperature=2", "temperature 1"]),
    ("loss.params.k=4096", ["k=4096 is more than the cache's k="]),
    ("loss.method=rlkd loss.params={}", ["ranks the union", "live teacher"]),
])
def test_a_cache_that_does_not_match_the_run_is_refused(kd_setup, tmp_path, full_cache, override, names):
    proc = kd_train(kd_setup / "recipe.yaml", f"model.teacher=cache:{full_cache}", f"output_dir={tmp_path}",
                    *override.split(), check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "spawned" not in proc.stdout + proc.stderr
    assert all(n in proc.stderr for n in names), proc.stderr
    assert not (tmp_path / "t").exists()


def test_another_data_file_or_tokenizer_is_refused_and_a_build_never_mixes(kd_setup, tmp_path, full_cache):
    other = tmp_path / "train.jsonl"
    lines = (kd_setup / "data" / "train.jsonl").read_text().splitlines()
    other.write_text("\n".join(lines[:-1]) + "\n")
    proc = kd_train(kd_setup / "recipe.yaml", f"model.teacher=cache:{full_cache}", f"data.train={other}",
                    f"output_dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2 and "another data.train file" in proc.stderr, proc.stderr
    from train.demo_task import demo_texts
    from train.tokenizer import train_sentencepiece
    train_sentencepiece(demo_texts(kd_setup / "data" / "train.jsonl"), tmp_path / "tok", vocab_size=340)
    proc = kd_train(kd_setup / "recipe.yaml", f"model.teacher=cache:{full_cache}", f"data.tokenizer={tmp_path / 'tok'}",
                    f"output_dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr, proc.stderr
    before = files(full_cache)
    proc = build(kd_setup, full_cache, "cache.k=8", "cache.dtype=fp32", "cache.shard_items=64", check=False)
    assert proc.returncode == 2 and "holds a cache of another setup (k: 360 there, 8 now" in proc.stderr, proc.stderr
    assert files(full_cache) == before
