"""KD step vs SFT step: tokens/s of the same student on the same batches, in one run.

KD step = teacher forward (no grad) + student forward/backward + fused distillation loss + AdamW.
SFT step = student forward/backward + fused cross-entropy + AdamW. The ratio of their times is
printed next to the FLOP-model ideal ``1 + 2 N_teacher / (6 N_student)`` (N: parameters that do
matmuls per token, i.e. without the input embedding). One process, no ZeRO: this measures the
compute of the step itself; the ZeRO-3 equality with stage 0 is a test (tests/dist).

    python benchmarks/step_bench.py                  # teacher ~4x the student, V=8192, 8 x 256 tokens
    python benchmarks/step_bench.py --method rlkd --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kd


def llama(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def matmul_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def hidden(model, ids):
    return model.model(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="grkd")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--student", default="256x4", help="hidden x layers")
    ap.add_argument("--teacher", default="512x8", help="hidden x layers")
    args = ap.parse_args()
    torch.manual_seed(0)
    sh, sl = map(int, args.student.split("x"))
    th, tl = map(int, args.teacher.split("x"))
    student, teacher = llama(sh, sl, args.vocab), llama(th, tl, args.vocab).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100)], 1).flatten()
    n_s, n_t = matmul_params(student), matmul_params(teacher)

    def kd_step():
        with torch.no_grad():
            t_h = hidden(teacher, ids)
        loss, _ = kd.fused_distill_loss(hidden(student, ids), student.lm_head.weight, t_h, teacher.lm_head.weight,
                                        labels, method=args.method, progress=0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sft_step():
        loss, _ = kd.fused_distill_loss(hidden(student, ids), student.lm_head.weight, None, None, labels,
                                        method="sft")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"sft": [], "kd": []}
    for i in range(args.steps + 1):          # interleaved, so drift in machine load hits both alike
        for name, fn in (("sft", sft_step), ("kd", kd_step)):
            t0 = time.perf_counter()
            fn()
            if i:                             # the first round warms up allocators and kernels
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    ideal = 1 + 2 * n_t / (6 * n_s)
    print(f"student {n_s / 1e6:.1f}M, teacher {n_t / 1e6:.1f}M matmul params; V={args.vocab}; "
          f"{args.batch}x{args.seq} tokens; threads={torch.get_num_threads()}; method={args.method}")
    print(f"SFT step {med['sft'] * 1e3:.0f} ms ({tokens / med['sft']:.0f} tokens/s)")
    print(f"KD  step {med['kd'] * 1e3:.0f} ms ({tokens / med['kd']:.0f} tokens/s)")
    print(f"KD / SFT time ratio {med['kd'] / med['sft']:.2f}  (FLOP-model ideal 1 + 2 N_t / 6 N_s = {ideal:.2f})")


if __name__ == "__main__":
    main()
