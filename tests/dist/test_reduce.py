"""2 real deepspeed ranks (CPU, gloo): the sharded loss and its gradients equal one process."""
import json

import pytest

from .launch import run_deepspeed

pytestmark = pytest.mark.dist


def test_sharded_loss_and_gradients_equal_one_process(tmp_path):
    out = tmp_path / "reduce.json"
    run_deepspeed("tests/dist/reduce_worker.py", out)
    r = json.loads(out.read_text())
    assert r["world"] == 2
    for split in ("dp", "sp"):
        for averaged in ("True", "False"):
            res = r[f"{split}_{averaged}"]
            assert res["loss"] == pytest.approx(r["ref_loss"], rel=1e-12), (split, averaged)
            assert res["grad_h_maxdiff"] < 1e-12 and res["grad_w_maxdiff"] < 1e-12, (split, averaged, res)
            assert res["stats_maxdiff"] < 1e-12, res
    assert r["materialised"] == pytest.approx(r["materialised_ref"], rel=1e-12)
    empty = r["one_rank_empty"]
    assert empty["loss"] == pytest.approx(empty["ref"], rel=1e-12)
    assert empty["tokens"] == empty["ref_tokens"]
