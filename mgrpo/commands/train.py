"""`mgrpo train [--config FILE] [key.sub=value ...]`: train (no arguments: the embedded default).

Exit status: 0 done, 1 an error the user can fix, 75 preempted (SIGTERM or SIGUSR1: a checkpoint was written;
resume=true continues; mgrpo/loop/preemption.py), 130 stopped by Ctrl-C (a checkpoint was written after the first
one; none after a second)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import yaml

from ..config import INVOCATION_KEYS, ConfigError, TrainConfig, load_config
from ..environment import return_large_blocks_to_the_system
from ..loop.preemption import Preempted
from ..loop.trainer import train
from ..storage.run_dir import holds_a_run

HELP = "train (no arguments: the embedded tiny default on the built-in task)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.group_size=16 steps=100")


def saved_config_of(cfg: TrainConfig, given_a_config: bool = False) -> Optional[Path]:
    """The config.yaml of the run a resume continues: run_dir's, or (resume_from=<run>/checkpoints/step_N) that
    checkpoint's run's; None for a new run. A run whose config.yaml is gone is resumed only with its settings given
    again (--config): the defaults would silently continue it as another run (other group sizes, another task)."""
    if cfg.resume_from:
        checkpoint = Path(cfg.resume_from)
        run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    else:
        run = Path(cfg.run_dir) if cfg.resume and cfg.run_dir else None
    if run is None or not holds_a_run(run):
        return None
    path = run / "config.yaml"
    if path.is_file():
        return path
    if not given_a_config:
        kept = sorted(p.name for p in run.glob("config.until_*.yaml"))
        raise ConfigError(f"{path} is missing: it holds the settings of the run being resumed, and without it the "
                          "run would continue on the defaults. Restore it, or give the run's settings with --config "
                          "FILE" + (f" ({', '.join(kept)} in the run holds them as they were before a change)"
                                    if kept else ""))
    return None


def read_saved_config(path: Path) -> dict:
    """A run's config.yaml as a mapping, less the invocation keys; checked on its own first, so that an error in
    it is not blamed on the command line."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"it holds a {type(tree).__name__}, not a mapping of sections")
        tree = {k: v for k, v in tree.items() if k not in INVOCATION_KEYS}
        load_config(base=tree)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"{path}, the settings of the run being resumed, cannot be used: {e}. Restore it, or "
                          "give every setting again with --config and overrides after moving it away") from None
    return tree


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    saved = saved_config_of(cfg, given_a_config=args.config is not None)
    if saved is not None:
        # A resume continues the run as it was configured (its config.yaml); what this command line sets (a
        # --config file, overrides) changes it, and the trainer prints what changed.
        cfg = load_config(args.config, args.overrides, base=read_saved_config(saved))
    if cfg.model.path is not None:
        return_large_blocks_to_the_system()          # a real model's activations (mgrpo/environment.py)
    try:
        train(cfg)
    except Preempted as e:            # SIGTERM / SIGUSR1 (a batch script requeues on 75) or Ctrl-C: checkpointed
        print(f"mgrpo train: stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0
