"""Every Triton kernel the GPU path launches, compiled for sm_80 and sm_90 on this machine, with no GPU.

tests/compile_kernels.py runs our launchers and Liger's (model.liger) on CPU tensors of the GPU's dtypes with
Triton's launch replaced by a recorder, then compiles each recorded launch with triton.compile for a GPUTarget,
specialised as the JIT would: the launch configurations the GPU path really uses (block sizes, warps, stages,
each dtype). Here: every launch compiles to a cubin within the architecture's per-block shared memory, and
every kernel is covered. This catches what the interpreter never sees (type errors in the GPU lowering,
unsupported ops, shared-memory overruns, Liger's RMSNorm and SwiGLU, which do not run under the interpreter);
it says nothing about speed. One subprocess, because this process runs Triton interpreted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}      # bytes per block: A100, H100/H200
OUR_KERNELS = ["_adamw_int8_momentum_kernel", "_delta_ema_kernel", "_forward_kernel", "_logits_to_grad_kernel"]
DTYPES = ["bfloat16", "float16", "float32"]
LAUNCHES = ([f"fused head {d}" for d in DTYPES] + [f"AdamW + int8 momentum {d}" for d in DTYPES]
            + [f"int8 momentum delta {d}" for d in DTYPES]
            + ["liger RMSNorm hidden 2560", "liger RMSNorm q/k norm 128", "liger SwiGLU 9728",
               "liger RoPE 32/8 heads x 128"])


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.compile_kernels"], cwd=Path(__file__).resolve().parent.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = next(line["kernels"] for line in lines if "kernels" in line)
    rows = [line for line in lines if "label" in line]
    return kernels, rows


def test_every_kernel_of_ours_is_launched_and_compiled(compiled):
    kernels, rows = compiled
    assert kernels == OUR_KERNELS, "a new @triton.jit kernel needs a launch in tests/compile_kernels.py"
    assert {r["kernel"].split(".")[-1] for r in rows} >= set(OUR_KERNELS)
    assert {r["label"] for r in rows} == set(LAUNCHES)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("label", LAUNCHES)
def test_launch_compiles_within_shared_memory(compiled, label, arch):
    rows = [r for r in compiled[1] if r["label"] == label and r["arch"] == arch]
    assert rows
    for r in rows:
        assert r["ok"], f"{label} {r['kernel']}: {r.get('error')}"
        assert r["shared"] <= SHARED_LIMIT[arch], \
            f"{r['kernel']}: {r['shared']} bytes of shared memory per block, sm_{arch} allows {SHARED_LIMIT[arch]}"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_head_uses_tensor_cores(compiled, dtype, arch):
    """The forward's tl.dot lowers to wgmma on Hopper and mma.sync on Ampere, in bf16 and fp16."""
    (row,) = [r for r in compiled[1] if r["label"] == f"fused head {dtype}" and r["arch"] == arch
              and r["kernel"].endswith("_forward_kernel")]
    assert row["wgmma"] if arch == 90 else row["mma"]
