"""Per-step metrics: a JSONL line per step (plus TensorBoard when installed), and PNG curves from a run."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per step to <run_dir>/metrics.jsonl; mirrors scalars to TensorBoard if present."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.writer = None

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path}: give a run directory written by `mgrpo train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DEFAULT_PLOT_KEYS = ("reward", "pseudo_label_accuracy", "majority_ratio", "frac_reward_zero_std", "entropy",
                     "iqr/pruned_frac", "kl", "grad_norm", "completions/mean_length", "eval/accuracy")


def plot_metrics(run_dir: Path, out: Path = None, keys=DEFAULT_PLOT_KEYS) -> Path:
    """One PNG with a panel per metric (those present in the run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    present = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not present:
        raise ValueError(f"{run_dir}: none of the metrics {', '.join(keys)} were logged")
    cols = 3
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
