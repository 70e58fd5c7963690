"""Benchmark: the fused AdamW + int8 momentum step.

1. Tracking error (the issue's bar) of three storages of theta_k over Adam-like steps of ~1e-6 with drift
   plus noise, m = 0.99: ||k_hat - k_ref|| / ||k_ref - q||. int8 delta (our kernel), int8 of theta_k itself
   (absmax, round to nearest) and bf16 of theta_k: the last two freeze, which is why the design stores a delta.
2. Time and achieved bandwidth of one step at Qwen3-4B scale (or the largest that fits) against
   torch.optim.AdamW(fused=True) + torch._foreach_lerp_ on an fp32 copy, and a device-to-device copy (floor).

GPU:  python bench/bench_momentum_int8.py
CPU:  TRITON_INTERPRET=1 python bench/bench_momentum_int8.py --cpu-smoke
Appends to bench/results/momentum_int8.csv.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows, environment, median_ms  # noqa: E402

from mgrpo_kernels.momentum_int8 import QUANT_BLOCK, FusedAdamWInt8Momentum  # noqa: E402


def int8_round_to_nearest(x):
    blocks = x.reshape(-1, QUANT_BLOCK)
    scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(x.shape)


def tracking_error(numel: int, steps: int, device: str, every: int) -> list:
    numel = math.ceil(numel / QUANT_BLOCK) * QUANT_BLOCK
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.Parameter(torch.randn(numel, device=device, generator=g) * 0.02)
    opt = FusedAdamWInt8Momentum([q], lr=1e-6, momentum=0.99, seed=1)
    k_ref = q.detach().double().clone()
    k_int8 = int8_round_to_nearest(q.detach().clone())
    k_bf16 = q.detach().to(torch.bfloat16)
    drift = torch.randn(numel, device=device, generator=g)
    rows = []
    for step in range(1, steps + 1):
        q.grad = drift + torch.randn(numel, device=device, generator=g)
        opt.step()
        qd = q.detach()
        k_ref.mul_(0.99).add_(qd.double(), alpha=0.01)
        k_int8 = int8_round_to_nearest(0.99 * k_int8 + 0.01 * qd)
        k_bf16 = (0.99 * k_bf16.float() + 0.01 * qd).to(torch.bfloat16)
        if step % every == 0:
            gap = (k_ref - qd.double()).norm()
            k_delta = next(opt.momentum_weights(torch.float32)).double()
            rows.append({"step": step, "int8_delta_stochastic": ((k_delta - k_ref).norm() / gap).item(),
                         "int8_theta_nearest": ((k_int8.double() - k_ref).norm() / gap).item(),
                         "bf16_theta": ((k_bf16.double() - k_ref).norm() / gap).item()})
            print("step {step:5d}  error/gap: int8 delta (ours) {int8_delta_stochastic:.4f}   int8 of theta "
                  "{int8_theta_nearest:.3f}   bf16 of theta {bf16_theta:.3f}".format(**rows[-1]), flush=True)
    return rows


def step_timing(numel: int, device: str) -> list:
    p = torch.nn.Parameter(torch.randn(numel, device=device) * 0.02)
    p.grad = torch.randn(numel, device=device) * 1e-3
    ours = FusedAdamWInt8Momentum([p], lr=1e-6, momentum=0.99)
    base_p = torch.nn.Parameter(p.detach().clone())
    base_p.grad = p.grad.clone()
    adamw = torch.optim.AdamW([base_p], lr=1e-6, fused=device == "cuda")
    k_fp32 = base_p.detach().clone()

    def baseline():
        adamw.step()
        torch._foreach_lerp_([k_fp32], [base_p.detach()], 0.01)

    src = torch.empty(numel * 30 // 4, dtype=torch.float32, device=device)   # the bytes our step moves
    dst = torch.empty_like(src)
    results = {"fused_int8": median_ms(ours.step), "adamw_fused+lerp_fp32": median_ms(baseline),
               "copy_floor": median_ms(lambda: dst.copy_(src))}
    # bytes per parameter moved: ours reads p g m v codes, writes p m v codes (+ scales: 8 B / 256)
    moved = {"fused_int8": 30 + 8 / QUANT_BLOCK, "adamw_fused+lerp_fp32": 28 + 12, "copy_floor": 30 * 2 / 2}
    state = {"fused_int8": 1 + 4 / QUANT_BLOCK, "adamw_fused+lerp_fp32": 4.0, "copy_floor": None}
    rows = []
    for name, ms in results.items():
        gbps = moved[name] * numel / (ms / 1e3) / 1e9
        rows.append({"method": name, "numel": numel, "median_ms": round(ms, 3), "GB_per_s": round(gbps, 1),
                     "momentum_bytes_per_param": state[name]})
        print(f"{name:24s} {ms:9.3f} ms  {gbps:8.1f} GB/s  momentum state {state[name]} B/param", flush=True)
    print(f"speed-up vs AdamW(fused) + fp32 lerp: {results['adamw_fused+lerp_fp32'] / results['fused_int8']:.2f}x; "
          f"bandwidth vs copy floor: {rows[0]['GB_per_s'] / rows[2]['GB_per_s']:.0%}")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--numel", type=int, default=1_000_000_000, help="parameters for the timing (GPU)")
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: run with --cpu-smoke (and TRITON_INTERPRET=1) on a CPU")
    env = environment()
    numel, steps, every = (16384, 1000, 250) if args.cpu_smoke else (4_000_000, 2000, 250)
    rows = [{**env, "kind": "tracking", "numel": numel, **r} for r in tracking_error(numel, steps, device, every)]
    append_rows("momentum_int8_tracking", rows)
    timing = step_timing(65536 if args.cpu_smoke else args.numel, device)
    append_rows("momentum_int8_timing", [{**env, **r} for r in timing])


if __name__ == "__main__":
    main()
