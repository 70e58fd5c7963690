"""Compile every Triton kernel for sm_80 and sm_90 with no GPU; one JSON line per (kernel, dtype, arch).

Run in its own process without TRITON_INTERPRET (under the interpreter `triton.language` is patched for CPU
execution and cannot lower to a GPU): tests/test_kernels_compile.py starts it once and checks the results.
    python tests/compile_kernels.py
"""
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mgrpo_kernels import fused_logprob_entropy as fused  # noqa: E402
from mgrpo_kernels import momentum_int8  # noqa: E402

ARCHS = (80, 90)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TL_TYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def compile_for(kernel, arch: int, types: dict, constexprs: dict, launch: dict):
    """Compile `kernel` for sm_<arch>; `types` maps every runtime argument to its Triton type, pointers
    16-byte aligned as PyTorch allocates them (what the JIT specializes on for a GPU launch)."""
    signature, attrs = {}, {}
    target = GPUTarget("cuda", arch, 32)
    backend = triton.backends.backends["nvidia"].compiler(target)
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types[name]
        if types[name].startswith("*"):
            attrs[(index,)] = backend.parse_attr("D")
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=target, options=launch)


def split_launch(config: dict) -> tuple:
    launch = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return {k: v for k, v in config.items() if k not in launch}, launch


def cases():
    """(kernel name, dtype, kernel, argument types, constexprs, launch options): the launchers' own configs."""
    for dtype in DTYPES:
        t = TRITON_TYPE[dtype]
        config, launch = split_launch(fused.forward_launch_config(dtype))
        yield ("_forward_kernel", dtype, fused._forward_kernel,
               {"h_ptr": "*" + t, "w_ptr": "*" + t, "target_ptr": "*i64",
                **{n: "*fp32" for n in ("max_ptr", "sumexp_ptr", "sumexpz_ptr", "target_logit_ptr")},
                **{n: "i32" for n in ("T", "V", "H", "V_PER_SPLIT", "stride_ht", "stride_hh", "stride_wv",
                                      "stride_wh")},
                "inv_temperature": "fp32"},
               {**config, "DOT_IN_FP32": dtype == torch.float32}, launch)
        config, launch = split_launch(fused.grad_launch_config())
        yield ("_logits_to_grad_kernel", dtype, fused._logits_to_grad_kernel,
               {"logits_ptr": "*fp32", "grad_ptr": "*" + t, "target_ptr": "*i64", "grad_logprob_ptr": "*fp32",
                "grad_entropy_ptr": "*fp32", "V": "i32", "stride_logits": "i32", "stride_grad": "i32",
                "inv_temperature": "fp32"}, config, launch)
        config, launch = split_launch(momentum_int8.launch_config())
        yield ("_adamw_int8_momentum_kernel", dtype, momentum_int8._adamw_int8_momentum_kernel,
               {"table_ptr": "*i64", "program_tensor_ptr": "*i32", "program_block_ptr": "*i32", "seed": "i32",
                **{n: "fp32" for n in ("lr", "beta1", "beta2", "eps", "weight_decay", "bias_correction1",
                                       "inv_sqrt_bias_correction2", "momentum")}},
               {**config, "PARAM_DTYPE": TL_TYPE[dtype], "QBLOCK": momentum_int8.QUANT_BLOCK}, launch)


def main():
    kernels = sorted(name for module in (fused, momentum_int8) for name, obj in vars(module).items()
                     if isinstance(obj, triton.runtime.jit.JITFunction))
    print(json.dumps({"kernels": kernels}), flush=True)
    for name, dtype, kernel, types, constexprs, launch in cases():
        for arch in ARCHS:
            row = {"kernel": name, "dtype": TRITON_TYPE[dtype], "arch": arch, "launch": launch,
                   "constexprs": {k: str(v) for k, v in constexprs.items()}}
            try:
                compiled = compile_for(kernel, arch, types, constexprs, launch)
                ptx = compiled.asm["ptx"]
                row.update(ok=bool(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                           wgmma="wgmma" in ptx, mma="mma.sync" in ptx)
            except Exception:  # noqa: BLE001 - the test reports the compiler's message
                row.update(ok=False, error=traceback.format_exc()[-2000:])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
