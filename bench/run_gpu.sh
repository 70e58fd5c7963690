#!/usr/bin/env bash
# Every GPU test and benchmark in one call (the device machine has torch, triton and transformers; vLLM and
# Liger are used when present). Results are appended to bench/results/*.csv with device, versions and date.
#
# The device image has torch, triton, transformers but not math-verify (nor Liger): carry them as wheels.
# Here, once:  echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#   --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl \
#   math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5
# then call the device tool with carry=[".whl"] and command "bash bench/run_gpu.sh".
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
ln -sfn kernels mgrpo_kernels 2>/dev/null || true   # importable without pip install -e
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -q -m gpu tests 2>&1 | tail -20
python bench/bench_fused_logprob_entropy.py
python bench/bench_momentum_int8.py
python -c "import vllm" 2>/dev/null && python bench/bench_rollout.py
# one rank, whole training steps of a Qwen3-1.7B-shaped random model: per-part memory, peak, step time
python bench/bench_train_step.py --shape qwen3-1.7b --steps 3 --response-tokens 1024
rm -f mgrpo_kernels
