#!/usr/bin/env bash
# Every GPU check in one call that fits a 15-minute device window (bench/run_gpu.py: stages ordered by value,
# each one's results copied to $OUT as it finishes). The device machine has torch, triton and transformers;
# pytest, hypothesis, math-verify, Liger and bitsandbytes travel as wheels in .whl/ (46 MB of the 64 MiB carry):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform any -d .whl pytest pluggy iniconfig hypothesis sortedcontainers \
#     math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5 \
#     bitsandbytes==0.50.2
# then the device tool: carry [".whl"], command "bash bench/run_gpu.sh", timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
ln -sfn kernels mgrpo_kernels 2>/dev/null || true   # importable without pip install -e
python3 bench/run_gpu.py "$@"
status=$?
rm -f mgrpo_kernels
exit $status
