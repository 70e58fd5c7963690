"""`mgrpo plot RUN_DIR`: a run's metrics.jsonl as PNG curves."""
from __future__ import annotations

from ..errors import MgrpoError
from ..metrics import plot_metrics

HELP = "turn a run's metrics.jsonl into PNG curves"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="PNG path (default: <run_dir>/metrics.png)")


def run(args) -> int:
    try:
        print(plot_metrics(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as e:
        raise MgrpoError(str(e)) from None
    except OSError as e:   # writing the PNG: --out under a file, a read-only directory, a full disk
        out = args.out or f"{args.run_dir}/metrics.png"
        raise MgrpoError(f"cannot write the plot to {out} ({e.strerror or e}): give --out a writable path") from None
    return 0
