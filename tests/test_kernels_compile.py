"""Every Triton kernel compiled for the GPUs the product runs on, on this machine, with no GPU.

`triton.compile` with a `GPUTarget` builds PTX and cubin ahead of time (kernels.md section 5). Each kernel is
compiled with the launch configuration its launcher really uses on a GPU (the launchers' own config
functions), for each dtype it is launched with, for sm_80 (A100) and sm_90 (H100/H200), and its shared
memory is checked against the architecture's per-block limit. This catches what the interpreter never sees:
type errors in the GPU lowering, unsupported ops, shared-memory overruns. It says nothing about speed.
The compiles run in one subprocess (tests/compile_kernels.py) because this process runs Triton interpreted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}      # bytes per block: A100, H100/H200
KERNELS = ["_adamw_int8_momentum_kernel", "_forward_kernel", "_logits_to_grad_kernel"]
DTYPES = ["bf16", "fp16", "fp32"]
ARCHS = [80, 90]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[0]["kernels"], {(r["kernel"], r["dtype"], r["arch"]): r for r in lines[1:]}


def test_every_kernel_is_covered(compiled):
    """A new @triton.jit kernel in kernels/ must be added to tests/compile_kernels.py."""
    assert compiled[0] == KERNELS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_within_shared_memory(compiled, kernel, dtype, arch):
    row = compiled[1][(kernel, dtype, arch)]
    assert row["ok"], row.get("error")
    assert row["shared"] <= SHARED_LIMIT[arch], \
        f"{kernel} {dtype}: {row['shared']} bytes of shared memory per block, sm_{arch} allows {SHARED_LIMIT[arch]}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_forward_uses_tensor_cores(compiled, dtype, arch):
    """The half-precision forward's tl.dot lowers to wgmma on Hopper and mma.sync on Ampere."""
    row = compiled[1][("_forward_kernel", dtype, arch)]
    assert row["wgmma"] if arch == 90 else row["mma"]
