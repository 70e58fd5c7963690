#!/usr/bin/env bash
# Every GPU check in one call that fits a 15-minute device window (bench/run_gpu.py: stages ordered by value, each
# with its own limit, all inside 540 s from this script's start; after every stage $OUT gets summary.md and
# results.tar.gz, and session.log is this run's output). The device machine has torch, triton and transformers;
# pytest, hypothesis, math-verify, Liger and bitsandbytes travel as wheels in .whl/ (46 MB of the 64 MiB carry):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform any -d .whl pytest pluggy iniconfig hypothesis sortedcontainers \
#     math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5 \
#     bitsandbytes==0.50.2
# then the device tool: carry [".whl"], command "bash bench/run_gpu.sh", timeout_s 600.
# A CPU machine runs it as a dry run (every GPU stage skips itself): OUT=/tmp/out bash bench/run_gpu.sh
set -uo pipefail
export MGRPO_GPU_T0="${MGRPO_GPU_T0:-$(date +%s.%N)}"    # the budget counts from here, the wheel install included
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# The package is not installed there: kernels/ importable as mgrpo_kernels (python3 -m mgrpo runs the CLI).
# Only a link made here is removed at the end.
linked=""
if [ ! -e mgrpo_kernels ]; then
  ln -s kernels mgrpo_kernels && linked=1
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  python3 bench/run_gpu.py "$@" 2>&1 | tee "$OUT/session.log"
  status=${PIPESTATUS[0]}
else
  python3 bench/run_gpu.py "$@"
  status=$?
fi
[ -n "$linked" ] && rm -f mgrpo_kernels
exit "$status"
