"""`mgrpo plot RUN_DIR`: a run's metrics.jsonl as PNG curves."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import MgrpoError
from ..metrics import plot_metrics

HELP = "turn a run's metrics.jsonl into PNG curves"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="PNG path, or an existing directory to write <run name>.png in "
                                      "(default: <run_dir>/metrics.png)")


def out_path(run_dir: str, out: Optional[str]) -> Optional[Path]:
    """Where the PNG goes, as it will be written: matplotlib would save --out DIR as DIR.png beside the directory,
    and a name without a suffix with .png appended, so both are resolved here and the printed path is the file's."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():        # several runs plotted into one directory: each under its own name
        return path / f"{Path(run_dir).resolve().name}.png"
    return path if path.suffix else path.with_name(path.name + ".png")


def run(args) -> int:
    out = out_path(args.run_dir, args.out)
    try:
        print(plot_metrics(args.run_dir, out))
    except (FileNotFoundError, ValueError) as e:
        raise MgrpoError(str(e)) from None
    except OSError as e:   # writing the PNG: --out under a file, a read-only directory, a full disk
        out = out or f"{args.run_dir}/metrics.png"
        raise MgrpoError(f"cannot write the plot to {out} ({e.strerror or e}): give --out a writable path") from None
    return 0
