"""Shared benchmark helpers: timing (do_bench on a GPU, median wall time on a CPU), environment, CSV rows."""
from __future__ import annotations

import csv
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

# bench/results, or where the GPU session script gathers one session's results (bench/run_gpu.py)
RESULTS = Path(os.environ.get("MGRPO_BENCH_RESULTS") or Path(__file__).parent / "results")


def environment() -> dict:
    import triton
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (TRITON_INTERPRET for Triton)"
    return {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "triton": triton.__version__}


def median_ms(fn, reps: int = 5) -> float:
    """Median milliseconds: triton's do_bench on a GPU (warm-up included), wall clock on a CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def append_rows(name: str, rows: list) -> Path:
    """Append rows to RESULTS/<name>.csv as they are measured (a run cut short keeps what it measured)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    fields = list(rows[0].keys())
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
