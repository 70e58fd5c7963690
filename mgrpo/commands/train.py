"""`mgrpo train [--config FILE] [key.sub=value ...]`: train (no arguments: the embedded default).

Exit status: 0 done, 1 an error the user can fix, 75 preempted (SIGTERM or SIGUSR1: a checkpoint was written;
resume=true continues; mgrpo/loop/preemption.py)."""
from __future__ import annotations

import sys

from ..config import load_config
from ..environment import return_large_blocks_to_the_system
from ..loop.preemption import PREEMPTED_EXIT_CODE, Preempted
from ..loop.trainer import train

HELP = "train (no arguments: the embedded tiny default on the built-in task)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.group_size=16 steps=100")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.model.path is not None:
        return_large_blocks_to_the_system()          # a real model's activations (mgrpo/environment.py)
    try:
        train(cfg)
    except Preempted as e:            # SIGTERM / SIGUSR1: checkpointed; a batch script requeues on this code
        print(f"mgrpo train: stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0
