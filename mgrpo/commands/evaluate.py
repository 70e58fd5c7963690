"""`mgrpo eval MODEL_OR_RUN ...`: greedy / avg@k / maj@k / pass@k of a model or a run's checkpoints
(mgrpo/evaluation/benchmarks.py: what it evaluates and how)."""
from __future__ import annotations

import argparse

from ..evaluation.benchmarks import PRESETS, EvalRequest, run_evaluation

HELP = "greedy / avg@k / maj@k / pass@k of a model or a run's checkpoints"


def run(args) -> int:
    return run_evaluation(EvalRequest(**{k: v for k, v in vars(args).items() if k != "command"}))


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a Hugging Face model directory, a hub name (Qwen/Qwen3-4B; read from the "
                        "cache where the hub cannot be reached), or a run directory (its final model)")
    parser.add_argument("--data", action="append", metavar="[PRESET=]SOURCE",
                        help=f"a benchmark (repeatable): PRESET=FILE, PRESET, or FILE; presets: {', '.join(PRESETS)}")
    parser.add_argument("--all-checkpoints", action="store_true",
                        help="a run's base model, every snapshot/checkpoint and the final model -> accuracy vs step")
    parser.add_argument("--k", type=int, help="samples per problem for avg@k and maj@k")
    parser.add_argument("--n", type=int, help="samples drawn per problem (>= k; pass@k uses all n)")
    parser.add_argument("--pass-k", type=lambda s: [int(v) for v in s.split(",") if v], help="e.g. 1,4,16")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int,
                        help="longest response (default: the preset's, else the run's eval.max_new_tokens; 0, as "
                             "eval.max_new_tokens=0: the run's rollout.max_new_tokens, 3072 for a model directory)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None,
                        help="also decode one greedy response per problem")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark (0: all of "
                                                  "a file, data.num_eval of the built-in task)")
    parser.add_argument("--problem-field")
    parser.add_argument("--answer-field")
    parser.add_argument("--solution-field")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--answer-format", choices=("boxed", "math_verify"),
                        help="how answers are found: boxed (the last \\boxed{}, default) or math_verify (math-verify's "
                             "extraction from free text); default: the run's data.answer_format")
    parser.add_argument("--instruction", help="the instruction given with every problem (default: the run's, else "
                        "the paper's)")
    parser.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without its torch.compile: a faster start, slower sampling (rollout.enforce_eager)")
    parser.add_argument("--out", help="output directory (must be new or empty)")
    parser.add_argument("--samples", action="store_true", help="also write every sample as JSONL")
    parser.add_argument("--verbose", action="store_true", help="show the engine's own log lines")
