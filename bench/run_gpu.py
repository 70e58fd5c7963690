"""One GPU session's checks, ordered by value, inside a device-time budget; results saved stage by stage.

    bash bench/run_gpu.sh [--budget SECONDS] [--only STAGE ...]     (the device tool: command "bash bench/run_gpu.sh")

A lent GPU comes for about 15 minutes in all, start-up included, so the stages run most valuable first and
each is cut at its own limit or at what is left of the budget. After every stage the CSVs in bench/results/
(device, versions and date in every row) and the stage's log are copied to $OUT, so a run cut short still
brings back what it measured. Commit what comes back into bench/results/.

    1. kernels        the kernel tests on the GPU itself (no interpreter): peaked bf16 logits, confident targets,
                      gradients against float64, the head's memory, the int8 momentum bar (with both
                      optimizers), Liger's RMSNorm/RoPE/SwiGLU against the unpatched model; the compile check
    2. head_bench     fused log-prob/entropy against eager, torch.compile, F.linear_cross_entropy, Liger, floor
    3. momentum_bench the fused AdamW + int8 momentum step: tracking error and bandwidth against the floor
    4. sleep          vLLM's sleep/wake lifecycle with weight pushes (only where vLLM is installed)
    5. train_step     whole training steps of a Qwen3-1.7B-shaped model with the one-GPU config's choices (8-bit
                      AdamW, int8 momentum): per-part memory, peak and step time against `mgrpo plan`
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable

# (name, seconds it may take at most, command, needs): most valuable first
STAGES = [
    ("kernels", 200, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fused_logprob_entropy.py",
                      "tests/test_momentum_int8.py", "tests/test_liger.py", "tests/test_kernels_compile.py"], None),
    ("head_bench", 150, [PY, "bench/bench_fused_logprob_entropy.py", "--tokens", "4096", "16384"], None),
    ("momentum_bench", 90, [PY, "bench/bench_momentum_int8.py"], None),
    ("sleep", 120, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_sleep_lifecycle.py",
                    "tests/test_vllm_engine.py"], "vllm"),
    ("train_step", 240, [PY, "bench/bench_train_step.py", "--shape", "qwen3-1.7b", "--steps", "3",
                         "--response-tokens", "1024", "--optim", "adamw8bit"], None),
]


def importable(module: str) -> bool:
    return subprocess.run([PY, "-c", f"import {module}"], capture_output=True).returncode == 0


def save(out: Path) -> None:
    """bench/results (CSVs, plots, stage logs) into $OUT, whole, after every stage."""
    if out is not None and RESULTS.is_dir():
        shutil.copytree(RESULTS, out / "results", dirs_exist_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=540, help="seconds for all stages together")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages")
    parser.add_argument("--list", action="store_true", help="print the stages and their limits, run nothing")
    args = parser.parse_args()
    stages = [s for s in STAGES if args.only is None or s[0] in args.only]
    if args.list:
        for name, limit, command, needs in stages:
            print(f"{name:15s} <= {limit:4d} s  {' '.join(command[1:])}" + (f"  (needs {needs})" if needs else ""))
        print(f"total of the limits: {sum(s[1] for s in stages)} s; budget {args.budget:.0f} s")
        return 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    logs = RESULTS / "gpu_logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    start = time.monotonic()
    summary = []
    device = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() or "no nvidia-smi"
    versions = subprocess.run([PY, "-c", "import torch, triton, transformers; print(torch.__version__, "
                               "triton.__version__, transformers.__version__, torch.cuda.is_available())"],
                              capture_output=True, text=True, env=env).stdout.strip()
    header = f"{datetime.datetime.now().isoformat(timespec='seconds')} | {device} | torch triton transformers cuda: {versions}"
    print(header, flush=True)
    for name, limit, command, needs in stages:
        left = args.budget - (time.monotonic() - start)
        if needs and not importable(needs):
            summary.append(f"{name}: skipped ({needs} is not installed)")
            continue
        if left < 30:
            summary.append(f"{name}: skipped (budget spent)")
            continue
        timeout = min(limit, left)
        print(f"=== {name} (at most {timeout:.0f} s) ===", flush=True)
        t = time.monotonic()
        with (logs / f"{name}.log").open("w") as log:
            log.write(header + "\n$ " + " ".join(command) + "\n")
            log.flush()
            try:
                rc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
                status = "ok" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                status = f"cut at {timeout:.0f} s"
        summary.append(f"{name}: {status} in {time.monotonic() - t:.0f} s")
        print(summary[-1], flush=True)
        print("".join((logs / f"{name}.log").read_text().splitlines(keepends=True)[-15:]), flush=True)
        (logs / "summary.txt").write_text(header + "\n" + "\n".join(summary) + "\n")
        save(out)
    (logs / "summary.txt").write_text(header + "\n" + "\n".join(summary) + "\n")
    save(out)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
