"""`mgrpo plan`: every part's GPU memory for a config, and whether it fits (exit 1 if not)."""
from __future__ import annotations

from ..config import load_config
from ..plan import print_plan

HELP = "every part's GPU memory for a config, and whether it fits (exit 1 if not)"


def run(args) -> int:
    return print_plan(load_config(args.config, args.overrides), args.gpus or 1, args.gpu_memory)


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b_1gpu.yaml)")
    parser.add_argument("--gpus", type=int, help="GPUs (ranks) the run uses (default 1)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: this machine's GPU, else 80)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as mgrpo train takes them")
