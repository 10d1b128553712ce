"""Worker for test_sp: DeepSpeed Ulysses sequence parallelism (SP=2) gives the same fused KD loss
and first-step gradients as one process on the whole sequence (SP=1). Writes JSON on rank 0.

Recipe (what a sequence-parallel trainer has to do):
  * shift the labels on the WHOLE sequence (``train.data.shift_labels``) and only then shard;
  * pass ``position_ids`` holding the GLOBAL positions of the shard (Ulysses all-gathers them;
    local ``arange(T/2)`` puts RoPE at the wrong positions); no attention_mask (Ulysses drops it,
    sdpa then runs with ``is_causal`` over the gathered sequence);
  * ``UlyssesSPAttentionHF.register_with_transformers`` replaces ``ALL_ATTENTION_FUNCTIONS["sdpa"]``
    process-wide, so every sdpa model (the teacher too) goes through Ulysses afterwards: the one
    wrapper is built for ONE attention geometry (heads / kv heads / head dim of the model it was
    given), and the teacher must match it or be run another way;
  * ``fused_distill_loss(..., group=<SP group>)`` and the engine's gradient average over that group.
"""
import argparse
import json

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kd
from train.parallel import init_distributed
from train.data import shift_labels

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--local_rank", type=int, default=0)   # the deepspeed launcher adds it
out_path = parser.parse_args().out
torch.set_num_threads(1)
init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
SP = world

B, T, V, PROMPT = 2, 32, 128, 8
CFG = dict(method="grkd", k=8, progress=0.3, chunk_size=16)
WATCH = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]


def tiny_llama(seed):
    torch.manual_seed(seed)         # same seed on every rank: identical initial weights, no broadcast needed
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).train()


student, teacher = tiny_llama(1), tiny_llama(2)
teacher.requires_grad_(False)

g = torch.Generator().manual_seed(0)
input_ids = torch.randint(0, V, (B, T), generator=g)
raw_labels = input_ids.clone()
raw_labels[:, :PROMPT] = -100
labels = shift_labels(raw_labels)                     # shift on the whole sequence, BEFORE sharding
position_ids = torch.arange(T).unsqueeze(0).expand(B, T)


def step(ids, pos, lab, group):
    """Forward student + teacher, fused KD loss, backward; returns (loss, {name: grad})."""
    student.zero_grad(set_to_none=True)
    hs = student.model(input_ids=ids, position_ids=pos).last_hidden_state
    with torch.no_grad():
        ht = teacher.model(input_ids=ids, position_ids=pos).last_hidden_state
    loss, stats = kd.fused_distill_loss(hs.reshape(-1, hs.shape[-1]), student.lm_head.weight,
                                        ht.reshape(-1, ht.shape[-1]), teacher.lm_head.weight, lab.reshape(-1),
                                        group=group, grads_averaged=True, **CFG)
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in student.named_parameters()}
    return loss.item(), grads, stats


# ---- SP=1 reference: every rank, whole batch, no group, plain sdpa (BEFORE registering Ulysses) ----
ref_loss, ref_grads, ref_stats = step(input_ids, position_ids, labels, None)
plain_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

# ---- SP=2: Ulysses attention over both ranks ----
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: E402

mpu = UlyssesSPAttentionHF.register_with_transformers(
    model_name_or_path=student, core_attn_implementation="sdpa", sequence_parallel_size=SP,
    micro_batch_size=B, seq_length=T, seq_length_is_variable=True)
sp_group = mpu.get_sequence_parallel_group()
sp_rank, sp_world = mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size()
L = T // sp_world
shard = slice(sp_rank * L, (sp_rank + 1) * L)


def sp_average(grads):
    """What DeepSpeed's gradient all-reduce does over the (sequence-)data-parallel ranks: average."""
    out = {}
    for n, gr in grads.items():
        gr = gr.clone()
        dist.all_reduce(gr, op=dist.ReduceOp.SUM, group=sp_group)
        out[n] = gr / sp_world
    return out


def compare(loss, grads):
    diffs = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads}
    return {"loss": loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
            "grad_max_abs_diff": max(diffs.values()),
            "grad_ref_max_abs": max(gr.abs().max().item() for gr in ref_grads.values()),
            "watched": {n: diffs[n] for n in WATCH}}


sp_loss, sp_grads, sp_stats = step(input_ids[:, shard], position_ids[:, shard], labels[:, shard], sp_group)
result = {"world": world, "sp_world": sp_world, "ref_loss": ref_loss, "ref_tokens": float(ref_stats["tokens"]),
          "sp_tokens": float(sp_stats["tokens"]), "sp": compare(sp_loss, sp_average(sp_grads)),
          "sdpa_replaced": ALL_ATTENTION_FUNCTIONS["sdpa"] is not plain_sdpa}

# ---- negative controls: each must differ from the reference ----
# (a) labels shifted AFTER sharding: the label of the shard's last token (on the next rank) is lost
bad_labels = shift_labels(raw_labels[:, shard])
loss_a, grads_a, stats_a = step(input_ids[:, shard], position_ids[:, shard], bad_labels, sp_group)
result["shift_after_shard"] = {**compare(loss_a, sp_average(grads_a)), "tokens": float(stats_a["tokens"])}
# (b) local position_ids (arange of the shard on every rank): RoPE at wrong positions
local_pos = torch.arange(L).unsqueeze(0).expand(B, L)
loss_b, grads_b, _ = step(input_ids[:, shard], local_pos, labels[:, shard], sp_group)
result["local_position_ids"] = compare(loss_b, sp_average(grads_b))
# (c) no group in the loss: each rank's own mean (and no x2 scale) - wrong loss
loss_c, grads_c, _ = step(input_ids[:, shard], position_ids[:, shard], labels[:, shard], None)
result["no_group"] = compare(loss_c, sp_average(grads_c))

if rank == 0:
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
# A clean shutdown: a rank leaving with live communicator threads can abort ("terminate called").
dist.barrier()
dist.destroy_process_group()
