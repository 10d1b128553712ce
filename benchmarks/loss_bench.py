"""Loss kernel benchmark: fused chunked head vs the naive materialised loss vs Liger-Kernel.

Forward + backward of the lm-head + distillation loss for N tokens, hidden H, vocabulary V
(default: Llama-3's 128256), each case in its own process so peak RSS is its own. Prints wall time
and peak extra memory (peak RSS minus RSS after the inputs exist) as ratios to the fused head in
the same run, and GRKD / RLKD overhead over plain forward KL.

    python benchmarks/loss_bench.py                       # N=4096 H=2048 V=128256
    python benchmarks/loss_bench.py --tokens 512 --vocab 32000 --hidden 512   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = {
    # name: (implementation, method)
    "fused_jsd": ("fused", "jsd"),
    "naive_jsd": ("naive", "jsd"),
    "liger_jsd": ("liger", "jsd"),
    "fused_forward_kl": ("fused", "forward_kl"),
    "fused_grkd": ("fused", "grkd"),
    "fused_rlkd": ("fused", "rlkd"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(name: str, N: int, H: int, V: int, chunk: int) -> dict:
    import torch
    import kd

    impl, method = CASES[name]
    torch.manual_seed(0)
    # logits with a std of about 2, so that both distributions are far from uniform
    hs = torch.randn(N, H).requires_grad_()
    ws = (torch.randn(V, H) * 2 / H**0.5).requires_grad_()
    ht = torch.randn(N, H)
    wt = torch.randn(V, H) * 2 / H**0.5
    labels = torch.randint(0, V, (N,))
    params = {"grkd": {"k": 32, "progress": 1.0}, "rlkd": {"k": 5}, "jsd": {"beta": 0.5}}.get(method, {})
    base = rss_mb()
    t0 = time.perf_counter()
    if impl == "fused":
        loss, _ = kd.fused_distill_loss(hs, ws, ht, wt, labels, method=method, chunk_size=chunk, **params)
    elif impl == "naive":
        loss, _ = kd.distill_loss(hs @ ws.T, ht @ wt.T, labels, method=method, **params)
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5,
                                     compiled=False, chunk_size=chunk)
        loss = fn(hs, ws, ht, wt, labels)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, "seconds": seconds, "peak_extra_mb": peak - base, "peak_rss_mb": peak,
            "loss": float(loss), "grad_w_norm": float(ws.grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", help=argparse.SUPPRESS)   # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.hidden, args.vocab, args.chunk)))
        return

    import torch
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} chunk={args.chunk} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    results = {}
    for name in args.cases.split(","):
        cmd = [sys.executable, __file__, "--case", name, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1]
            print(f"{name:18s} failed: {why}", flush=True)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:18s} {r['seconds']:8.2f} s  peak extra {r['peak_extra_mb']:9.0f} MB  "
              f"loss {r['loss']:.6f}  |grad W| {r['grad_w_norm']:.6f}", flush=True)

    def ratio(a, b, key):
        return f"{results[a][key] / results[b][key]:.2f}x" if a in results and b in results else "n/a"

    print("\nratios to the fused head (same method, jsd):")
    for other in ("naive_jsd", "liger_jsd"):
        print(f"  {other:12s} time {ratio(other, 'fused_jsd', 'seconds')}  "
              f"peak extra memory {ratio(other, 'fused_jsd', 'peak_extra_mb')}")
    print("overhead over fused forward_kl:")
    for m in ("fused_grkd", "fused_rlkd"):
        print(f"  {m:12s} time {ratio(m, 'fused_forward_kl', 'seconds')}  "
              f"peak extra memory {ratio(m, 'fused_forward_kl', 'peak_extra_mb')}")


if __name__ == "__main__":
    main()
