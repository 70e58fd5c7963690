"""Test setup: Triton runs under its interpreter on a CPU (set before any kernel module is imported), and the
process is configured as the mgrpo command configures it."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mgrpo.environment import configure_process  # noqa: E402  (after TRITON_INTERPRET: kernels read it at import)

configure_process()          # what the mgrpo command does at its entry: vLLM in-process, quiet libraries

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of the trainer (seconds to a minute each)")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A warm-started tiny base model (150 supervised steps), built once per test session and shared."""
    from mgrpo.config import load_config
    from mgrpo.data.tiny import warm_started_model_dir
    cache = tmp_path_factory.mktemp("model-cache")
    cfg = load_config(None, [f"warm_start.cache_dir={cache}", "warm_start.steps=150", "warm_start.batch_size=16"])
    warm_started_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
    return cache
