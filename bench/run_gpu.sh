#!/usr/bin/env bash
# Every GPU test and benchmark in one call (the device machine has torch, triton and transformers; vLLM and
# Liger are used when present). Results are appended to bench/results/*.csv with device, versions and date.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
ln -sfn kernels mgrpo_kernels 2>/dev/null || true   # importable without pip install -e
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -q -m gpu tests 2>&1 | tail -20
python bench/bench_fused_logprob_entropy.py
python bench/bench_momentum_int8.py
python -c "import vllm" 2>/dev/null && python bench/bench_rollout.py
rm -f mgrpo_kernels
