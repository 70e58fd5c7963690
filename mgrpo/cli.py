"""Command line: `mgrpo train [--config FILE] [key.sub=value ...]` and `mgrpo plot RUN_DIR`."""
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
    plot_p = sub.add_parser("plot", help="turn a run's metrics.jsonl into PNG curves")
    plot_p.add_argument("run_dir")
    plot_p.add_argument("--out", help="PNG path (default: <run_dir>/metrics.png)")
    args = parser.parse_args(argv)

    if args.command == "plot":
        from .metrics import plot_metrics
        try:
            print(plot_metrics(args.run_dir, args.out))
        except (FileNotFoundError, ValueError) as e:
            print(f"mgrpo plot: {e}", file=sys.stderr)
            return 2
        return 0

    # vLLM's CPU build runs in-process only with multiprocessing off (otherwise it spawns an engine process).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from .checkpoint import RunDirError
    from .config import ConfigError, load_config
    from .data import DataError
    from .trainer import TrainingError, train
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (ConfigError, DataError, RunDirError, TrainingError) as e:
        print(f"mgrpo train: error: {e}", file=sys.stderr)
        return 2
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
