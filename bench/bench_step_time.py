"""Benchmark: the embedded default's step time, this checkout against another commit, side by side.

    git worktree add /tmp/mgrpo-old 907263d          # the commit to compare with, once
    python bench/bench_step_time.py --old /tmp/mgrpo-old --label-old 907263d [--repeats 2] [--steps 12]

Both run `mgrpo train` with the same base model (this checkout's warm-started default, passed as model.path
so the two differ only in their code), the same seed and settings, alternating (old, new, old, new, ...) so
that a drift of the machine's speed hits both. Per run: the median over steps 3..steps of the step time and
the rollout time, and for versions that log them the per-stage times (time/...). Appends to
bench/results/step_time.csv; prints the medians and the ratio old / new. An absolute time means something only
on the machine that measured it: read the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import append_rows, environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def base_model() -> str:
    from mgrpo.config import load_config
    from mgrpo.data.tiny import warm_started_model_dir
    cfg = load_config(None, [])
    return str(warm_started_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None))


def one_run(checkout: str, model: str, steps: int, run_dir: Path, extra: list) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout} if checkout else dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "mgrpo", "train", f"model.path={model}", f"steps={steps}", f"run_dir={run_dir}",
           "progress=false", "log_every=0", "data.num_eval=0", *extra]
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "step_time" in r][2:]
    out = {"step_s": statistics.median(r["step_time"] for r in steps_),
           "rollout_s": statistics.median(r["rollout_time"] for r in steps_),
           "final_reward": records[-1].get("reward")}
    for key in sorted({k for r in steps_ for k in r if k.startswith("time/")}):
        out[key.replace("time/", "") + "_s"] = statistics.median(r.get(key, 0.0) for r in steps_)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", required=True, help="a checkout of the commit to compare with (git worktree)")
    parser.add_argument("--label-old", default="old")
    parser.add_argument("--label-new", default="this checkout")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("overrides", nargs="*", help="train overrides for both, e.g. algorithm.group_size=8")
    args = parser.parse_args()
    model = base_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mgrpo-step-time-") as tmp:
        for repeat in range(args.repeats):
            for label, checkout in ((args.label_old, args.old), (args.label_new, "")):
                result = one_run(checkout, model, args.steps, Path(tmp) / f"{label}-{repeat}".replace(" ", "_"),
                                 args.overrides)
                rows.append({"version": label, "repeat": repeat, "steps": args.steps, **result})
                print(f"{label:>14s} repeat {repeat}: step {result['step_s']:.2f} s (rollout {result['rollout_s']:.2f} s)",
                      flush=True)
    env = {**environment(), "device": f"cpu ({os.cpu_count()} cores; no Triton in these runs)"}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    append_rows("step_time", [{**env, "model": model.replace(str(Path.home()), "~"), **{k: r.get(k) for k in keys}} for r in rows])
    old = statistics.median(r["step_s"] for r in rows if r["version"] == args.label_old)
    new = statistics.median(r["step_s"] for r in rows if r["version"] == args.label_new)
    print(f"median step: {args.label_old} {old:.2f} s, {args.label_new} {new:.2f} s: {old / new:.2f}x faster")


if __name__ == "__main__":
    main()
