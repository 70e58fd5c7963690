"""Per-step metrics: a JSONL line per step (plus TensorBoard when installed), the collapse monitor, the
terminal line, memory readings, and PNG curves from a run."""
from __future__ import annotations

import json
import math
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch


class MetricsLogger:
    """Appends one JSON object per step to <run_dir>/metrics.jsonl; mirrors scalars to TensorBoard if present.

    resume_step: a resumed run first drops the lines of steps after its checkpoint (a run killed after
    checkpointing step 4 may have logged step 5, which the resumed run logs again).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line, record in _parsed_lines(self.path) if record["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
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
        """Flush and close the TensorBoard writer (again: nothing)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StageTimes:
    """Wall time per named stage of a step (`time/<stage>` in the metrics, as verl's `timing_s/...`):

        with times("rollout_policy"):
            ...
    A stage entered twice in a step adds up; `pop()` returns the step's times and starts the next step."""

    def __init__(self):
        self.seconds: dict = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def pop(self) -> dict:
        out, self.seconds = {f"time/{k}": v for k, v in self.seconds.items()}, {}
        return out


STEP_LINE_STAGES = (("weight_push", "push"), ("rollout_policy", "roll_q"), ("rollout_momentum", "roll_k"),
                    ("score", "score"), ("rewards", "vote"), ("reference", "ref"), ("update", "upd"))


def format_metrics_line(step: int, total: int, r: dict) -> str:
    def f(key, fmt=".3f"):
        value = r.get(key)
        return "-" if value is None else format(value, fmt)
    return (f"step {step}/{total} reward {f('reward')} pl_acc {f('pseudo_label_accuracy')} maj {f('majority_ratio')} "
            f"zero_std {f('frac_reward_zero_std', '.2f')} ent {f('entropy')} pruned {f('iqr/pruned_frac', '.2f')} "
            f"kl {f('kl', '.4f')} gnorm {f('grad_norm', '.3f')} len {f('completions/mean_length', '.1f')} "
            f"tok/s {f('tokens_per_second', '.0f')} {f('step_time', '.1f')}s ("
            + " ".join(f"{short} {r[f'time/{stage}']:.2f}" for stage, short in STEP_LINE_STAGES
                       if r.get(f"time/{stage}") is not None) + ")"
            + (f" skipped {r['batch/skipped_micro_batches']}/{r.get('batch/micro_batches', '?')} micro-batches "
               "(all advantages 0, no KL term: no backward)" if r.get("batch/skipped_micro_batches") else ""))


# ---------------------------------------------------------------------------------------------------------
# Collapse monitor

class CollapseMonitor:
    """Signs that self-rewarding training is collapsing, and one warning line per sign when its mean over the
    last `window` steps crosses the threshold (a single step's value is a handful of groups: too noisy to warn
    on). Measured as a detector (README, "Collapse"), none of them warned before a held-out decline on seeds they
    were not tuned on, and no fixed threshold on any of them could have on most of those runs: a warning means
    "the policy has moved far: validate (data.eval_every)", not a forecast.

    Warned on (THRESHOLDS, tuned by bench/collapse_detector.py on runs of seeds 100-102, scored on seeds 0-2):
    kl                            the k3 KL to the initial model: how far the policy has moved from where it
                                  started; healthy runs of the embedded default stayed below 0.05 over 300
                                  steps, healthy slower-rate runs of the collapse task reached 0.08-0.1 (needs
                                  kl_coef > 0 and kl_reference=initial, the defaults: otherwise not watched)
    collapse/momentum_agreement   groups where the policy's majority answer is the momentum model's (M-GRPO
                                  only): the policy drifting away from its own slow average
    collapse/family_length_ratio  (data with problem families) the lowest, over families, of the policy's mean
                                  response length over the last `window` steps of that family / over its first
                                  `window`: a family on which training teaches much shorter answers (on the
                                  collapse task, dropping a term of the 5-term problems)
    Logged, not warned on (no threshold without false alarms on the tuning runs):
    collapse/entropy_ratio        mean trajectory entropy / its value at the first step: sharpening, which
                                  healthy runs do as much as collapsing ones
    collapse/unanimous_frac       groups whose G responses all give one answer
    """
    THRESHOLDS = {
        "kl": ("above", 0.1),
        "collapse/momentum_agreement": ("below", 0.3),
        "collapse/family_length_ratio": ("below", 0.65),
    }

    # signs that are trailing means already (over each family's last `window` steps): compared as they are
    SMOOTHED = {"collapse/family_length_ratio"}

    _ACT = "Watch eval/*; consider a lower optim.lr, M-GRPO instead of SRT, or a checkpoint from before this step."
    MEANING = {
        "kl": "the policy has moved far from its initial model: validate, this is no forecast "
              "(README, \"Collapse\"). " + _ACT,
        "collapse/momentum_agreement": "a sign of collapse. " + _ACT,
        "collapse/family_length_ratio": "training is teaching one family of problems much shorter answers (on "
              "the collapse task: a confident error being learned). " + _ACT,
    }

    @classmethod
    def thresholds_for(cls, algo) -> dict:
        """The signs a run can show: the KL one only against the initial model, and only when it is computed."""
        watched = dict(cls.THRESHOLDS)
        if algo.kl_coef == 0 or algo.kl_reference != "initial":
            watched.pop("kl")
        return watched

    def __init__(self, log=print, start_entropy: Optional[float] = None, warned: Optional[list] = None,
                 recent: Optional[dict] = None, window: int = 10, thresholds: Optional[dict] = None,
                 family_start: Optional[dict] = None):
        self.log, self.start_entropy, self.warned = log, start_entropy, set(warned or [])
        self.family_start = dict(family_start or {})    # family -> mean response length over its first window
        self.recent = {k: list(v) for k, v in (recent or {}).items()}
        self.window = window
        # signal -> (side, limit); other thresholds than THRESHOLDS: what bench/collapse_detector.py tunes
        self.thresholds = dict(self.THRESHOLDS if thresholds is None else thresholds)

    @classmethod
    def from_state(cls, state: Optional[dict], log=print, thresholds: Optional[dict] = None) -> "CollapseMonitor":
        return cls(log, **(state or {}), thresholds=thresholds)

    def state(self) -> dict:
        return {"start_entropy": self.start_entropy, "warned": sorted(self.warned), "recent": self.recent,
                "window": self.window, "family_start": self.family_start}

    def observe(self, step: int, record: dict) -> dict:
        """The step's collapse/entropy_ratio and collapse/family_length_ratio; warns (once per sign) when a sign's
        trailing mean crosses its threshold, after at least `window` steps (a SMOOTHED sign: as it is)."""
        if self.start_entropy is None and record.get("entropy"):
            self.start_entropy = record["entropy"]
        out = {"collapse/entropy_ratio": record["entropy"] / self.start_entropy if self.start_entropy else None,
               "collapse/family_length_ratio": self._family_length_ratio(record)}
        for key, (side, limit) in self.thresholds.items():
            value = out.get(key, record.get(key))
            if value is None:
                continue
            recent = self.recent.setdefault(key, [])
            recent.append(value)
            del recent[:-(1 if key in self.SMOOTHED else self.window)]
            mean = sum(recent) / len(recent)
            if key in self.warned or (len(recent) < self.window and key not in self.SMOOTHED):
                continue
            if (mean < limit) if side == "below" else (mean > limit):
                self.warned.add(key)
                self.log(f"[warning] step {step}: {key} = {mean:.3g} over the last {self.window} steps, {side} "
                         f"{limit}: {self.MEANING.get(key, 'a sign of collapse. ' + self._ACT)}")
        return out

    def _family_length_ratio(self, record: dict) -> Optional[float]:
        """min over families of (mean length over its last `window` steps) / (over its first `window` steps);
        None until a family has been seen in `window` steps (a step holds only some families' prompts)."""
        for key, value in record.items():
            if key.startswith("family/") and key.endswith("/mean_length"):
                recent = self.recent.setdefault(key, [])
                recent.append(value)
                del recent[:-self.window]
        ratios = []
        for key, recent in self.recent.items():
            if key.startswith("family/") and len(recent) == self.window:
                mean = sum(recent) / len(recent)
                start = self.family_start.setdefault(key[len("family/"):-len("/mean_length")], mean)
                if start > 0:
                    ratios.append(mean / start)
        return min(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------------------
# Memory

def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process since the last `reset_peak_memory`: allocated CUDA memory, or on a CPU the
    peak resident set (Linux VmHWM; the lifetime ru_maxrss where /proc is unavailable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = _proc_status_kib("VmHWM")
    if status is not None:
        return status / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux -> GiB


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak over (after the engine is built, so the trainer's own peak is what is reported): CUDA's
    allocator statistics, or the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_memory_gib(device: torch.device) -> float:
    """Memory in use now: the device's used memory on CUDA (what a vLLM engine takes shows here), else this
    process's resident set (Linux /proc; 0 where unavailable)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / 2**30
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * resource.getpagesize() / 2**30


def _parsed_lines(path: Path) -> list:
    """(line, record) of a metrics.jsonl; a torn last line (a run killed mid-write) is dropped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def read_metrics(path: Path) -> list:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path}: give a run directory written by `mgrpo train`")
    return [record for _, record in _parsed_lines(path)]


def write_csv(path: Path, rows: list) -> None:
    """Rows (dicts) as CSV, with the union of their keys as columns in first-seen order."""
    import csv
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


DEFAULT_PLOT_KEYS = ("reward", "pseudo_label_accuracy", "majority_ratio", "frac_reward_zero_std", "entropy",
                     "iqr/pruned_frac", "kl", "grad_norm", "completions/mean_length", "collapse/unanimous_frac",
                     "collapse/momentum_agreement", "eval/greedy", "eval/avg@k", "eval/maj@k")


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
