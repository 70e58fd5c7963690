"""Benchmark: fused log-prob/entropy vs materialized logits (eager, torch.compile), PyTorch's chunked
F.linear_cross_entropy, Liger's fused linear cross entropy, and the floor (the same GEMMs through torch.matmul).

GPU (Qwen3-4B head, bf16):  python bench/bench_fused_logprob_entropy.py
CPU smoke run (interpreter): TRITON_INTERPRET=1 python bench/bench_fused_logprob_entropy.py --cpu-smoke
Appends to bench/results/fused_logprob_entropy.csv and writes bench/results/fused_logprob_entropy.png.
Where a baseline computes only the log-prob (no entropy, no temperature), it is timed on that lighter task.
"""
from __future__ import annotations

import argparse
import sys

import torch
from common import RESULTS, append_rows, environment, median_ms, peak_memory_mib  # noqa: E402
from mgrpo_kernels.fused_logprob_entropy import fused_logprob_entropy, reference_logprob_entropy  # noqa: E402


def methods(temperature: float):
    def eager(h, w, t):
        return reference_logprob_entropy(h, w, t, temperature)

    compiled = torch.compile(eager, dynamic=False)

    def fused(h, w, t):
        return fused_logprob_entropy(h, w, t, temperature)

    def linear_ce(h, w, t):   # logprob only
        return (-torch.nn.functional.linear_cross_entropy(h, w, t, reduction="none"),)

    def liger(h, w, t):       # logprob only
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        out = LigerFusedLinearCrossEntropyFunction.apply(h, w, t, None, None, -100, 0.0, 0.0, "none")
        return (-(out[0] if isinstance(out, tuple) else out),)

    def floor(h, w, t):       # the GEMMs alone: forward logits, backward dh and dW
        return (h @ w.T,)

    return {"fused": fused, "eager": eager, "torch.compile": compiled, "F.linear_cross_entropy": linear_ce,
            "liger": liger, "floor_matmul": floor}


def bench_one(name, fn, h, w, t):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            fn(h, w, t)

    def forward_backward():
        if name == "floor_matmul":   # the floor: forward GEMM + the two backward GEMMs
            z = h @ w.T
            z @ w
            z.T @ h
            return
        outs = fn(hh, ww, t)
        sum(o.float().sum() for o in outs).backward()
        hh.grad = ww.grad = None

    fwd = median_ms(forward)
    both = median_ms(forward_backward)
    return fwd, both, peak_memory_mib(forward_backward)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter)")
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--temperature", type=float, default=1.1)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="a subset of fused, eager, torch.compile, F.linear_cross_entropy, liger, floor_matmul")
    args = parser.parse_args()
    if args.cpu_smoke:
        device, dtype, H, V, token_counts = "cpu", torch.float32, 64, 1000, [64, 128]
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --cpu-smoke (and TRITON_INTERPRET=1) on a CPU")
        device, dtype, H, V, token_counts = "cuda", torch.bfloat16, 2560, 151936, args.tokens
    env = environment()
    rows = []
    for T in token_counts:
        g = torch.Generator(device=device).manual_seed(T)
        h = torch.randn(T, H, device=device, generator=g, dtype=torch.float32).to(dtype)
        w = (torch.randn(V, H, device=device, generator=g, dtype=torch.float32) * 0.02).to(dtype)
        t = torch.randint(0, V, (T,), device=device, generator=g)
        for name, fn in methods(args.temperature).items():
            if args.methods and name not in args.methods:
                continue
            try:
                fwd, both, mem = bench_one(name, fn, h, w, t)
                note = ""
            except Exception as e:  # noqa: BLE001 - a baseline that does not apply is recorded, not fatal
                fwd = both = mem = None
                note = f"n/a: {type(e).__name__}: {str(e)[:80]}"
            logits_mib = T * V * 4 / 2**20
            row = {**env, "T": T, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""), "method": name,
                   "forward_ms": None if fwd is None else round(fwd, 3),
                   "fwd_bwd_ms": None if both is None else round(both, 3),
                   "peak_extra_mib": None if mem is None else round(mem, 1),
                   "fp32_logits_mib": round(logits_mib, 1), "note": note}
            rows.append(row)
            append_rows("fused_logprob_entropy", [row])       # each row as soon as it is measured
            print(f"T={T:6d} {name:24s} fwd {row['forward_ms']} ms  fwd+bwd {row['fwd_bwd_ms']} ms  "
                  f"peak {row['peak_extra_mib']} MiB {note}", flush=True)
        floor = next((r["fwd_bwd_ms"] for r in rows if r["T"] == T and r["method"] == "floor_matmul"), None)
        fused = next((r["fwd_bwd_ms"] for r in rows if r["T"] == T and r["method"] == "fused"), None)
        if floor and fused:
            print(f"T={T}: fused fwd+bwd / floor = {fused / floor:.2f}x", flush=True)
        del h, w, t
        if device == "cuda":
            torch.cuda.empty_cache()
    plot(rows, RESULTS / "fused_logprob_entropy.png")
    print(f"appended {len(rows)} rows to {RESULTS / 'fused_logprob_entropy.csv'}")


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["T"], r["fwd_bwd_ms"], r["peak_extra_mib"]) for r in rows if r["method"] == name and r["fwd_bwd_ms"]]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            if pts[0][2] is not None:
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    axes[0].set(xlabel="tokens", ylabel="forward+backward ms (median)", xscale="log", yscale="log")
    axes[1].set(xlabel="tokens", ylabel="peak extra memory MiB", xscale="log", yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['device']} {rows[0]['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
