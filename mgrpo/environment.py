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
  warning when it cannot (no network, no `kernels` package): kept to errors unless verbose.
An explicit environment variable always wins.
"""
from __future__ import annotations

import logging
import os
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


def in_process_vllm() -> bool:
    """Whether configure_process (or the user) made vLLM run in this process, as the vLLM engine needs."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
