"""Compile every Triton kernel the GPU path launches, for sm_80 and sm_90, with no GPU: one JSON line per launch.

The launches are recorded, not hand-written: each launcher (ours and Liger's) runs on CPU tensors of the GPU's
dtypes with Triton's launch replaced by a recorder, so the recorded arguments, block sizes, warps and stages
are exactly those the launcher would give a GPU; then each one is compiled with triton.compile for a
GPUTarget, specialised as Triton's JIT would specialise it. Runs in its own process without TRITON_INTERPRET
(under the interpreter `triton.language` is patched for CPU execution and cannot lower to a GPU):

    python -m tests.compile_kernels      (from the repository root; tests/test_kernels_compile.py starts it once and
                                          checks the results)
"""
import json
import os
import sys
import traceback
import types

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from mgrpo_kernels import fused_logprob_entropy as fused  # noqa: E402
from mgrpo_kernels import momentum_int8, runtime  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ARCHS = (80, 90)
LAUNCHES = []          # (label, kernel, args, kwargs)
_label = ["?"]


def _record(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append((_label[0], self, args, kwargs))


def recording(label):
    _label[0] = label


def our_launches():
    """Our launchers as on a GPU: the device checks pass, the GPU configurations are chosen."""
    runtime.triton_can_run = lambda tensor: True
    runtime.interpreting = lambda: False
    real_properties = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=132)
    try:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).replace("torch.", "")
            recording(f"fused head {name}")
            h = torch.randn(64, 256, dtype=dtype, requires_grad=True)
            w = torch.randn(1000, 256, dtype=dtype, requires_grad=True)
            lp, ent = fused.fused_logprob_entropy(h, w, torch.randint(0, 1000, (64,)), 1.1)
            (lp.sum() + ent.sum()).backward()
            recording(f"AdamW + int8 momentum {name}")
            p = [torch.zeros(1000, dtype=dtype), torch.zeros(300, dtype=dtype)]
            f32 = [torch.zeros(1000), torch.zeros(300)]
            codes = [torch.zeros(1000, dtype=torch.int8), torch.zeros(300, dtype=torch.int8)]
            scales = [torch.zeros(4), torch.zeros(2)]
            momentum_int8.launch_fused_step(p, [x.clone() for x in p], f32, [x.clone() for x in f32], codes, scales,
                                            step=1, lr=1e-6, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                            momentum=0.99, seed=1)
            recording(f"int8 momentum delta {name}")
            momentum_int8.launch_delta_ema(p[0], p[0].clone(), codes[0], scales[0], momentum=0.99, seed=1, tensor_id=0)
    finally:
        torch.cuda.get_device_properties = real_properties


def liger_launches():
    """Liger's RMSNorm, SwiGLU and RoPE at Qwen3-4B's sizes (hidden 2560, MLP 9728, 32/8 heads of 128), bf16."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    bf16 = torch.bfloat16
    # rows: a few tokens (the row kernels), and q/k norms over 32768 token-heads (the block kernels)
    for label, rows, cols in (("liger RMSNorm hidden 2560", 8, 2560), ("liger RMSNorm q/k norm 128", 32768, 128)):
        recording(label)
        x = torch.randn(rows, cols, dtype=bf16, requires_grad=True)
        weight = torch.ones(cols, dtype=bf16, requires_grad=True)
        LigerRMSNormFunction.apply(x, weight, 1e-6, 0.0, "llama", False, None).sum().backward()
    recording("liger SwiGLU 9728")
    a = torch.randn(8, 9728, dtype=bf16, requires_grad=True)
    b = torch.randn(8, 9728, dtype=bf16, requires_grad=True)
    LigerSiLUMulFunction.apply(a, b).sum().backward()
    recording("liger RoPE 32/8 heads x 128")
    q = torch.randn(1, 32, 8, 128, dtype=bf16, requires_grad=True)
    k = torch.randn(1, 8, 8, 128, dtype=bf16, requires_grad=True)
    cos, sin = torch.randn(1, 8, 128, dtype=bf16), torch.randn(1, 8, 128, dtype=bf16)
    q_out, k_out = LigerRopeFunction.apply(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()


def compile_launch(kernel, args, kwargs, arch):
    """Specialise and compile one recorded launch as Triton's JIT would on a GPU of compute capability `arch`."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def main():
    JITFunction.run = _record
    our_launches()
    try:
        liger_launches()
    except ImportError as e:
        print(json.dumps({"liger": f"not installed: {e}"}), flush=True)
    ours = sorted(name for module in (fused, momentum_int8) for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction))
    print(json.dumps({"kernels": ours}), flush=True)
    seen = set()
    for label, kernel, args, kwargs in LAUNCHES:
        key = (label, kernel.fn.__qualname__)
        if key in seen:
            continue
        seen.add(key)
        for arch in ARCHS:
            row = {"label": label, "kernel": f"{kernel.fn.__module__}.{kernel.fn.__qualname__}", "arch": arch,
                   "options": {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}}
            try:
                compiled = compile_launch(kernel, args, kwargs, arch)
                ptx = compiled.asm["ptx"]
                row.update(ok=bool(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                           num_warps=compiled.metadata.num_warps, wgmma="wgmma" in ptx, mma="mma.sync" in ptx)
            except Exception:  # noqa: BLE001 - the test reports the compiler's message
                row.update(ok=False, error=traceback.format_exc()[-2000:])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
