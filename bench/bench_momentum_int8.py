"""Benchmark: the fused AdamW + int8 momentum step.

1. Tracking error (the issue's bar) of three storages of theta_k over Adam-like steps of ~1e-6 with drift
   plus noise, m = 0.99: ||k_hat - k_ref|| / ||k_ref - q||. int8 delta (our kernel), int8 of theta_k itself
   (absmax, round to nearest) and bf16 of theta_k: the last two freeze, which is why the design stores a delta.
2. Time and achieved bandwidth of one step at Qwen3-4B scale (or the largest that fits) against
   torch.optim.AdamW(fused=True) + torch._foreach_lerp_ on an fp32 copy, and a device-to-device copy (floor).

3. Host time per step (no GPU needed): `launch_fused_step`'s Python and table work at Qwen3-4B's tensor shapes
   (meta tensors, the kernel launch stubbed), one rank's shards for 1 and 8 ranks. `--kernel-file` times
   another version of kernels/momentum_int8.py side by side (how the "before" rows were made).

GPU:  python bench/bench_momentum_int8.py
CPU:  TRITON_INTERPRET=1 python bench/bench_momentum_int8.py --cpu-smoke
Host: python bench/bench_momentum_int8.py --host-time [--kernel-file OLD/kernels/momentum_int8.py --label before]
Appends to bench/results/momentum_int8_{tracking,timing,host}.csv.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
from common import append_rows, environment, median_ms  # noqa: E402
from mgrpo_kernels.momentum_int8 import QUANT_BLOCK, FusedAdamWInt8Momentum  # noqa: E402


def int8_round_to_nearest(x):
    blocks = x.reshape(-1, QUANT_BLOCK)
    scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(x.shape)


def tracking_error(numel: int, steps: int, device: str, every: int, record=lambda row: None) -> list:
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
            record(rows[-1])          # each row as soon as it is measured (a run cut short keeps them)
    return rows


BYTES_PER_PARAM = {   # what each method reads and writes per parameter (its memory traffic), and what the floor copies
    "fused_int8": 17 + 13 + 8 / QUANT_BLOCK,      # reads p g m v codes (+scales), writes p m v codes (+scales)
    "adamw_fused+lerp_fp32": 28 + 12,              # AdamW: reads p g m v, writes p m v; lerp: reads k p, writes k
    "adamw8bit": 4 + 4 + 1 + 1 + 4 + 1 + 1,        # bitsandbytes: reads p g m8 v8 (+absmax), writes p m8 v8
    "adamw8bit+int8_delta": 15 + 4 + 4 + 1 + 1,    # + the hook: a copy of p before, the delta kernel (before, after, codes)
    "delta_ema": 4 + 4 + 1 + 1,                    # the delta-only kernel: reads before, after, codes; writes codes
}


def step_timing(numel: int, device: str, record=lambda rows: None) -> list:
    """One step of each method on one tensor of `numel` parameters, and a device copy that moves as many bytes as
    the fused step (read half, write half: the floor). Every size checked against free memory first. record(rows):
    called with each group's rows as soon as it is measured (ours, torch's and the floor; then bitsandbytes')."""
    need = numel * (17 + 20 + 15 + 15 + 12)     # ours, torch's AdamW + fp32 copy, the floor's src and dst, bnb's
    if device == "cuda" and need > 0.9 * torch.cuda.mem_get_info()[0]:
        raise SystemExit(f"--numel {numel} needs about {need / 2**30:.0f} GiB here, more than is free: lower it")
    p = torch.nn.Parameter(torch.randn(numel, device=device) * 0.02)
    p.grad = torch.randn(numel, device=device) * 1e-3
    results = fused_and_torch_timing(p, device)         # their buffers are freed on return
    rows = timing_rows(results, numel)
    record(rows)
    print(f"speed-up vs AdamW(fused) + fp32 lerp: {results['adamw_fused+lerp_fp32'] / results['fused_int8']:.2f}x; "
          f"bandwidth vs copy floor: {rows[0]['GB_per_s'] / rows[2]['GB_per_s']:.0%}", flush=True)
    extra = timing_rows(bitsandbytes_timing(p, device), numel)
    if extra:
        record(extra)
    return rows + extra


def timing_rows(results: dict, numel: int) -> list:
    traffic = {**BYTES_PER_PARAM, "copy_floor": BYTES_PER_PARAM["fused_int8"]}
    state = {"fused_int8": 1 + 4 / QUANT_BLOCK, "adamw_fused+lerp_fp32": 4.0, "copy_floor": None, "adamw8bit": None,
             "adamw8bit+int8_delta": 1 + 4 / QUANT_BLOCK, "delta_ema": 1 + 4 / QUANT_BLOCK}
    rows = []
    for name, ms in results.items():
        gbps = traffic[name] * numel / (ms / 1e3) / 1e9
        rows.append({"method": name, "numel": numel, "median_ms": round(ms, 3), "GB_per_s": round(gbps, 1),
                     "bytes_per_param_moved": round(traffic[name], 2), "momentum_bytes_per_param": state[name]})
        print(f"{name:24s} {ms:9.3f} ms  {gbps:8.1f} GB/s  momentum state {state[name]} B/param", flush=True)
    return rows


def fused_and_torch_timing(p, device: str) -> dict:
    """Our fused step, torch's fused AdamW + an fp32 lerp, and the copy floor."""
    numel = p.numel()
    ours = FusedAdamWInt8Momentum([p], lr=1e-6, momentum=0.99)
    base_p = torch.nn.Parameter(p.detach().clone())
    base_p.grad = p.grad.clone()
    adamw = torch.optim.AdamW([base_p], lr=1e-6, fused=device == "cuda")
    k_fp32 = base_p.detach().clone()

    def baseline():
        adamw.step()
        torch._foreach_lerp_([k_fp32], [base_p.detach()], 0.01)

    src = torch.empty(int(numel * BYTES_PER_PARAM["fused_int8"] / 2) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)                    # copying src reads half the step's bytes and writes half
    return {"fused_int8": median_ms(ours.step), "adamw_fused+lerp_fp32": median_ms(baseline),
            "copy_floor": median_ms(lambda: dst.copy_(src))}


def bitsandbytes_timing(p, device: str) -> dict:
    """bitsandbytes' 8-bit AdamW step, alone and with the int8 momentum's per-parameter hook (the one-GPU
    config's path, built by mgrpo.build), and the delta-only kernel alone; {} without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes is not installed: its rows are skipped", flush=True)
        return {}
    from mgrpo.build import make_momentum_and_optimizer
    from mgrpo.config import AlgorithmConfig, OptimConfig
    from mgrpo_kernels.momentum_int8 import launch_delta_ema, new_delta_state
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    _, plain = make_momentum_and_optimizer([("w", q)], AlgorithmConfig(mode="srt"), OptimConfig(name="adamw8bit", lr=1e-6), 0)
    out = {"adamw8bit": median_ms(plain.step)}
    del plain
    r = torch.nn.Parameter(p.detach().clone())
    r.grad = p.grad.clone()
    _, hooked = make_momentum_and_optimizer([("w", r)], AlgorithmConfig(momentum_dtype="int8"),
                                            OptimConfig(name="adamw8bit", lr=1e-6), 0)
    out["adamw8bit+int8_delta"] = median_ms(hooked.step)
    del hooked
    codes, scales = new_delta_state(p.detach())
    after = p.detach() + 1e-6
    out["delta_ema"] = median_ms(lambda: launch_delta_ema(p.detach(), after, codes, scales, momentum=0.99, seed=1,
                                                          tensor_id=0))
    return out


QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


def qwen3_4b_shard_numels(world_size: int) -> list:
    """Every parameter's local element count on one rank: FSDP2 shards dim 0 like torch.chunk."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
    numels = []
    for p in model.parameters():
        rows = math.ceil(p.shape[0] / world_size)
        numels.append(rows * (p.numel() // p.shape[0]))
    return numels


def host_time(kernel_file: str, label: str, reps: int) -> list:
    """Median host milliseconds of one `launch_fused_step` over Qwen3-4B's (shards of) parameters, with the
    Triton launch replaced by a no-op: what the CPU does per optimizer step before the GPU can start."""
    import importlib.util
    import time
    if kernel_file:
        spec = importlib.util.spec_from_file_location("momentum_int8_under_test", kernel_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import mgrpo_kernels.momentum_int8 as module

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    module._adamw_int8_momentum_kernel = NoLaunch()
    module._interpreting = lambda: True     # passes the launcher's device check for meta tensors; the GPU's
    blocks_per_program = 4                  # blocks per program is then given explicitly
    rows = []
    for world_size in (1, 8):
        numels = qwen3_4b_shard_numels(world_size)
        with torch.device("meta"):
            params = [torch.empty(n) for n in numels]
            grads = [torch.empty(n) for n in numels]
            moments = [torch.empty(n) for n in numels]
            codes = [torch.empty(n, dtype=torch.int8) for n in numels]
            scales = [torch.empty(math.ceil(n / QUANT_BLOCK)) for n in numels]
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            module.launch_fused_step(params, grads, moments, moments, codes, scales, step=1, lr=1e-6, beta1=0.9,
                                     beta2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.99, seed=0,
                                     blocks_per_program=blocks_per_program)
            times.append((time.perf_counter() - t) * 1e3)
        first, steady = times[0], statistics.median(times[1:])
        row = {"label": label, "world_size": world_size, "tensors": len(numels),
               "parameters_per_rank": sum(numels), "first_step_ms": round(first, 2), "median_step_ms": round(steady, 2)}
        rows.append(row)
        print(f"{label}: {world_size} rank(s), {sum(numels) / 1e9:.3f} B parameters per rank, "
              f"{len(numels)} tensors: first step {first:.1f} ms, then median {steady:.2f} ms host time", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--numel", type=int, default=402_000_000,
                        help="parameters of the timed tensor (GPU; default: Qwen3-4B's 4.02e8, about 33 GiB in all)")
    parser.add_argument("--host-time", action="store_true", help="host work per step at Qwen3-4B shapes (CPU)")
    parser.add_argument("--kernel-file", default="", help="with --host-time: another momentum_int8.py to time")
    parser.add_argument("--label", default="this commit")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    if args.host_time:
        rows = host_time(args.kernel_file, args.label, args.reps)
        append_rows("momentum_int8_host", [{**environment(), **r} for r in rows])
        return
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: run with --cpu-smoke (and TRITON_INTERPRET=1) on a CPU")
    env = environment()
    numel, steps, every = (16384, 1000, 250) if args.cpu_smoke else (4_000_000, 2000, 250)
    tracking_error(numel, steps, device, every, lambda row: append_rows(
        "momentum_int8_tracking", [{**env, "kind": "tracking", "numel": numel, **row}]))
    step_timing(65536 if args.cpu_smoke else args.numel, device,
                lambda rows: append_rows("momentum_int8_timing", [{**env, **r} for r in rows]))


if __name__ == "__main__":
    main()
