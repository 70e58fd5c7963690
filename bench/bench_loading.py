"""Benchmark: peak host memory per rank of loading and one training step, on CPU ranks (gloo), with a
Qwen3-0.6B-shaped random model built from a config in code (nothing downloaded).

    python bench/bench_loading.py --build /tmp/qwen3-0.6b                  # once: the model directory (bf16)
    torchrun --nproc_per_node=2 bench/bench_loading.py --model /tmp/qwen3-0.6b [--precision bf16]

Each rank reports its peak resident set (VmHWM) after setup (policy, KL reference, momentum model,
optimizer: what loading costs) and after one step (the trainer's peak), plus the time to set up. Rollouts come
from mgrpo's SyntheticEngine (fixed-length responses, no generation), so the figures are the trainer's alone.
An older checkout is measured with that checkout's own copy of this script (PYTHONPATH=<old checkout>
python <old checkout>/bench/bench_loading.py ...): that is how the "before" rows were made (907263d).
Appends to bench/results/loading.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():   # the int8 momentum's fused optimizer step runs Triton: interpreted on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6)


def vm_hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build(path: Path) -> None:
    """A random Qwen3-0.6B-shaped model in bf16 (what real checkpoints store) with the tiny char tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mgrpo.data.tiny import build_tokenizer
    tokenizer = build_tokenizer()
    config = Qwen3Config(**QWEN3_06B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters written to {path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", help="write the random model directory here and exit")
    parser.add_argument("--model", help="the model directory (from --build)")
    parser.add_argument("--precision", default=None, help="model.precision (versions that have it)")
    parser.add_argument("--label", default="", help="a name for this row (e.g. before / after)")
    parser.add_argument("--response-tokens", type=int, default=24)
    parser.add_argument("--momentum-dtype", default="fp32",
                        help="fp32 (default): torch AdamW allocates its moments at the first step, so the peak "
                             "after setup is what loading costs; int8 allocates them with the optimizer")
    args = parser.parse_args()
    if args.build:
        build(Path(args.build))
        return
    from transformers import AutoTokenizer

    import mgrpo.loop.trainer as trainer
    from mgrpo.config import load_config
    from mgrpo.engines.synthetic import SyntheticEngine
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # one directory for all ranks of this job (the run directory is shared), removed at the end
    root = Path(tempfile.gettempdir()) / f"mgrpo-bench-loading-{os.environ.get('MASTER_PORT', os.getpid())}"
    root.mkdir(exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"Compute {i} + {i + 1}."}) + "\n" for i in range(16)))
    overrides = [f"model.path={args.model}", f"run_dir={root / 'run'}", "steps=1", "progress=false", "log_every=0",
                 f"algorithm.prompts_per_step={2 * world}", "algorithm.group_size=4",
                 f"rollout.max_new_tokens={args.response_tokens}", "data.num_eval=0", f"data.source={prompts}",
                 "optim.lr=1e-6", f"algorithm.momentum_dtype={args.momentum_dtype}", "optim.micro_batch_tokens=512", "device=cpu"]
    if args.precision:
        overrides.append(f"model.precision={args.precision}")
    cfg = load_config(None, overrides)
    marks = {}
    real_setup = trainer.setup

    def timed_setup(*a, **k):
        t = time.perf_counter()
        run = real_setup(*a, **k)
        marks["setup_s"], marks["after_setup_gib"] = time.perf_counter() - t, vm_hwm_gib()
        return run
    trainer.setup = timed_setup
    summary = trainer.train(cfg, log=lambda *a: None, engine=SyntheticEngine(tokenizer))
    rank = summary["dist"].rank
    row = {"label": args.label, "world_size": world, "rank": rank, "precision": args.precision or "default",
           "momentum_dtype": args.momentum_dtype,
           "setup_s": round(marks["setup_s"], 1), "peak_after_setup_gib": round(marks["after_setup_gib"], 3),
           "peak_after_step_gib": round(vm_hwm_gib(), 3)}
    rows = summary["dist"].all_gather_object(row)
    if rank == 0:
        import csv
        import datetime

        import transformers
        env = {"date": datetime.date.today().isoformat(), "device": "cpu (gloo ranks)", "torch": torch.__version__,
               "transformers": transformers.__version__, "model": "Qwen3-0.6B shape, random, bf16 files"}
        out = Path(__file__).resolve().parent / "results" / "loading.csv"
        out.parent.mkdir(exist_ok=True)
        new = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(env) + list(rows[0]))
            if new:
                writer.writeheader()
            for r in rows:
                writer.writerow({**env, **r})
                print(r)
        sys.stdout.flush()
    summary["dist"].barrier()
    if rank == 0:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
