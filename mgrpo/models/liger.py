"""Liger-Kernel's Triton kernels in the trained models (model.liger): RMSNorm, RoPE and SwiGLU.

Liger patches a model instance by its type (Qwen3, Llama and the others it supports): each RMSNorm and MLP
module gets Liger's forward, and transformers' rotary embedding function is replaced module-wide. Its fused
linear cross-entropy is not used: the head is ours (the fused log-prob/entropy kernel, which Liger's loss cannot
replace: it computes no entropy and no temperature). Policy and KL reference are patched alike, so that at
step 0 their log-probs are the same numbers.

Where it runs: Liger's kernels need a GPU. Under Triton's interpreter on a CPU its RoPE runs (tested there
against the unpatched model, forward and gradients), its RMSNorm and SwiGLU do not (their kernels call
`.to()` on Python floats): those are compiled for sm_80 and sm_90 in the CPU tests (tests/compile_kernels.py)
and run against the unpatched model on a GPU (bench/run_gpu.sh).
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import MgrpoError


class LigerError(MgrpoError, ValueError):
    """model.liger cannot be honoured; the message says what to change."""


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(setting: str, device: torch.device) -> bool:
    """model.liger: auto (on a GPU when liger-kernel is installed), true, false."""
    if setting == "false":
        return False
    if setting == "auto":
        return device.type == "cuda" and liger_installed()
    if not liger_installed():
        raise LigerError("model.liger=true needs liger-kernel: pip install liger-kernel (or model.liger=false)")
    if device.type != "cuda":
        raise LigerError("model.liger=true needs a CUDA GPU: Liger's RMSNorm and SwiGLU kernels do not run on a CPU "
                         "(model.liger=auto uses it where it can)")
    return True


def apply_liger(causal_lm: torch.nn.Module, rope: bool = True, rms_norm: bool = True, swiglu: bool = True) -> None:
    """Patch `causal_lm` (before sharding) with Liger's kernels, through Liger's public per-architecture entry point
    (`apply_liger_kernel_to_<model type>(..., model=)`: its RMSNorm and MLP modules on this instance, and the
    rotary function module-wide, which is how Liger patches RoPE); a LigerError for an architecture Liger lacks."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise LigerError(f"model.liger: Liger has no kernels for model type {model_type!r} (it has "
                         f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}): set model.liger=false")
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](rope=rope, rms_norm=rms_norm, swiglu=swiglu, cross_entropy=False,
                                             fused_linear_cross_entropy=False, model=causal_lm)
