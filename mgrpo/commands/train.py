"""`mgrpo train [--config FILE] [key.sub=value ...]`: train (no arguments: the embedded default)."""
from __future__ import annotations

from ..config import load_config
from ..environment import return_large_blocks_to_the_system
from ..loop.trainer import train

HELP = "train (no arguments: the embedded tiny default on the built-in task)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.group_size=16 steps=100")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.model.path is not None:
        return_large_blocks_to_the_system()          # a real model's activations (mgrpo/environment.py)
    train(cfg)
    return 0
