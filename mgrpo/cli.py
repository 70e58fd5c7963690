"""Command line:

    mgrpo train [--config FILE] [key.sub=value ...]     train (no arguments: the embedded default)
    mgrpo eval MODEL_OR_RUN [--data [PRESET=]SOURCE ...] [--all-checkpoints] ...
    mgrpo compare [--preset short|default|long] [--seeds N] ...   SRT vs M-GRPO vs M-GRPO without IQR
    mgrpo plan [--config FILE] [--gpus N] [--gpu-memory GIB] [key=value ...]   will it fit? (exit 1 if not)
    mgrpo plot RUN_DIR

Under torchrun: `torchrun --nproc_per_node=8 -m mgrpo train ...` (and `... -m mgrpo eval ...`).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mgrpo", description="Momentum-anchored GRPO (label-free RL) trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train (no arguments: the embedded tiny default on the built-in task)")
    train_p.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b.yaml)")
    train_p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.group_size=16 steps=100")
    eval_p = sub.add_parser("eval", help="greedy / avg@k / maj@k / pass@k of a model or a run's checkpoints")
    from .eval_command import add_arguments as add_eval_arguments
    add_eval_arguments(eval_p)
    compare_p = sub.add_parser("compare", help="SRT vs M-GRPO vs M-GRPO without the IQR filter, over seeds")
    from .compare import add_arguments as add_compare_arguments
    add_compare_arguments(compare_p)
    plan_p = sub.add_parser("plan", help="every part's GPU memory for a config, and whether it fits (exit 1 if not)")
    from .plan import add_arguments as add_plan_arguments
    add_plan_arguments(plan_p)
    plot_p = sub.add_parser("plot", help="turn a run's metrics.jsonl into PNG curves")
    plot_p.add_argument("run_dir")
    plot_p.add_argument("--out", help="PNG path (default: <run_dir>/metrics.png)")
    args = parser.parse_args(argv)

    if args.command == "plot":
        from .metrics import plot_metrics
        try:
            print(plot_metrics(args.run_dir, args.out))
        except (FileNotFoundError, ValueError) as e:
            print(f"mgrpo plot: error: {e}", file=sys.stderr)
            return 1
        return 0

    # vLLM's CPU build runs in-process only with multiprocessing off (otherwise it spawns an engine process).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from .errors import MgrpoError
    try:
        if args.command == "eval":
            from .eval_command import main as eval_main
            return eval_main(args)
        if args.command == "compare":
            from .compare import main as compare_main
            return compare_main(args)
        if args.command == "plan":
            from .plan import main as plan_main
            return plan_main(args)
        from .config import load_config
        from .trainer import train
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except MgrpoError as e:          # what the user can fix: one line; anything else is a bug (traceback)
        print(f"mgrpo {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
