"""Benchmark: attention over one prompt's group of responses, three ways (mgrpo/models/batching.py's layouts).

    grouped, blockwise   one row: the prompt once, then its G responses; the prompt attends to itself, each
                         response to the prompt and itself (mgrpo/models/grouped_attention.py: P^2 + G R (P + R)
                         scores): what training runs with sdpa
    grouped, dense mask  the same row through one SDPA call with a [T, T] block mask (T = P + G R: T^2 scores)
    padded               G rows of prompt + response, causal SDPA (the prompt's keys and values G times)

forward + backward time (median) and peak extra memory of the attention alone, at Qwen3-4B's heads (32 query, 8
key/value, head dim 128), bf16 on a GPU; fp32 at small sizes on a CPU (`--cpu-smoke`: only checks it runs, CPU
times say little). Appends to bench/results/grouped_attention.csv.

    python bench/bench_grouped_attention.py [--prompt 256] [--group 16] [--response 512 1024]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import append_rows, environment, median_ms, peak_memory_mib

from mgrpo.models.batching import Sequences, micro_batches
from mgrpo.models.grouped_attention import grouped_attention


def layouts(P: int, G: int, R: int, heads: int, kv_heads: int, d: int, device, dtype) -> dict:
    """name -> a function running the attention's forward and backward on fresh leaves."""
    seqs = Sequences([list(range(P))] * G, [list(range(R))] * G, [0] * G)
    (grouped,) = micro_batches(seqs, "grouped", P + G * R, pad_id=0, blockwise=True)
    (dense,) = micro_batches(seqs, "grouped", P + G * R, pad_id=0, blockwise=False)
    T = grouped.input_ids.shape[1]
    rows = grouped.grouped.to(device)
    mask = dense.attention.to(device)                                   # [1, 1, T, T] bool
    g = torch.Generator(device=device).manual_seed(0)

    def leaves(n, length):
        q = torch.randn(n, heads, length, d, device=device, generator=g, dtype=torch.float32).to(dtype)
        k = torch.randn(n, kv_heads, length, d, device=device, generator=g, dtype=torch.float32).to(dtype)
        v = torch.randn(n, kv_heads, length, d, device=device, generator=g, dtype=torch.float32).to(dtype)
        return [x.requires_grad_() for x in (q, k, v)]

    def run(out):
        out.float().sum().backward()

    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    one_row, padded = leaves(1, T), leaves(G, P + R)
    return {
        "grouped, blockwise": lambda: run(grouped_attention(None, *one_row, None, grouped_rows=rows)[0]),
        "grouped, dense mask": lambda: run(F.scaled_dot_product_attention(*one_row, attn_mask=mask, **gqa)),
        "padded": lambda: run(F.scaled_dot_product_attention(*padded, is_causal=True, **gqa)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="small shapes on the CPU")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--response", type=int, nargs="*", default=[512, 1024])
    args = parser.parse_args()
    if args.cpu_smoke:
        device, dtype, heads, kv, d, prompts, group, responses = "cpu", torch.float32, 4, 2, 32, 32, 4, [16, 32]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --cpu-smoke on a CPU")
        device, dtype, heads, kv, d = "cuda", torch.bfloat16, 32, 8, 128
        prompts, group, responses = args.prompt, args.group, args.response
    env = environment()
    for R in responses:
        for name, fn in layouts(prompts, group, R, heads, kv, d, device, dtype).items():
            ms, mib = median_ms(fn), peak_memory_mib(fn)
            row = {**env, "prompt": prompts, "group": group, "response": R, "layout": name, "dtype": str(dtype)[6:],
                   "fwd_bwd_ms": round(ms, 3), "peak_extra_mib": None if mib is None else round(mib, 1)}
            append_rows("grouped_attention", [row])
            print(f"P={prompts} G={group} R={R:5d} {name:22s} fwd+bwd {ms:9.3f} ms  peak {row['peak_extra_mib']} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
