"""`mgrpo train [--config FILE] [key.sub=value ...]`: train (no arguments: the embedded default)."""
from __future__ import annotations

from ..config import load_config
from ..loop.trainer import train

HELP = "train (no arguments: the embedded tiny default on the built-in task)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.group_size=16 steps=100")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0
