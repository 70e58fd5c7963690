"""Benchmark: whole M-GRPO training steps of a Qwen3-shaped, randomly initialised model (nothing downloaded):
per-part memory, peak memory and step time, through the real trainer (`mgrpo.trainer.train`).

    python bench/bench_train_step.py                       # GPU: Qwen3-1.7B shape, bf16, fused kernel, int8 momentum
    python bench/bench_train_step.py --shape qwen3-4b      # the paper's model shape (if it fits one GPU)
    torchrun --nproc_per_node=8 bench/bench_train_step.py --shape qwen3-4b   # FSDP2 over 8 GPUs
    python bench/bench_train_step.py --cpu-smoke           # a tiny shape on the CPU: keeps the script from rotting

Rollouts use the transformers engine (the device machine has no vLLM), so the rollout time is not what a
vLLM run spends; the update (score + KL reference + loss/backward + fused AdamW/int8 momentum) is the real
thing. A random model writes no boxed answers, so rewards would all be 0 and the update empty: responses are
forced to a fixed length with random answers (mgrpo's SyntheticEngine) so every step trains on a full batch.
Appends to bench/results/train_step.csv with device, versions and date.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from common import append_rows, environment  # noqa: E402

from mgrpo.config import load_config  # noqa: E402
from mgrpo.engines.synthetic import SyntheticEngine  # noqa: E402

SHAPES = {   # Qwen3 configs (hidden, intermediate, layers, heads, kv heads, head dim, vocab, tied)
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=256, tie_word_embeddings=True),
}


def build_model_dir(shape: str, root: Path, dtype: torch.dtype) -> Path:
    """A randomly initialised Qwen3 of the given shape (the embedded default's character tokenizer: the
    vocabulary of the model is the real one, the tokenizer only needs to encode what SyntheticEngine emits)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mgrpo.data.tiny import build_tokenizer
    tokenizer = build_tokenizer()
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=8192, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config).to(dtype)
    path = root / shape
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--momentum-dtype", default="int8")
    parser.add_argument("--optim", default="adamw8bit", help="optim.name (the one-GPU config's adamw8bit by default)")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.shape, args.steps, args.response_tokens, args.prompts, args.group_size = "tiny", 2, 24, 2, 4
    from mgrpo.distributed import init_distributed
    from mgrpo.loop.trainer import train
    dist = init_distributed("auto")
    on_gpu = dist.device.type == "cuda"
    root = Path(tempfile.mkdtemp(prefix="mgrpo-bench-"))
    if dist.is_main:
        build_model_dir(args.shape, root, torch.bfloat16 if on_gpu else torch.float32)
    dist.barrier()
    path = root / args.shape
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = SyntheticEngine(tokenizer)
    cfg = load_config(None, [
        f"model.path={path}", "model.gradient_checkpointing=true", f"run_dir={root / 'run'}", f"steps={args.steps}",
        f"algorithm.prompts_per_step={args.prompts * dist.world_size}", f"algorithm.group_size={args.group_size}",
        f"algorithm.momentum_dtype={args.momentum_dtype}", f"optim.name={args.optim}",
        "algorithm.logprob_impl=fused" if on_gpu or args.cpu_smoke
        else "algorithm.logprob_impl=torch", f"rollout.max_new_tokens={args.response_tokens}",
        "data.num_eval=0", "progress=false", "log_every=1", "optim.lr=1e-6", "optim.micro_batch_tokens=16384",
        f"data.source={write_prompts(root)}"])
    memory_lines = []
    summary = train(cfg, log=lambda line: (print(line), memory_lines.append(line)), engine=engine)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    if dist.is_main:
        memory_line = next((line for line in memory_lines if line.startswith("[memory]")), "")
        # the plan of the same config (mgrpo plan): the trainer's own parts against the measured peak (the engine
        # here is a stand-in: the plan's engine and runtime parts are left out of the comparison)
        from mgrpo.plan import UPDATE, make_plan
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if on_gpu else 80.0
        plan = make_plan(cfg, dist.world_size, memory, on_gpu=on_gpu)
        trainer_parts = [p for p in plan.parts if p.name not in ("vLLM engine", "CUDA runtime and fragmentation")]
        planned_update = max(sum(p.at(phase) for p in trainer_parts) for phase in UPDATE) / 2**30
        row = {**environment(), "shape": args.shape, "world_size": dist.world_size, "prompts_per_rank": args.prompts,
               "group_size": args.group_size, "response_tokens": args.response_tokens,
               "momentum_dtype": args.momentum_dtype, "params_b": round(sum(
                   p.numel() for _, p in summary["models"].policy.hf_named_parameters()) * dist.world_size / 1e9, 3),
               "step_time_s_median": sorted(r["step_time"] for r in steps)[len(steps) // 2],
               "update_time_s_last": round(steps[-1]["step_time"] - steps[-1]["rollout_time"], 3),
               "peak_memory_gib": round(max(r["peak_memory_gib"] for r in steps), 3),
               "planned_update_gib": round(planned_update, 3), "optim": args.optim, "memory": memory_line}
        print(row)
        if not args.cpu_smoke:
            append_rows("train_step", [row])


def write_prompts(root: Path) -> Path:
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Compute {i} + {i + 1}."}) + "\n" for i in range(64)))
    return path


if __name__ == "__main__":
    main()
