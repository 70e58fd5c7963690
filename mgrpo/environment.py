"""Process-wide settings, made once by the program's entry point (`mgrpo ...`, `torchrun -m mgrpo ...`, a test
session's conftest, a benchmark's main), never as a side effect of importing a library module.

    configure_process(verbose=False)

- vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the trainer pushes weights into its model by
  reference, which a separate engine process would not see;
- vLLM's own log lines (hundreds a run: one INFO per prefix-cache reset, CPU tuning WARNINGs) only with
  verbose; its level must be set before vLLM's first import;
- on a CPU, vLLM's KV cache takes VLLM_CPU_KVCACHE_SPACE GiB of host memory: 1 unless set;
- transformers' loading bars and the deprecation warnings raised inside vLLM, torch and transformers stay off
  the terminal unless verbose, which then shows the project's own lines and progress bar;
- bitsandbytes, on CPUs with AVX512-BF16, tries to fetch a kernel from the Hugging Face hub at import and logs a
  warning when it cannot (no network, no `kernels` package): kept to errors unless verbose;
- for a real model (`model.path` set: `mgrpo train`, `mgrpo plan --measure`), glibc's malloc returns every block
  of 1 MiB or more to the system when it is freed (a fixed M_MMAP_THRESHOLD, as MALLOC_MMAP_THRESHOLD_=1048576
  would set): by default the threshold rises with each large block freed (up to 32 MiB), after which freed
  activations stay in the heap as fragments the process keeps. Measured at SmolLM2-135M's shape training on this
  CPU (`mgrpo plan --measure`): 15.3 GiB resident for a 9.8 GiB peak of live tensors by default, 10.1 GiB for 9.6
  with the fixed threshold. Not for the embedded default: its activations are small, and the fixed threshold
  made its steps 15% slower (1.93 s against 1.65 s, bench/bench_step_time.py);
An explicit environment variable always wins.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings


def configure_process(verbose: bool = False) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # a few vLLM modules log before an engine configures its logging (e.g. "Triton is installed, but doesn't
    # include CPU backend"), through Python's last-resort handler
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    if verbose:
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("vllm", "torch", "transformers"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    try:
        import transformers
    except ImportError:
        return
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


M_MMAP_THRESHOLD = -3           # glibc's malloc.h
LARGE_BLOCK = 1 << 20


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold at LARGE_BLOCK (module docstring); False where there is no glibc or the user set
    MALLOC_MMAP_THRESHOLD_ (glibc read it at start)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
    except (OSError, AttributeError):       # musl and other libcs: no mallopt, nothing to fix
        return False


def in_process_vllm() -> bool:
    """Whether configure_process (or the user) made vLLM run in this process, as the vLLM engine needs."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
