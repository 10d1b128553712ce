"""2 real deepspeed ranks (CPU, gloo): Ulysses sequence parallelism (SP=2) gives the same fused KD
loss and first-step gradients as one process on the whole sequence; see sp_worker.py."""
import json

import pytest

from .launch import run_deepspeed

pytestmark = pytest.mark.dist


def test_ulysses_sp2_matches_one_process(tmp_path):
    out = tmp_path / "sp.json"
    run_deepspeed("tests/dist/sp_worker.py", out, timeout=300)
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["sp_world"] == 2
    assert r["sdpa_replaced"], "Ulysses did not take over the sdpa attention"
    assert r["sp_tokens"] == r["ref_tokens"] == 2 * (32 - 8)   # B * (T - prompt): last label -100, prompt shifted
    sp = r["sp"]
    assert sp["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    assert sp["grad_max_abs_diff"] < 1e-4, sp
    assert sp["grad_ref_max_abs"] > 1e-3, "gradients too small to compare"
    # negative controls: each mistake must be caught by the same tolerances
    assert r["shift_after_shard"]["tokens"] < r["ref_tokens"]
    for bad in ("shift_after_shard", "local_position_ids", "no_group"):
        assert r[bad]["loss_rel_diff"] > 1e-4, (bad, r[bad])
        assert r[bad]["grad_max_abs_diff"] > 1e-4, (bad, r[bad])
