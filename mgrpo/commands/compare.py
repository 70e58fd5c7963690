"""`mgrpo compare`: SRT vs M-GRPO vs M-GRPO without the IQR filter over seeds (mgrpo/comparison.py: the runs,
tables and plots)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..comparison import ANCHORED, METHODS, PRESETS, compare
from ..loop.preemption import Preempted

HELP = "SRT vs M-GRPO vs M-GRPO without the IQR filter, over seeds"


def run(args) -> int:
    try:
        return compare(args.preset, args.seeds, args.methods, args.sweep, args.out, args.name, args.report,
                       tuple(args.overrides))
    except Preempted as e:   # a run stopped by SIGTERM/SIGUSR1 or Ctrl-C after its checkpoint: the others wait
        out = Path(e.checkpoint).parents[2]        # OUT/<method>_seed<N>/checkpoints/step_N
        print(f"mgrpo compare: stopped: {e.signal_name}: {e.checkpoint} holds {e.step} steps; the same command "
              f"with --out {out} continues (finished runs are skipped, this one resumes)", file=sys.stderr)
        return e.exit_code


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--seeds", help="seeds per method: a count N <= 10 (0..N-1; default: the preset's), a range "
                                        "A-B or a list A,B,C, at most 1000 seeds (e.g. tune on 100-102, claim on 0-2)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all three; --preset collapse adds "
                                          f"the anchored M-GRPO, {ANCHORED}); a sweep's variant is named "
                                          "METHOD+KEY=VALUE (e.g. srt,mgrpo,mgrpo+algorithm.momentum=0.9: one report "
                                          "over methods and sweeps)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...",
                        help="run every method once per value of one train setting, as extra methods named "
                             "METHOD+KEY=VALUE (e.g. --methods mgrpo --sweep algorithm.momentum=0.9,0.99,0.999)")
    parser.add_argument("--out", help="output directory: a new or empty one, or an earlier comparison's (it "
                                      "continues: finished runs are skipped)")
    parser.add_argument("--name", default="compare",
                        help="base name of the output files (default: compare), e.g. two reports of one --out: "
                             "--report --methods mgrpo,mgrpo+algorithm.momentum=0.9 --name compare_momentum")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the tables and plot from the runs of --out finished so far")
    parser.add_argument("overrides", nargs="*",
                        help="train overrides applied to every run, e.g. optim.lr=5e-5 (not seed, run_dir, resume, "
                             "overwrite or a method's own setting: compare sets those)")
