"""What both kernels need to know about where they run: whether Triton can launch on a tensor (a CUDA tensor, or
a CPU tensor under Triton's interpreter, TRITON_INTERPRET=1, which the CPU tests use), and the local shard of an
FSDP2 DTensor (what a kernel reads and writes: a view of the shard's storage)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported): kernels run on the CPU, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(tensor: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under its interpreter."""
    return tensor.is_cuda or interpreting()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
