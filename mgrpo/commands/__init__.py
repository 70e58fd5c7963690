"""The command line: one entry point, the process's settings made once here, user errors caught once.

    mgrpo train [--config FILE] [key.sub=value ...]     train (no arguments: the embedded default)
    mgrpo eval MODEL_OR_RUN [--data [PRESET=]SOURCE ...] [--all-checkpoints] ...
    mgrpo compare [--preset short|default|long] [--seeds N|A-B|A,B] ...   SRT vs M-GRPO vs M-GRPO without IQR
    mgrpo plan [--config FILE] [--gpus G] [--nodes N] [--gpu-memory GIB] [key=value ...]   will it fit? (exit 1 if not)
    mgrpo plot RUN_DIR

Under torchrun: `torchrun --nproc_per_node=8 -m mgrpo train ...` (and `... -m mgrpo eval ...`); on several nodes
`torchrun --nnodes N ... --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m mgrpo train ...` (README, "Many nodes").
`mgrpo train` exits 75 when SIGTERM or SIGUSR1 stopped it after a checkpoint (resume=true continues), 130 on
Ctrl-C (after a checkpoint where training was under way; a second Ctrl-C stops at once); `mgrpo compare` the same.
An error the user can fix (mgrpo.errors.MgrpoError: a setting, a file, a run directory, the disk) prints one line,
`mgrpo <command>: error: ...`, and exits 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from ..distributed import close_distributed, exit_process
from ..environment import configure_process
from ..errors import MgrpoError
from . import compare, evaluate, plan, plot, train

COMMANDS = {"train": train, "eval": evaluate, "compare": compare, "plan": plan, "plot": plot}
# Where a second Ctrl-C's KeyboardInterrupt is raised or re-raised: the line that says where it stopped skips them
RAISED_IN = {("mgrpo", "loop", "preemption.py"), ("mgrpo", "storage", "checkpoint.py")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mgrpo", description="Momentum-anchored GRPO (label-free RL) trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.HELP))
    args = parser.parse_args(argv)
    configure_process(verbose=getattr(args, "verbose", False) or "verbose=true" in getattr(args, "overrides", []))
    try:
        return COMMANDS[args.command].run(args)
    except MgrpoError as e:          # what the user can fix: one line; anything else is a bug (traceback)
        print(f"mgrpo {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        close_distributed()          # before exit: a process group left to the interpreter's teardown can abort


def run_and_exit(argv=None) -> NoReturn:
    """The `mgrpo` script and `python -m mgrpo` (what torchrun launches): main(), then exit with its status
    (through os._exit where a process group was opened: mgrpo/distributed.py, exit_process). A bug's traceback is
    printed here, so that it too leaves that way: exit 1 (130 on Ctrl-C, with the line it stopped at)."""
    try:
        code = main(argv)
    except KeyboardInterrupt as e:   # Ctrl-C outside training, or a second one in it: where it stopped, one line
        frames = [f for f in traceback.extract_tb(e.__traceback__)      # not the handler that raised it
                  if Path(f.filename).parts[-3:] not in RAISED_IN]
        where = f" in {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
        print(f"\nmgrpo: interrupted (Ctrl-C){where}", file=sys.stderr)
        code = 130
    except Exception:             # noqa: BLE001 - a bug: its traceback, then the same exit path
        traceback.print_exc()
        code = 1
    exit_process(code)
